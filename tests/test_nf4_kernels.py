"""NF4 kernels: Triton vs plain-PyTorch reference (bit for bit), the reference vs a slow per-element
loop, hand-computed golden bytes, the matmul paths with their input gradient (every GEMV tile of
both loops), and the two runnable tutorials (`python -m minillm.kernels.nf4` / `.nf4_matmul`): all
✅, and ❌ when the reference they check against is wrong.

On a CPU-only machine conftest.py turns on TRITON_INTERPRET=1, so the Triton kernels run here too.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import minillm.kernels.nf4 as nf4_tutorial
import minillm.kernels.nf4_matmul as matmul_tutorial
from minillm.kernels.nf4 import (
    NF4_CODE,
    dequantize_nf4,
    dequantize_nf4_ref,
    nf4_midpoints,
    quantize_nf4,
    quantize_nf4_ref,
    use_triton,
)
from minillm.kernels.nf4_matmul import (
    GEMV_MAX_ROWS,
    GEMV_TILES,
    TOLERANCE,
    _gemv,
    choose_path,
    nf4_matmul,
    nf4_matmul_backward_input,
    nf4_matmul_ref,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# The Triton side runs on the GPU when there is one, else through the interpreter
# (conftest.py); the references always run on the CPU, so a GPU run checks the compiled
# kernels against them bit for bit.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tri_quantize(w, blocksize=64):
    packed, absmax = quantize_nf4(w.to(DEVICE), blocksize, backend="triton")
    return packed.cpu(), absmax.cpu()


def tri_dequantize(packed, absmax, shape, blocksize=64, dtype=torch.bfloat16):
    out = dequantize_nf4(packed.to(DEVICE), absmax.to(DEVICE), shape, blocksize, dtype,
                         backend="triton")
    return out.cpu()


def tri_matmul(fn, x, packed, absmax, n_out, n_in):
    """nf4_matmul or nf4_matmul_backward_input on DEVICE through Triton, result back on the CPU."""
    return fn(x.to(DEVICE), packed.to(DEVICE), absmax.to(DEVICE), n_out, n_in,
              backend="triton").cpu()


def awkward_weight(shape, dtype, seed=0):
    """Gaussian weights whose scale varies 1e-3 .. 1e3 along the flat index,
    with one all-zero block."""
    g = torch.Generator().manual_seed(seed)
    n = int(np.prod(shape))
    scale = 10.0 ** torch.linspace(-3, 3, n)
    w = torch.randn(n, generator=g) * scale
    if n > 128:
        w[64:128] = 0.0  # the second block is all zeros -> code 7, absmax 0
    return w.view(shape).to(dtype)


# --------------------------------------------------------------------------------------------------
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
            # 0 blocks: code 7
            s = min(max(s, np.float32(-1)), np.float32(1)) if amax > 0 else np.float32(0)
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
    # Found by search: x * (1/a) lands just above the midpoint between codes
    # 4 and 5, x / a exactly on it.
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


# --------------------------------------------------------------------------------------------------
# Golden values by hand


def test_known_example_bytes():
    w = torch.zeros(64)
    w[:4] = torch.tensor([0.0, 1.0, -1.0, 0.5])
    for quant in (tri_quantize, quantize_nf4_ref):
        packed, absmax = quant(w)
        # 0.0 -> 7, 1.0 -> 15: 0x7f;
        # -1.0 -> 0, 0.5 -> 12 (0.5 < (0.4407 + 0.5626)/2 = 0.50166): 0x0c
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
        # NF4 is not symmetric: -mid_j falls between midpoints; its code
        # is #{midpoints strictly below}
        assert q[32:47] == [int((mids < -m).sum()) for m in mids]


def test_all_zero_block_is_code_7_with_denormals_flushed():
    # The 1e-38 absmax floor is subnormal: with flush-to-zero on (as a -ffast-math library loaded
    # by torch.compile's C++ kernels leaves it on older torch), 0 * (1 / floor) would be NaN ->
    # code 15.
    w = torch.zeros(2, 64)
    w[1, 3] = -0.25
    was = torch.set_flush_denormal(True)
    try:
        for quant in (tri_quantize, quantize_nf4_ref):
            packed, absmax = quant(w)
            assert packed[:32].tolist() == [0x77] * 32 and absmax.tolist() == [0.0, 0.25]
    finally:
        torch.set_flush_denormal(False)
    assert was  # this CPU supports flushing, so the case above really ran with it on


def test_all_zero_block_is_code_7():
    w = torch.zeros(3, 50)  # 150 elements: blocks 64, 64, 22
    w[2, 40] = 0.5  # only the last block is non-zero
    for quant in (tri_quantize, quantize_nf4_ref):
        packed, absmax = quant(w)
        assert absmax.tolist() == [0.0, 0.0, 0.5]
        assert packed[:64].tolist() == [0x77] * 64
    assert torch.equal(tri_dequantize(packed, absmax, w.shape, dtype=torch.float32), w)


# --------------------------------------------------------------------------------------------------
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
    # nearest code: |w - w_hat| <= half the widest code gap,
    # (-0.6962 - -1) / 2, times the block's absmax
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


# --------------------------------------------------------------------------------------------------
# Matmul: fused GEMV (few rows) and dequantize + matmul (many rows), forward and input gradient

# y differs from the reference only by summation order (and rounding
# y to x.dtype): explicit tolerances
TOL = TOLERANCE


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


# odd K (blocks straddle rows), even K (pairs)
@pytest.mark.parametrize("shape", [(37, 129), (36, 130)])
@pytest.mark.parametrize("trans_w", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_gemv_tile_matches_reference(shape, trans_w, dtype):
    # on a GPU the autotuner may pick any tile; the interpreter runs only the
    # first, so run each by hand
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
        y = _gemv(x.to(DEVICE), packed.to(DEVICE), absmax.to(DEVICE), n_out=expect.shape[1],
                  n_red=x.shape[1], in_features=n_in, blocksize=64, trans_w=trans_w,
                  tile=tile.kwargs).cpu()  # fmt: skip
        torch.testing.assert_close(y, expect, **TOL[dtype], msg=lambda m, t=tile: f"{t}: {m}")
        ran += 1
    assert ran == (len(GEMV_TILES) if n_in % 2 == 0
                   else sum(not t.kwargs["PAIRED"] for t in GEMV_TILES))


def test_matmul_shape_errors(nf4_weight):
    packed, absmax, n_out, n_in = nf4_weight
    with pytest.raises(ValueError, match="last dimension"):
        nf4_matmul(torch.randn(2, n_in + 1), packed, absmax, n_out, n_in)
    with pytest.raises(ValueError, match="absmax"):
        nf4_matmul(torch.randn(2, n_in), packed, absmax[:-1], n_out, n_in)


def test_codebook_is_made_once_per_device():
    # a fresh host-to-device copy per matmul would stall the GPU and break CUDA graph capture
    from minillm.kernels.nf4 import nf4_code

    assert nf4_code() is nf4_code("cpu") is nf4_code(torch.device("cpu"))
    assert nf4_code().tolist() == list(NF4_CODE)


# --------------------------------------------------------------------------------------------------
# The runnable tutorials


@pytest.mark.parametrize("module,rows",
                         [("minillm.kernels.nf4", 24), ("minillm.kernels.nf4_matmul", 30)])
def test_tutorial_runs_and_every_row_passes(module, rows):
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", module], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.count("✅") == rows and "❌" not in out.stdout, out.stdout


def test_tutorial_without_gpu_or_interpreter_says_how_to_run():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine the tutorial runs the compiled kernels")
    out = subprocess.run([sys.executable, "-m", "minillm.kernels.nf4"], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 1 and "TRITON_INTERPRET=1 python -m minillm.kernels.nf4" in out.stderr


def test_a_wrong_reference_shows_a_cross(capsys):
    def off_by_one_code(w, blocksize):  # a reference with one nibble wrong
        packed, absmax = quantize_nf4_ref(w, blocksize)
        packed[0] ^= 1
        return packed, absmax

    # a wrong matmul: the other W layout
    def transposed(x, packed, absmax, n_out, n_in, blocksize=64):
        w = dequantize_nf4_ref(packed, absmax, (n_in, n_out), blocksize, x.dtype)
        return x @ w

    device = torch.device(DEVICE)
    assert nf4_tutorial.check(device, shapes=[(3, 5)])
    table = capsys.readouterr().out
    assert table.count("✅") == 6 and "❌" not in table
    assert not nf4_tutorial.check(device, shapes=[(3, 5)], quantize_ref=off_by_one_code)
    table = capsys.readouterr().out
    # the wrong code fails quantize (one byte differs) and dequantize (its
    # weight differs), each dtype
    assert table.count("❌") == 6 and table.count("✅") == 0
    assert not matmul_tutorial.check(device, shapes=[(6, 6)], matmul_ref=transposed)
    table = capsys.readouterr().out
    # y = x @ W^T fails through all three paths and dtypes; grad_x (right reference) passes
    assert table.count("❌") == 9 and table.count("✅") == 9


def test_benchmarks_report_gbs_against_the_copy_roofline(capsys):
    fake_clock = lambda fn: (fn(), 1e-9)[1]  # runs fn once, "takes" 1 ns
    device = torch.device(DEVICE)
    nf4_tutorial.benchmark(device, shape=(4, 64), timer=fake_clock, copy_bytes=1024)
    matmul_tutorial.benchmark(device, shapes=((4, 64),), timer=fake_clock, copy_bytes=1024)
    out = " ".join(capsys.readouterr().out.split())
    # copy: 2 * 1024 bytes / 1 ns = 2048 GB/s. Quantize and dequantize of 256 weights move
    # 2*256 bytes of bf16 + 128 of codes + 4*4 of scales = 656 GB/s, 32% of the copy; a decode
    # step moves the 144 bytes of NF4 + 2*(64 + 4) of x and y = 280 GB/s (14%), and dense bf16
    # reads 2*256 + 136 = 648 GB/s (32%).
    assert ("device copy (the roofline) | | 2048 | 100%" in out
            and "(the roofline): 2048 GB/s" in out)
    assert out.count("| 656 | 32% |") == 4, out
    assert out.count("| 280 | 14% |") == 4 and out.count("| 648 | 32% |") == 1, out
