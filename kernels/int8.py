"""LLM.int8 row-wise quantization: int8 codes and one float32 scale per row, bit for bit as
bitsandbytes stores them.

A runnable tutorial:

    python -m minillm.kernels.int8                     # GPU: check against the reference, then GB/s
    TRITON_INTERPRET=1 python -m minillm.kernels.int8  # CPU: the check only, interpreted

LLM.int8() (Dettmers et al. 2022, https://arxiv.org/abs/2208.07339, sections 3.1-3.2) stores each
row of a weight as 8-bit integers scaled by the row's largest magnitude, and quantizes the
activations the same way, row by row, right before every matmul (kernels/int8_matmul.py).

What you will learn here:
  * absmax ("vector-wise") quantization: 127 / max|row| maps a row onto [-127, 127];
  * why the rounding must be spelled out to the last bit (PyTorch's 127.0 / absmax once per row, a
    float32 product, round half to even) to match bitsandbytes' codes exactly;
  * how round-half-to-even is written with two float32 adds, and why the compiler must then be told
    not to fuse the multiply into the add (`enable_fp_fusion=False`);
  * the outlier threshold: the few activation columns holding |x| >= threshold are left out of the
    scale and computed in 16 bits instead (the paper's mixed-precision decomposition).

Each part is explained in a `# %%` cell right above the code it describes, as in Triton's tutorials.
"""

import torch
import triton
import triton.language as tl

from .nf4 import use_triton
from .tutorial import FAIL, OK, copy_gbs, main, print_table, time_s

# %%
# The format
# ----------
#
# Bit for bit `bitsandbytes.functional.int8_vectorwise_quant(A, threshold)` on its CPU path (checked
# against bitsandbytes 0.50.2, tests/data/bnb_int8_golden.safetensors), for A (..., K) in
# float32, float16 or bfloat16, seen as M = numel / K rows:
#
#   outlier      = |a| >= threshold                  (only when threshold > 0; the paper's X_F16)
#   absmax[m]    = max |a| over row m, outliers left out (float32)        -> SCB, or SCA for x
#   scale[m]     = (1 / absmax[m]) * 127             (float32: a correctly rounded reciprocal,
#                                                     then a rounded product, once per row)
#   v            = a * scale[m]                      (float32 product, rounded)
#   code         = round_half_to_even(v)             (int8 in [-127, 127])   -> CB, or CA for x
#                  0 where v is not finite: a row of zeros (0 * inf) or one so tiny that 127/absmax
#                  overflows (bitsandbytes' float -> int8 cast gives 0 there on x86)
#   codes of every outlier COLUMN (a column holding any outlier) are 0; the non-outlier values of
#   such a column still count in their row's absmax, as in bitsandbytes
#
# Why "(1 / absmax) * 127" and not a correctly rounded 127 / absmax: bitsandbytes writes
# `127.0 / row_stats`, and PyTorch evaluates a number divided by a tensor as
# `tensor.reciprocal() * number` (Tensor.__rtruediv__). The two differ in the last bit for about one
# row in ten, which moves a code whenever a product then lands near a .5.
#
# Dequantize (`int8_vectorwise_dequant`): w = (code * absmax) * (1/127) in float32, two rounded
# products, then rounded once to the output dtype. The scale is the row's absmax itself (SCB), not
# 127 / absmax: that is what bitsandbytes stores and what Linear8bitLt's state_dict holds.
INV_127 = 1.0 / 127  # used as a float32: 0.007874015718698502, bitsandbytes' constant
CODE_LIMIT = 128.0  # |v| < 128 for every finite row (v <= 127 * (1 + 2**-24)); inf and NaN fail it
# Adding then subtracting 1.5 * 2**23 rounds a float32 |v| < 2**22 to an integer, ties to even: at
# that magnitude the float32 spacing is exactly 1, so the add itself does the rounding.
ROUND_MAGIC = 12582912.0
# The same constants as compile-time values, for use inside the kernel.
_CODE_LIMIT = tl.constexpr(CODE_LIMIT)
_ROUND_MAGIC = tl.constexpr(ROUND_MAGIC)


