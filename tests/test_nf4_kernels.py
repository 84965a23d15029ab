"""NF4 kernels: Triton vs plain-PyTorch reference (bit for bit), the reference vs a slow per-element loop,
hand-computed golden bytes, double quantization, and the matmul paths with their input gradient.

On a CPU-only machine conftest.py turns on TRITON_INTERPRET=1, so the Triton kernels run here too.
"""

import numpy as np
import pytest
import torch

from minillm.kernels.nf4 import (
    NF4_CODE,
    dequantize_nf4,
    dequantize_nf4_ref,
    nf4_midpoints,
    quantize_nf4,
    quantize_nf4_ref,
    use_triton,
)
from minillm.nf4_double_quant import (
    create_dynamic_map,
    double_dequantize,
    double_quantize,
    quantize_dynamic,
)
from minillm.kernels.nf4_matmul import (
    GEMV_MAX_ROWS,
    GEMV_TILES,
    _gemv,
    choose_path,
    nf4_matmul,
    nf4_matmul_backward_input,
    nf4_matmul_ref,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# The Triton side runs on the GPU when there is one, else through the interpreter (conftest.py); the
# references always run on the CPU, so a GPU run checks the compiled kernels against them bit for bit.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tri_quantize(w, blocksize=64):
    packed, absmax = quantize_nf4(w.to(DEVICE), blocksize, backend="triton")
    return packed.cpu(), absmax.cpu()


def tri_dequantize(packed, absmax, shape, blocksize=64, dtype=torch.bfloat16):
    out = dequantize_nf4(packed.to(DEVICE), absmax.to(DEVICE), shape, blocksize, dtype, backend="triton")
    return out.cpu()


def tri_matmul(fn, x, packed, absmax, n_out, n_in):
    """nf4_matmul or nf4_matmul_backward_input on DEVICE through Triton, result back on the CPU."""
    return fn(x.to(DEVICE), packed.to(DEVICE), absmax.to(DEVICE), n_out, n_in, backend="triton").cpu()


def awkward_weight(shape, dtype, seed=0):
    """Gaussian weights whose scale varies 1e-3 .. 1e3 along the flat index, with one all-zero block."""
    g = torch.Generator().manual_seed(seed)
    n = int(np.prod(shape))
    scale = 10.0 ** torch.linspace(-3, 3, n)
    w = torch.randn(n, generator=g) * scale
    if n > 128:
        w[64:128] = 0.0  # the second block is all zeros -> code 7, absmax 0
    return w.view(shape).to(dtype)


# ----------------------------------------------------------------------------------------------------------
# The reference against a slow, obvious loop that follows the GUIDE's rules one element at a time.


def slow_quantize(w, blocksize):
    x = w.reshape(-1).float().numpy()
    n = x.size
    code = np.array(NF4_CODE, dtype=np.float32)
    mids = [(code[j] + code[j + 1]) / np.float32(2) for j in range(15)]
    q, absmax = [], []
    for start in range(0, n, blocksize):
        block = x[start : start + blocksize]
        amax = np.float32(max(abs(v) for v in block))
        absmax.append(amax)
        safe = max(amax, np.float32(1e-38))
        recip = np.float32(1) / safe
        for v in block:
            s = v / safe if len(block) < blocksize else v * recip  # last partial block divides
            s = min(max(s, np.float32(-1)), np.float32(1))
            code_index = 0
            for j in range(15):
                if s > mids[j]:  # strictly above the midpoint: ties stay on the lower code
                    code_index = j + 1
            q.append(code_index)
    if n % 2:
        q.append(7)
    packed = [(q[2 * k] << 4) | q[2 * k + 1] for k in range(len(q) // 2)]
    return torch.tensor(packed, dtype=torch.uint8), torch.tensor(absmax, dtype=torch.float32)


@pytest.mark.parametrize("shape", [(5, 27), (2, 64), (1, 3)])
def test_reference_matches_slow_loop(shape):
    w = awkward_weight(shape, torch.float32, seed=1)
    packed, absmax = quantize_nf4_ref(w, 64)
    slow_packed, slow_absmax = slow_quantize(w, 64)
    assert torch.equal(packed, slow_packed)
    assert torch.equal(absmax, slow_absmax)
    # dequantize: code[q] * absmax in float32, element by element
    codes = [nibble for b in packed.tolist() for nibble in (b >> 4, b & 15)][: w.numel()]
    amax = slow_absmax.numpy()
    expect = torch.tensor([np.float32(NF4_CODE[c]) * amax[i // 64] for i, c in enumerate(codes)])
    got = dequantize_nf4_ref(packed, absmax, shape, 64, torch.float32).view(-1)
    assert torch.equal(got, expect)


def test_last_partial_block_divides():
    # Found by search: x * (1/a) lands just above the midpoint between codes 4 and 5, x / a exactly on it.
    a = np.array([1065696927], dtype=np.uint32).view(np.float32)[0]  # 1.0409735
    x = np.array([3195671765], dtype=np.uint32).view(np.float32)[0]  # -0.2442201
    mid = nf4_midpoints()[4].item()
    assert x * (np.float32(1) / a) > np.float32(mid) and x / a == np.float32(mid)
    full = torch.zeros(64)
    full[0], full[1] = float(a), float(x)
    partial = full[:10].clone()  # the only block is partial
    for quant in (tri_quantize, quantize_nf4_ref):
        assert quant(full)[0][0].item() == 0xF5  # a -> 15, x * (1/a) -> code 5
        assert quant(partial)[0][0].item() == 0xF4  # a -> 15, x / a on the midpoint -> code 4


# ----------------------------------------------------------------------------------------------------------
# Golden values by hand


def test_known_example_bytes():
    w = torch.zeros(64)
    w[:4] = torch.tensor([0.0, 1.0, -1.0, 0.5])
    for quant in (tri_quantize, quantize_nf4_ref):
        packed, absmax = quant(w)
        # 0.0 -> 7, 1.0 -> 15: 0x7f; -1.0 -> 0, 0.5 -> 12 (0.5 < (0.4407 + 0.5626)/2 = 0.50166): 0x0c
        assert packed[:2].tolist() == [0x7F, 0x0C]
        assert absmax.tolist() == [1.0]


def test_golden_bytes_by_hand():
    # absmax 2, so s = x / 2. Midpoints used: 0.5016634 (12|13), -0.2346074 (4|5), 0.1202553 (8|9).
    w = torch.zeros(70)  # 2 blocks: 64 + a partial one of 6
    w[:6] = torch.tensor([2.0, -2.0, 1.0, -0.5, 0.3, 0.0])
    # s = 1 -> 15, -1 -> 0 | 0.5 -> 12, -0.25 -> 4 | 0.15 -> 9, 0 -> 7
    w[64:70] = torch.tensor([0.0, 3.0, -1.5, 0.3, 0.02, -3.0])
    # absmax 3: s = 0, 1 -> 7, 15 | -0.5 -> 2 (-0.5 < -0.4600) , 0.1 -> 8 (0.1 < 0.1203)
    #           | 0.00667 -> 7 (below 0.0398), -1 -> 0
    expect = [0xF0, 0xC4, 0x97] + [0x77] * 29 + [0x7F, 0x28, 0x70]
    for quant in (tri_quantize, quantize_nf4_ref):
        packed, absmax = quant(w)
        assert packed.tolist() == expect
        assert absmax.tolist() == [2.0, 3.0]
    packed, absmax = tri_quantize(w)
    w_hat = tri_dequantize(packed, absmax, (70,), dtype=torch.float32)
    f32 = np.float32
    assert w_hat[2].item() == f32(0.44070982933044434) * f32(2.0)  # code 12 * absmax
    assert w_hat[67].item() == f32(0.07958029955625534) * f32(3.0)  # code 8 * absmax


def test_midpoint_ties_take_lower_code():
    mids = nf4_midpoints()
    w = torch.zeros(2, 32)
    w[0, 0] = 1.0  # absmax 1: s == x exactly
    w[0, 1:16] = mids
    w[1, :15] = -mids  # -mid_j is mid_(14-j): the symmetric midpoints of the other side
    w = w.view(-1)
    for quant in (tri_quantize, quantize_nf4_ref):
        packed, _ = quant(w)
        q = torch.stack([packed >> 4, packed & 15], 1).view(-1).tolist()
        assert q[1:16] == list(range(15))  # exactly on mid_j -> code j, the lower one
        # NF4 is not symmetric: -mid_j falls between midpoints; its code is #{midpoints strictly below}
        assert q[32:47] == [int((mids < -m).sum()) for m in mids]


def test_all_zero_block_is_code_7():
    w = torch.zeros(3, 50)  # 150 elements: blocks 64, 64, 22
    w[2, 40] = 0.5  # only the last block is non-zero
    for quant in (tri_quantize, quantize_nf4_ref):
        packed, absmax = quant(w)
        assert absmax.tolist() == [0.0, 0.0, 0.5]
        assert packed[:64].tolist() == [0x77] * 64
    assert torch.equal(tri_dequantize(packed, absmax, w.shape, dtype=torch.float32), w)


# ----------------------------------------------------------------------------------------------------------
# Triton vs reference


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37, 129), (3, 5), (1, 1)])
def test_quantize_triton_matches_reference(shape, dtype):
    w = awkward_weight(shape, dtype)
    packed, absmax = tri_quantize(w)
    ref_packed, ref_absmax = quantize_nf4_ref(w)
    assert packed.dtype == torch.uint8 and packed.numel() == (w.numel() + 1) // 2
    assert absmax.dtype == torch.float32 and absmax.numel() == -(-w.numel() // 64)
    assert torch.equal(packed, ref_packed)
    assert torch.equal(absmax, ref_absmax)
    for out_dtype in DTYPES:
        got = tri_dequantize(packed, absmax, shape, dtype=out_dtype)
        assert got.dtype == out_dtype and got.shape == shape
        assert torch.equal(got, dequantize_nf4_ref(packed, absmax, shape, dtype=out_dtype))


def test_quantize_mid_size_and_error():
    w = awkward_weight((256, 320), torch.bfloat16, seed=3)
    packed, absmax = tri_quantize(w)
    assert torch.equal(packed, quantize_nf4_ref(w)[0])
    w_hat = tri_dequantize(packed, absmax, w.shape, dtype=torch.float32)
    assert torch.equal(w_hat.to(torch.bfloat16), dequantize_nf4_ref(packed, absmax, w.shape))
    # nearest code: |w - w_hat| <= half the widest code gap, (-0.6962 - -1) / 2, times the block's absmax
    block_absmax = absmax.repeat_interleave(64)[: w.numel()].view(w.shape)
    assert ((w.float() - w_hat).abs() <= 0.15191 * block_absmax).all()


@pytest.mark.parametrize("blocksize", [128, 256])
def test_other_blocksizes(blocksize):
    w = awkward_weight((9, 61), torch.float32, seed=4)
    packed, absmax = tri_quantize(w, blocksize)
    ref_packed, ref_absmax = quantize_nf4_ref(w, blocksize)
    assert torch.equal(packed, ref_packed) and torch.equal(absmax, ref_absmax)
    assert torch.equal(
        tri_dequantize(packed, absmax, w.shape, blocksize, torch.float16),
        dequantize_nf4_ref(packed, absmax, w.shape, blocksize, torch.float16),
    )


def test_backend_choice_and_errors():
    w = torch.randn(4, 8)
    assert use_triton(w, "triton") and not use_triton(w, "torch")
    if DEVICE == "cpu":  # conftest.py switched the interpreter on, so "auto" picks the kernels
        assert use_triton(w)
    assert torch.equal(quantize_nf4(w, backend="torch")[0], tri_quantize(w)[0])
    with pytest.raises(ValueError, match="backend"):
        use_triton(w, "cuda")
    with pytest.raises(ValueError, match="blocksize"):
        quantize_nf4(w, blocksize=48)
    with pytest.raises(ValueError, match="fp32/fp16/bf16"):
        quantize_nf4(w.to(torch.int32))
    packed, absmax = quantize_nf4(w)
    with pytest.raises(ValueError, match="bytes"):
        dequantize_nf4(packed, absmax, (4, 10))


# ----------------------------------------------------------------------------------------------------------
# Double quantization


def test_dynamic_map_known_entries():
    code = create_dynamic_map()
    assert code.dtype == torch.float32 and code.numel() == 256
    assert (code[1:] > code[:-1]).all()  # sorted, no duplicates
    assert code[127].item() == 0.0 and code[255].item() == 1.0
    assert torch.equal(code[:127], -code[128:255].flip(0))  # symmetric apart from 0 and 1.0
    # decade 1e-6 holds one value, the middle of [0.1, 1]; decade 1e-5 two: middles of [0.1, 0.55, 1]
    assert code[128].item() == pytest.approx(0.55e-6, rel=1e-6)
    assert code[129].item() == pytest.approx(3.25e-6, rel=1e-6)
    assert code[130].item() == pytest.approx(7.75e-6, rel=1e-6)
    # the top decade holds 64 values, the middles of linspace(0.1, 1, 65): the last is (0.9859375 + 1) / 2
    assert code[254].item() == pytest.approx(0.99296875, rel=1e-6)
    assert code[253].item() == pytest.approx(0.97890625, rel=1e-6)
    assert code[0].item() == pytest.approx(-0.99296875, rel=1e-6)


def test_dynamic_quantize_is_nearest():
    code = create_dynamic_map()
    x = torch.rand(20000, generator=torch.Generator().manual_seed(5)) * 2 - 1
    x[:6] = torch.tensor([0.0, 1.0, -1.0, 0.55e-6, -1e-9, 0.996])
    q = quantize_dynamic(x, code).long()
    dist = (x[:, None] - code[None, :]).abs()
    assert torch.equal(dist.gather(1, q[:, None])[:, 0], dist.min(dim=1).values)
    assert q[:4].tolist() == [127, 255, 0, 128]


def test_double_quant_roundtrip():
    g = torch.Generator().manual_seed(6)
    absmax = torch.rand(1000, generator=g) * 0.2 + 0.01  # 4 blocks of 256, the last partial
    qabsmax, scales, offset = double_quantize(absmax)
    assert qabsmax.dtype == torch.uint8 and qabsmax.shape == (1000,)
    assert scales.dtype == torch.float32 and scales.shape == (4,)
    assert offset.dtype == torch.float32 and offset.item() == pytest.approx(absmax.mean().item(), rel=1e-6)
    back = double_dequantize(qabsmax, scales, offset)
    # the widest gap of the dynamic map is 0.9930 - 0.9789 = 0.01406: error <= half of it times the scale
    bound = 0.00704 * scales.repeat_interleave(256)[:1000] + 1e-7
    assert ((back - absmax).abs() <= bound).all()
    # one multiply then one add, in float32
    code = create_dynamic_map()
    assert back[300].item() == (code[qabsmax[300].long()] * scales[1] + offset).item()


def test_double_quant_constant_block_is_exact():
    absmax = torch.full((300,), 0.125)  # centred values all 0: scale 0, NaN -> code 0, back to offset
    back = double_dequantize(*double_quantize(absmax))
    assert torch.equal(back, absmax)


# ----------------------------------------------------------------------------------------------------------
# Matmul: fused GEMV (few rows) and dequantize + matmul (many rows), forward and input gradient

# y differs from the reference only by summation order (and rounding y to x.dtype): explicit tolerances
TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-5),
    torch.float16: dict(atol=2e-2, rtol=2e-3),  # 2 fp16 ulps of outputs around 10
    torch.bfloat16: dict(atol=1.3e-1, rtol=1.6e-2),  # 2 bf16 ulps
}


@pytest.fixture(scope="module")
def nf4_weight():
    out_features, in_features = 37, 129  # rows not a multiple of 64: blocks straddle rows
    w = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(8))
    packed, absmax = quantize_nf4_ref(w)
    return packed, absmax, out_features, in_features


def test_path_choice():
    assert choose_path(1) == "gemv" and choose_path(GEMV_MAX_ROWS) == "gemv"
    assert choose_path(GEMV_MAX_ROWS + 1) == "dequant_matmul"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead_shape", [(1,), (2, 3), (GEMV_MAX_ROWS + 4,)])
def test_matmul_matches_reference(nf4_weight, lead_shape, dtype):
    packed, absmax, n_out, n_in = nf4_weight
    x = torch.randn(*lead_shape, n_in, generator=torch.Generator().manual_seed(9)).to(dtype)
    y = tri_matmul(nf4_matmul, x, packed, absmax, n_out, n_in)
    y_ref = nf4_matmul_ref(x, packed, absmax, n_out, n_in)
    assert y.dtype == dtype and y.shape == (*lead_shape, n_out)
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    # and against float64 maths on the very weights the kernel multiplies by
    w = dequantize_nf4_ref(packed, absmax, (n_out, n_in), dtype=dtype).double()
    torch.testing.assert_close(y.double(), x.double() @ w.t(), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [3, GEMV_MAX_ROWS + 4])
def test_matmul_input_grad_matches_autograd(nf4_weight, rows, dtype):
    packed, absmax, n_out, n_in = nf4_weight
    g = torch.Generator().manual_seed(10)
    x = torch.randn(rows, n_in, generator=g).to(dtype).requires_grad_()
    grad_y = torch.randn(rows, n_out, generator=g).to(dtype)
    w = dequantize_nf4_ref(packed, absmax, (n_out, n_in), dtype=dtype).requires_grad_(False)
    (x @ w.t()).backward(grad_y)
    grad_x = tri_matmul(nf4_matmul_backward_input, grad_y, packed, absmax, n_out, n_in)
    assert grad_x.dtype == dtype and grad_x.shape == x.shape
    torch.testing.assert_close(grad_x, x.grad, **TOL[dtype])


@pytest.mark.parametrize("shape", [(37, 129), (36, 130)])  # odd K (blocks straddle rows), even K (pairs)
@pytest.mark.parametrize("trans_w", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_gemv_tile_matches_reference(shape, trans_w, dtype):
    # on a GPU the autotuner may pick any tile; the interpreter runs only the first, so run each by hand
    n_out, n_in = shape
    g = torch.Generator().manual_seed(11)
    packed, absmax = quantize_nf4_ref(torch.randn(shape, generator=g))
    w = dequantize_nf4_ref(packed, absmax, shape, dtype=dtype)
    x = torch.randn(3, n_out if trans_w else n_in, generator=g).to(dtype)
    expect = x @ w if trans_w else x @ w.t()  # (3, n_in) or (3, n_out)
    ran = 0
    for tile in GEMV_TILES:
        if tile.kwargs["PAIRED"] and n_in % 2:
            continue  # pruned by the autotuner: pairs need an even row length
        y = _gemv(x.to(DEVICE), packed.to(DEVICE), absmax.to(DEVICE), expect.shape[1], x.shape[1], n_in, 64,
                  trans_w, tile=tile.kwargs).cpu()  # fmt: skip
        torch.testing.assert_close(y, expect, **TOL[dtype], msg=lambda m, t=tile: f"{t}: {m}")
        ran += 1
    assert ran == (len(GEMV_TILES) if n_in % 2 == 0 else sum(not t.kwargs["PAIRED"] for t in GEMV_TILES))


def test_matmul_shape_errors(nf4_weight):
    packed, absmax, n_out, n_in = nf4_weight
    with pytest.raises(ValueError, match="last dimension"):
        nf4_matmul(torch.randn(2, n_in + 1), packed, absmax, n_out, n_in)
    with pytest.raises(ValueError, match="absmax"):
        nf4_matmul(torch.randn(2, n_in), packed, absmax[:-1], n_out, n_in)


def test_codebooks_are_made_once_per_device():
    # a fresh host-to-device copy per matmul would stall the GPU and break CUDA graph capture
    from minillm.kernels.nf4 import nf4_code
    from minillm.nf4_double_quant import dynamic_code

    assert nf4_code() is nf4_code("cpu") is nf4_code(torch.device("cpu"))
    assert dynamic_code() is dynamic_code("cpu")
    assert nf4_code().tolist() == list(NF4_CODE) and dynamic_code()[127].item() == 0.0
