"""LLM.int8 kernels: quantize and dequantize bit for bit as bitsandbytes (goldens from bitsandbytes
0.50.2's CPU path, tests/data/bnb_int8_golden.safetensors, made by bench/peer_int8_check.py), the
reference against a per-element loop, hand-made ties and edge rows, every GEMM tile bit for bit
against the reference, bnb.matmul within its rounding, the input gradient, and the tutorials'
checks (✅, and ❌ for a wrong reference).

On a CPU-only machine conftest.py turns on TRITON_INTERPRET=1, so the Triton kernels run here too.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import minillm.kernels.int8 as int8_tutorial
import minillm.kernels.int8_matmul as matmul_tutorial
from minillm.kernels.int8 import (
    dequantize_int8,
    quantize_int8,
    quantize_int8_rows,
    quantize_int8_rows_ref,
)
from minillm.kernels.int8_matmul import (
    GEMM_TILES,
    int8_gemm,
    int8_gemm_ref,
    int8_matmul,
    int8_matmul_backward_input,
    int8_matmul_ref,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GOLDEN = Path(__file__).parent / "data" / "bnb_int8_golden.safetensors"


@pytest.fixture(scope="module")
def golden():
    with safe_open(GOLDEN, "pt") as f:
        assert f.metadata()["bitsandbytes"] == "0.50.2"
    return load_file(GOLDEN)


def cases(golden, kind):
    return sorted({k.split(".")[1] for k in golden if k.startswith(kind + ".")})


def tri_rows(x, threshold=0.0):
    codes, absmax, cols = quantize_int8_rows(x.to(DEVICE), threshold, backend="triton")
    return codes.cpu(), absmax.cpu(), None if cols is None else cols.cpu()


# --------------------------------------------------------------------------------------------------
# bitsandbytes, bit for bit


def test_quantize_and_dequantize_equal_bitsandbytes(golden):
    names = cases(golden, "q")
    assert len(names) == 36  # 6 shapes x 3 dtypes x 2 thresholds
    for name in names:
        x, threshold = golden[f"q.{name}.x"], float(golden[f"q.{name}.threshold"])
        bnb_cols = golden[f"q.{name}.cols"]
        for quant in (quantize_int8_rows_ref, tri_rows):
            codes, absmax, cols = quant(x, threshold)
            assert torch.equal(codes, golden[f"q.{name}.CB"]), (name, quant)
            assert torch.equal(absmax, golden[f"q.{name}.SCB"]), (name, quant)
            if threshold == 0:
                assert cols is None and bnb_cols.tolist() == [-1]
                assert torch.equal(dequantize_int8(codes, absmax), golden[f"q.{name}.deq"])
            else:
                assert torch.equal(cols, bnb_cols), name


def test_quantize_int8_is_the_weight_format(golden):
    name = "37x129_bfloat16_t0"
    CB, SCB = quantize_int8(golden[f"q.{name}.x"])
    assert torch.equal(CB, golden[f"q.{name}.CB"]) and torch.equal(SCB, golden[f"q.{name}.SCB"])
    assert CB.dtype == torch.int8 and SCB.dtype == torch.float32 and SCB.shape == (37,)


def test_matmul_equals_bnb_matmul_within_its_rounding(golden):
    """bnb.matmul (MatMul8bitLt, inference): the same codes and int32 sums; its CPU epilogue
    multiplies by 6.200124e-05 instead of 1/127^2 (1.8e-5 relative), and it rounds x to float16
    before quantizing. Both sides round the int8 part to x's dtype and then add the outlier part,
    so an output may be off by one rounding of the larger of the two: |ours - bnb| <= u * (|y| +
    max |y|) with u half an ulp (2^-8 bf16, 2^-11 fp16); float32 inputs, fed rounded to float16 as
    bitsandbytes quantizes them, within u = 5e-5 (the constant, and the float16 rounding of the
    non-outlier values that share an outlier column)."""
    names = cases(golden, "mm")
    assert len(names) == 18
    for name in names:
        x, CB, SCB = golden[f"mm.{name}.x"], golden[f"mm.{name}.CB"], golden[f"mm.{name}.SCB"]
        threshold, expect = float(golden[f"mm.{name}.threshold"]), golden[f"mm.{name}.y"]
        if x.dtype == torch.float32:
            x = x.half().float()
        for y in (int8_matmul_ref(x, CB, SCB, threshold),
                  int8_matmul(x.to(DEVICE), CB.to(DEVICE), SCB.to(DEVICE), threshold,
                              backend="triton").cpu()):
            assert y.dtype == expect.dtype and y.shape == expect.shape
            u = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 5e-5}[y.dtype]
            err = (y.double() - expect.double()).abs()
            bound = u * (expect.double().abs() + expect.double().abs().max())
            assert (err <= bound).all(), (name, err.max().item())


# --------------------------------------------------------------------------------------------------
# the reference against a per-element loop; ties and edge rows by hand


def slow_quantize_row(row: np.ndarray, threshold: float):
    """One row of float32 values, following the format cell one value at a time."""
    f32 = np.float32
    kept = [f32(0) if threshold > 0 and abs(v) >= threshold else v for v in row]
    absmax = max(abs(v) for v in kept)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        scale = (f32(1) / absmax) * f32(127)  # PyTorch's 127.0 / absmax
        codes = []
        for v in kept:
            p = f32(v * scale)
            codes.append(int(np.round(p)) if abs(p) < 128 else 0)  # np.round: half to even
    return codes, absmax


@pytest.mark.parametrize("threshold", [0.0, 2.5])
def test_reference_matches_slow_loop(threshold):
    x = torch.tensor([[0.5, -1.5, 2.5, 3.0, -0.7], [0.0, 0.0, 0.0, 0.0, 0.0],
                      [1e-3, -2e-3, 3e-3, 4e-3, 5e-3], [100.0, 7.0, -2.0, 0.25, 1.0]])
    codes, absmax, cols = quantize_int8_rows_ref(x, threshold)
    for m, row in enumerate(x.numpy()):
        slow, amax = slow_quantize_row(row, threshold)
        if threshold:  # codes of an outlier column are 0 in every row
            slow = [0 if (x[:, j].abs() >= threshold).any() else c for j, c in enumerate(slow)]
        assert codes[m].tolist() == slow and absmax[m].item() == amax
    assert (cols is None) == (threshold == 0)


def test_ties_round_half_to_even_and_edge_rows_give_zero_codes():
    # absmax 127: each code is the value itself, rounded half to even
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -126.5],
                      [0.0] * 7,  # a zero row: 0 * inf -> NaN -> 0, absmax 0
                      [1e-40, -1e-40, 0, 0, 0, 0, 0]])  # 1 / absmax overflows: codes 0
    for quant in (quantize_int8_rows_ref, tri_rows):
        codes, absmax, _ = quant(x)
        assert codes.tolist() == [[127, 0, 2, 2, 0, -2, -126], [0] * 7, [0] * 7]
        assert absmax[:2].tolist() == [127.0, 0.0] and absmax[2].item() == pytest.approx(1e-40)


def test_scale_is_pytorchs_127_over_absmax():
    # 127 / 270 correctly rounded is 0.47037038; PyTorch's (and so bitsandbytes') 127.0 / t is
    # t.reciprocal() * 127 = 0.47037035, and -135 * that is -63.499996, which rounds to -63 (with
    # the correctly rounded scale it would be exactly -63.5 -> -64)
    x = torch.tensor([[270.0, -135.0]])
    for quant in (quantize_int8_rows_ref, tri_rows):
        assert quant(x)[0].tolist() == [[127, -63]]


def test_threshold_zeroes_outlier_columns_and_keeps_their_rows_scale():
    x = torch.tensor([[1.0, 6.0, 2.0], [4.0, 5.0, -2.0]])  # 6.0 is an outlier: |x| >= 6
    for quant in (quantize_int8_rows_ref, tri_rows):
        codes, absmax, cols = quant(x, 6.0)
        assert cols.tolist() == [1]
        # row 0's absmax leaves the outlier out; row 1's keeps its 5.0 of the outlier column
        assert absmax.tolist() == [2.0, 5.0]
        assert codes.tolist() == [[64, 0, 127], [102, 0, -51]]
        assert quant(x, 6.5)[2].tolist() == []  # no outliers: an empty index, not None


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_int8(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="2-D"):
        quantize_int8(torch.ones(3))
    with pytest.raises(ValueError, match="threshold"):
        quantize_int8_rows(torch.ones(2, 2), -1.0)
    with pytest.raises(ValueError, match="int8"):
        quantize_int8_rows(torch.ones(2, 2, dtype=torch.int32))
    CB, SCB = quantize_int8(torch.randn(4, 8))
    with pytest.raises(ValueError, match="last dimension 9, expected 8"):
        int8_matmul(torch.randn(2, 9), CB, SCB)
    with pytest.raises(ValueError, match="SCB must be float32"):
        dequantize_int8(CB, SCB.half())


# --------------------------------------------------------------------------------------------------
# the GEMM


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_gemm_tile_equals_the_reference_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(3)
    m, n, k = 21, 37, 300  # partial tiles, K over several BLOCK_K steps
    CA, SCA, _ = quantize_int8_rows_ref(torch.randn(m, k, generator=g))
    CB, SCB = quantize_int8(torch.randn(n, k, generator=g))
    bias = torch.randn(n, generator=g)
    expect = int8_gemm_ref(CA, CB, SCA, SCB, bias, dtype)
    on = [t.to(DEVICE) for t in (CA, CB, SCA, SCB, bias)]
    for tile in [t.kwargs for t in GEMM_TILES] + [matmul_tutorial.SMALL_TILE]:
        y = int8_gemm(*on, out_dtype=dtype, tile=tile).cpu()
        assert torch.equal(y, expect), tile
    assert torch.equal(int8_gemm(*on, out_dtype=dtype).cpu(), expect)  # the autotuned kernel


def test_int32_accumulation_is_exact():
    # 2048 * 127^2, then + 127, then - 2048 * 127^2: exactly 127 in int32; a float32 sum in this
    # order would give 128 (the spacing of float32 near 3.3e7 is 4)
    CA = torch.zeros(1, 4097, dtype=torch.int8)
    CA[0, :2048], CA[0, 2048], CA[0, 2049:] = 127, 1, -127
    CB = torch.full((2, 4097), 127, dtype=torch.int8)
    scales = torch.full((2,), 127.0)  # the epilogue then multiplies by 127^2 / 127^2
    for gemm in (int8_gemm_ref, int8_gemm):
        y = gemm(CA.to(DEVICE), CB.to(DEVICE), scales[:1].to(DEVICE), scales.to(DEVICE)).cpu()
        assert y.tolist() == [[pytest.approx(127.0, abs=1e-4)] * 2]


def test_outlier_columns_run_in_16_bits():
    """One activation of 60 in a row of N(0, 1) values: in int8 its row's other values get a
    couple of codes each; taken out at threshold 6, the matmul is close to the dense one."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g) * 0.05
    x = torch.randn(32, 256, generator=g)
    x[:, 7] = 60.0
    CB, SCB = quantize_int8(w)
    dense = x @ dequantize_int8(CB, SCB).t()
    err = {t: (int8_matmul_ref(x, CB, SCB, t) - dense).abs().mean().item() for t in (0.0, 6.0)}
    assert err[6.0] < err[0.0] / 5
    y = int8_matmul(x.to(DEVICE), CB.to(DEVICE), SCB.to(DEVICE), 6.0, backend="triton").cpu()
    torch.testing.assert_close(y, int8_matmul_ref(x, CB, SCB, 6.0), atol=1e-5, rtol=1e-5)