# %%
# The kernel
# ----------
#
# One program quantizes BLOCK_M rows, walking along them BLOCK_K columns at a time, in two passes:
#
#   for each program p:
#       rows = p*BLOCK_M ... p*BLOCK_M + BLOCK_M - 1
#       pass 1: absmax = max over the row of |x|   (0 for |x| >= threshold)        # (BLOCK_M,)
#       scale  = div_rn(1, absmax) * 127                                          # inf: zero row
#       pass 2: v = x * scale; code = (v + MAGIC) - MAGIC   (0 if |v| >= 128)      # (BM, BK)
#               code = 0 in outlier columns; store as int8
#
# The second pass reads the rows again (from L2 for any row that fits). A row is split over
# several loop steps, so the whole row never has to sit in registers; the second read is the price.
#
# Why `enable_fp_fusion=False` at the launch: by default the compiler turns `x * scale + MAGIC` into
# one fused multiply-add, which rounds the product only once, together with the add, and that
# changes the code of a product that lands within half an ulp of a .5 boundary. The format rounds
# the product first, so the kernel is compiled with fusion off (ptxas --fmad=false).


# bfloat16 inputs are read through an int16 view and widened by hand (bits << 16), which is exact
# everywhere: Triton's CPU interpreter widens bfloat16 subnormals wrongly (a row of 1e-39 values got
# absmax 1.03e-38 instead of 2.48e-39), while a GPU's conversion is the same shift.


@triton.jit
def _load_f32(ptr, mask, X_BF16: tl.constexpr):
    """Load x (masked lanes 0) as float32; a bfloat16 x is seen as int16 (see above)."""
    if X_BF16:
        bits = tl.load(ptr, mask=mask, other=0).to(tl.int32) << 16
        return bits.to(tl.float32, bitcast=True)
    return tl.load(ptr, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _int8_quantize_rows_kernel(
    # pointers
    x_ptr,  # *fp32|fp16 (M, K), or bf16 seen as *int16: the rows, row stride stride_xm
    codes_ptr,  # *int8 (M, K)         out: codes, contiguous
    absmax_ptr,  # *fp32 (M,)          out: max |x| per row (outliers left out)
    outlier_col_ptr,  # *int8 (K,)     1 where the column holds an outlier (read if HAS_OUTLIERS)
    threshold,  # fp32                 |x| >= threshold is an outlier (used if HAS_OUTLIERS)
    # sizes
    M,  # rows
    K,  # row length
    stride_xm,  # elements between rows of x
    # meta-parameters
    HAS_OUTLIERS: tl.constexpr,  # threshold > 0
    X_BF16: tl.constexpr,  # x is a bfloat16 tensor viewed as int16
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_K: tl.constexpr,  # columns per loop step
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    row_ok = rows < M
    zero = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)

    # pass 1: the absmax of each row, outliers left out
    amax = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)  # (BK,)
        mask = row_ok[:, None] & (cols < K)[None, :]
        a = tl.abs(_load_f32(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask, X_BF16))
        if HAS_OUTLIERS:
            a = tl.where(a >= threshold, zero, a)
        amax = tl.maximum(amax, tl.max(a, axis=1))
    tl.store(absmax_ptr + rows, amax, mask=row_ok)

    # one correctly rounded reciprocal per row (div_rn: Triton's plain `/` is approximate on GPUs),
    # times 127: PyTorch's `127.0 / absmax`, as bitsandbytes computes it
    one = tl.full([BLOCK_M], 1.0, tl.float32)
    scale = tl.math.div_rn(one, amax) * tl.full([BLOCK_M], 127.0, tl.float32)  # (BM,), inf: 0 row
    magic = tl.full([BLOCK_M, BLOCK_K], _ROUND_MAGIC, tl.float32)
    limit = tl.full([BLOCK_M, BLOCK_K], _CODE_LIMIT, tl.float32)

    # pass 2: the codes
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = row_ok[:, None] & (cols < K)[None, :]
        x = _load_f32(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask, X_BF16)
        v = x * scale[:, None]  # (BM, BK), rounded to float32
        code = tl.where(tl.abs(v) < limit, (v + magic) - magic, zero)
        if HAS_OUTLIERS:
            outlier = tl.load(outlier_col_ptr + cols, mask=cols < K, other=0)  # (BK,)
            code = tl.where((outlier != 0)[None, :], zero, code)
        tl.store(codes_ptr + rows[:, None] * K + cols[None, :], code.to(tl.int8), mask=mask)