def test_backward_input_goes_through_the_dequantized_weight():
    g = torch.Generator().manual_seed(1)
    CB, SCB = quantize_int8(torch.randn(24, 40, generator=g))
    grad_y = torch.randn(2, 3, 24, generator=g)
    expect = grad_y @ dequantize_int8(CB, SCB)
    assert torch.equal(int8_matmul_backward_input(grad_y, CB, SCB), expect)
    assert int8_matmul_backward_input(grad_y.bfloat16(), CB, SCB).dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------------
# the tutorials' checks


def test_tutorial_checks_pass_and_a_wrong_reference_shows_a_cross(capsys):
    device = torch.device(DEVICE)
    assert int8_tutorial.check(device, shapes=[(5, 33)])
    assert matmul_tutorial.check(device, shapes=[((3, 40), 20)])
    out = capsys.readouterr().out
    assert out.count("✅") == 6 + 12 and "❌" not in out

    def off_by_one(x, threshold):
        codes, absmax, cols = quantize_int8_rows_ref(x, threshold)
        codes.view(-1)[0] += 1
        return codes, absmax, cols

    assert not int8_tutorial.check(device, shapes=[(5, 33)], quantize_ref=off_by_one)
    assert not matmul_tutorial.check(device, shapes=[((3, 40), 20)],
                                     matmul_ref=lambda x, *a: int8_matmul_ref(x, *a) * 1.01)
    assert "❌" in capsys.readouterr().out