# %%
# The wrappers
# ------------
#
# `quantize_int8_rows` is LLM.int8's quantizer, for activations: it also finds the outlier columns
# (a column reduction, done by PyTorch before the launch: it is one pass over x and gives the
# kernel a (K,) mask). `quantize_int8` is the weight format alone: no threshold, and NaN or inf is
# an error (a poisoned row would silently become zeros). Each checks its arguments, allocates and
# launches. Element indices are int32 inside the kernel: at most 2**31 - 1 elements.

QUANT_BLOCK_M = 8  # rows per program: decode (M = 1) wastes 7 of them, a batch keeps all busy


def _check_rows(x: torch.Tensor, threshold: float, name: str) -> None:
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{name} takes fp32/fp16/bf16 tensors, got {x.dtype}")
    if x.dim() == 0 or x.numel() == 0:
        raise ValueError(f"{name} needs a non-empty tensor of shape (..., K), got {tuple(x.shape)}")
    if not threshold >= 0:  # NaN fails too
        raise ValueError(f"{name}: threshold must be >= 0 (0: no outliers), got {threshold}")
    if x.numel() >= 2**31:
        raise ValueError(f"{name} indexes with int32: at most 2**31 - 1 elements, got {x.numel()}")


def outlier_columns(x2: torch.Tensor, threshold: float) -> torch.Tensor:
    """The columns of x2 (M, K) holding any |x| >= threshold, as sorted int64 indices (a device ->
    host sync on a GPU: the count decides the shapes that follow)."""
    return torch.nonzero((x2.abs() >= threshold).any(dim=0)).view(-1)


def quantize_int8_rows(x: torch.Tensor, threshold: float = 0.0, backend: str = "auto"):
    """LLM.int8's row-wise quantizer: `bitsandbytes.functional.int8_vectorwise_quant(x, threshold)`.

    x (..., K) fp32/fp16/bf16. Returns (codes int8 (..., K), absmax float32 (...), outlier_cols):
    outlier_cols is None for threshold 0, else the int64 indices of the columns (of x seen as
    (M, K)) holding any |x| >= threshold, possibly empty. See the format cell above INV_127.
    `backend`: "auto" | "triton" | "torch" (nf4.use_triton).
    """
    # 1) check
    _check_rows(x, threshold, "quantize_int8_rows")
    if not use_triton(x, backend):
        return quantize_int8_rows_ref(x, threshold)
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    cols = outlier_columns(x2, threshold) if threshold > 0 else None
    # 2) allocate
    codes = torch.empty(M, K, dtype=torch.int8, device=x.device)
    absmax = torch.empty(M, dtype=torch.float32, device=x.device)
    outlier_col = torch.zeros(K if cols is not None else 1, dtype=torch.int8, device=x.device)
    if cols is not None:
        outlier_col[cols] = 1
    # 3) launch: BLOCK_M rows per program, up to 1024 columns per step
    grid = (triton.cdiv(M, QUANT_BLOCK_M),)
    x_bf16 = x.dtype == torch.bfloat16
    _int8_quantize_rows_kernel[grid](
        x2.view(torch.int16) if x_bf16 else x2, codes, absmax, outlier_col, float(threshold), M,
        K, x2.stride(0), HAS_OUTLIERS=cols is not None, X_BF16=x_bf16, BLOCK_M=QUANT_BLOCK_M,
        BLOCK_K=min(1024, triton.next_power_of_2(K)), enable_fp_fusion=False,
    )  # fmt: skip
    return codes.view(x.shape), absmax.view(x.shape[:-1]), cols


def quantize_int8_rows_ref(x: torch.Tensor, threshold: float = 0.0):
    """Plain-PyTorch quantize_int8_rows: the same rules, on any device.

    Memory traffic: reads x twice and writes K + 4 bytes per row, but materialises a float32 copy
    of x and the scaled values (about 8 bytes per element of temporaries).
    """
    _check_rows(x, threshold, "quantize_int8_rows_ref")
    K = x.shape[-1]
    x2 = x.detach().reshape(-1, K)  # (M, K)
    cols = None
    if threshold > 0:
        outliers = x2.abs() >= threshold
        cols = torch.nonzero(outliers.any(dim=0)).view(-1)
        x2 = x2.masked_fill(outliers, 0)
    absmax = x2.abs().amax(dim=1).float()  # (M,): exact in x's dtype, then widened
    scale = absmax.reciprocal() * 127.0  # (M,): what `127.0 / absmax` computes in PyTorch
    v = x2.float() * scale[:, None]  # (M, K) float32
    codes = torch.where(v.abs() < CODE_LIMIT, v.round(), 0.0).to(torch.int8)  # round: half to even
    if cols is not None:
        codes[:, cols] = 0
    return codes.view(x.shape), absmax.view(x.shape[:-1]), cols


def quantize_int8(w: torch.Tensor, backend: str = "auto"):
    """LLM.int8 weight format: w (out, in) -> (CB int8 (out, in), SCB float32 (out,)), bit for bit
    `bitsandbytes.functional.int8_vectorwise_quant(w)[:2]` (no threshold: weights have no outlier
    columns; the outliers LLM.int8 cares about are in the activations).

    Raises ValueError for NaN or inf weights (they would zero their row), for anything but a 2-D
    fp32/fp16/bf16 tensor, and for an empty one.
    """
    if w.dim() != 2:
        raise ValueError(f"quantize_int8 wants a 2-D (out, in) weight, got {tuple(w.shape)}")
    _check_rows(w, 0.0, "quantize_int8")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("quantize_int8: the weight holds NaN or inf; they cannot be quantized")
    codes, absmax, _ = quantize_int8_rows(w, 0.0, backend)
    return codes, absmax


def dequantize_int8(CB: torch.Tensor, SCB: torch.Tensor, dtype: torch.dtype = torch.float32):
    """The dense (out, in) weight: (CB * SCB) * (1/127) in float32, rounded once to `dtype`;
    bitsandbytes' `int8_vectorwise_dequant` for float32.

    Plain PyTorch on every device: two multiplies per element stream at memory speed as they are,
    and a kernel would add code without making anything faster that matters (it runs once per
    backward pass, before the matmul of grad_x, and once per merge). Reads 1 + 4/in bytes per
    weight and writes sizeof(dtype), with one float32 temporary.
    """
    if CB.dtype != torch.int8 or CB.dim() != 2:
        raise ValueError(f"CB must be a 2-D int8 tensor, got {CB.dtype} {tuple(CB.shape)}")
    if SCB.dtype != torch.float32 or tuple(SCB.shape) != (CB.shape[0],):
        raise ValueError(f"SCB must be float32 of shape ({CB.shape[0]},) for CB "
                         f"{tuple(CB.shape)}, got {SCB.dtype} {tuple(SCB.shape)}")
    if CB.device != SCB.device:
        raise ValueError(f"CB is on {CB.device} but SCB is on {SCB.device}")
    return ((CB.float() * SCB[:, None]) * INV_127).to(dtype)  # (out, in)


# %%
# Check
# -----
#
# The kernel against the reference, bit for bit, on awkward shapes.


def awkward_rows(shape, dtype, seed=0, device="cpu", outliers=False) -> torch.Tensor:
    """Rows to quantize. outliers=False: Gaussian rows whose scale grows from 1e-3 to 1e3 down the
    rows, the last row huge (1e30, or 6e4 in float16) and row 1 all zeros: tiny and huge rows and
    the zero row get exercised. outliers=True: activations as LLM.int8 sees them, N(0, 1) with two
    columns holding a few values past a threshold of 6 (one exactly on it)."""
    g = torch.Generator().manual_seed(seed)
    m, k = shape
    if outliers:
        x = torch.randn(m, k, generator=g)
        x[: max(1, m // 3), k // 2] = -20.0
        x[m - 1, min(2, k - 1)] = 6.0  # exactly on the threshold: an outlier (|x| >= threshold)
        return x.to(dtype).to(device)
    x = torch.randn(m, k, generator=g) * (10.0 ** torch.linspace(-3, 3, m))[:, None]
    if m > 2:
        x[-1] *= 6e4 / 1e3 if dtype == torch.float16 else 1e27
    if m > 1:
        x[1] = 0.0
    return x.to(dtype).to(device)


def check(device, shapes=None, quantize_ref=quantize_int8_rows_ref) -> bool:
    """Print a ✅/❌ row per (shape, dtype, threshold): the kernel's codes and absmax must equal the
    reference's exactly, and the outlier columns be the same. The reference runs on the CPU.
    Returns whether every row passed."""
    # (37, 129): rows in several programs, a partial column step; (1, 1): one element; (3, 5): a
    # partial program; (17, 2100): a row over three column steps. A GPU adds a large shape.
    if shapes is None:
        shapes = [(37, 129), (1, 1), (3, 5), (17, 2100)]
        if device.type == "cuda":
            shapes.append((1823, 4097))
    rows = []
    for shape in shapes:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for threshold in (0.0, 6.0):
                x = awkward_rows(shape, dtype, outliers=threshold > 0)
                codes, absmax, cols = quantize_int8_rows(x.to(device), threshold, "triton")
                ref_codes, ref_absmax, ref_cols = quantize_ref(x, threshold)
                bad = (int((codes.cpu() != ref_codes).sum())
                       + int((absmax.cpu() != ref_absmax).sum()))
                same_cols = (cols is None and ref_cols is None) or (
                    cols is not None and ref_cols is not None and torch.equal(cols.cpu(), ref_cols))
                ok = bad == 0 and same_cols
                rows.append({"shape": "x".join(map(str, shape)), "dtype": str(dtype)[6:],
                             "threshold": threshold, "mismatches": bad,
                             "outlier cols": "–" if cols is None else cols.numel(),
                             "ok": OK if ok else FAIL})
    print_table(rows)
    return all(r["ok"] == OK for r in rows)


# %%
# Benchmark
# ---------
#
# GPU only: the quantizer streams (read 2 bytes, write 1 per element), so GB/s against a device
# copy is the figure of merit.


def benchmark(device, shape=(4096, 4096), timer=time_s, copy_bytes=2**30) -> None:
    """GB/s of the quantizer on bf16 rows (a 4096-token batch of a 7B model's hidden states),
    Triton vs the reference, beside the copy roofline; without and with the outlier threshold.
    Bytes moved: read 2n, write n + 4 per row (the second pass is not counted: it is the kernel's
    cost to pay). (`timer` and `copy_bytes` let a test run this on the interpreter with a fake
    clock.)"""
    x = torch.randn(shape, device=device, dtype=torch.bfloat16)
    n = x.numel()
    moved = 3 * n + 4 * shape[0]
    cases = {
        "quantize_int8_rows (Triton)": lambda: quantize_int8_rows(x, 0.0, "triton"),
        "quantize_int8_rows, threshold 6 (Triton)": lambda: quantize_int8_rows(x, 6.0, "triton"),
        "quantize_int8_rows_ref (PyTorch)": lambda: quantize_int8_rows_ref(x),
    }
    roofline = copy_gbs(device, copy_bytes, timer)
    rows = [{"what": "device copy (the roofline)", "us": "", "GB/s": f"{roofline:.0f}",
             "of roofline": "100%"}]
    for name, fn in cases.items():
        fn()
        seconds = timer(fn)
        gbs = moved / seconds / 1e9
        rows.append({"what": name, "us": f"{seconds * 1e6:.0f}", "GB/s": f"{gbs:.0f}",
                     "of roofline": f"{gbs / roofline:.0%}"})
    print(f"\n{torch.cuda.get_device_name(device) if device.type == 'cuda' else device}, "
          f"{shape[0]}x{shape[1]} bf16 rows")
    print_table(rows)


if __name__ == "__main__":
    main(check, benchmark, "minillm.kernels.int8")
