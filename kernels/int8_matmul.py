"""y = x @ W^T as LLM.int8 computes it: int8 x int8 with int32 accumulation, a dequantizing
epilogue, and the outlier columns of x in 16 bits (Dettmers et al. 2022,
https://arxiv.org/abs/2208.07339, section 3.2, "mixed-precision decomposition").

The weight is frozen and stored as int8.py's codes CB (N, K) and row absmax SCB (N,); the input
gradient for LoRA goes through the dequantized weight (`int8_matmul_backward_input`).

Run it: `python -m minillm.kernels.int8_matmul` (GPU: check, then TFLOP/s next to bf16 cuBLAS), or
with TRITON_INTERPRET=1 on a CPU (the check only).

What you will learn here:
  * why an integer matmul is exact: products of two int8 are at most 127^2, and int32 holds the sum
    of 133 thousand of them, so the only roundings are the ones of the quantizers and the epilogue;
  * how the epilogue turns int32 back into real numbers: each output (m, n) is scaled by its row's
    and its column's absmax, SCA[m] * SCB[n] / 127^2 (an outer product of the two scale vectors);
  * why a few input columns break this and what LLM.int8 does about it: one value of 60 in a row
    whose other values are near 1 makes the row's scale 60/127, and the other values then get only
    a couple of codes each; so columns holding |x| >= threshold are taken out and multiplied in
    16 bits against their dequantized weight columns;
  * a Triton GEMM in int8 (grouped tile order, K loop, `tl.dot` into int32), as Triton's matmul
    tutorial does in fp16.

Each part is explained in a `# %%` cell right above the code it describes, as in Triton's tutorials.
"""

import torch
import triton
import triton.language as tl

from .int8 import dequantize_int8, quantize_int8_rows, quantize_int8_rows_ref
from .nf4 import autotune_configs, bf16_bits, use_triton
from .tutorial import FAIL, OK, main, print_table, time_s

# %%
# The algorithm
# -------------
#
# For x (M, K) in fp32/fp16/bf16 and the weight W (N, K) as (CB int8, SCB float32):
#
#   CA, SCA, cols = quantize_int8_rows(x, threshold)     # int8.py; cols: the outlier columns
#   acc[m, n]     = sum_k CA[m, k] * CB[n, k]            # int32, exact (CA is 0 in cols)
#   y[m, n]       = (acc * (SCA[m] * SCB[n])) * (1/127^2) (+ bias[n])   float32, rounded once to
#                                                                       x's dtype
#   y            += x[:, cols] @ dequantize_int8(CB, SCB)[:, cols]^T    in x's dtype (16 bits
#                                                                       when training in bf16)
#
# This is bitsandbytes' `int8_mixed_scaled_mm` (MatMul8bitLt's forward): the same codes, the same
# int32 sums, the same epilogue order, and the outlier part added last with `addmm`. Two
# differences, both at the level of float rounding: bitsandbytes' CPU path multiplies by
# 6.200124e-05 where 1/127^2 = 6.2000124e-05 (a slipped digit: its CUDA kernel has 6.200012e-05),
# 1.8e-5 relative; and MatMul8bitLt rounds x to float16 before quantizing it, where we quantize x
# in its own dtype (identical for bf16 values inside float16's range).
INV_127_SQ = 1.0 / (127 * 127)  # used as a float32: 6.2000124e-05
_INV_127_SQ = tl.constexpr(INV_127_SQ)

# %%
# The GEMM kernel
# ---------------
#
# Triton's matmul tutorial in int8. Each program computes a (BLOCK_M, BLOCK_N) tile of y:
#
#   acc = zeros((BLOCK_M, BLOCK_N), int32)
#   for k0 in range(0, K, BLOCK_K):
#       a = CA[m-tile, k0:k0+BLOCK_K]                   (BLOCK_M, BLOCK_K) int8, 0 past the edges
#       b = CB[n-tile, k0:k0+BLOCK_K]                   (BLOCK_N, BLOCK_K) int8, K contiguous
#       acc += a @ b^T                                  tl.dot: int8 tensor cores, int32 out
#   y-tile = epilogue(acc)                              float32, then x's dtype
#
# b is loaded as stored, K-major, and transposed in registers (tl.trans): int8 tensor cores want
# both operands K-major (Hopper's wgmma accepts no other layout for 8-bit types). Programs are
# launched in groups of GROUP_M row tiles that sweep the same column tiles, so neighbouring programs
# reuse the same tiles of CB from L2 (the tutorial's "L2 cache optimizations").
#
# As in int8.py the launch says enable_fp_fusion=False: `t * (1/127^2) + bias` must round the
# product before the add, as the reference (and bitsandbytes) do.
#
# GEMM_TILES: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M), warps and pipeline stages. The first is the
# hand-picked default for batches (training, prefill); the BLOCK_M = 16 / 32 tiles serve decode,
# where M is the batch size and the kernel is bound by reading CB (1 byte per weight, half of bf16).
GEMM_TILES = [
    triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w,
                  num_stages=s)
    for m, n, k, w, s in ((128, 128, 128, 8, 3), (64, 128, 128, 4, 4), (128, 64, 128, 4, 4),
                          (64, 64, 128, 4, 4), (32, 64, 256, 4, 4), (16, 128, 256, 4, 4))
]  # fmt: skip


@triton.jit
def _store_y(y_ptr, offsets, y, mask, Y_BF16: tl.constexpr):
    """Write float32 y in the output dtype (a bfloat16 y is seen as int16: see nf4.bf16_bits)."""
    if Y_BF16:
        tl.store(y_ptr + offsets, bf16_bits(y), mask=mask)
    else:
        tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=autotune_configs(GEMM_TILES), key=["M", "N", "K"])
@triton.jit
def _int8_matmul_kernel(
    # pointers
    a_ptr,  # *int8 (M, K)       CA: x's codes, contiguous
    b_ptr,  # *int8 (N, K)       CB: the weight's codes, contiguous
    sa_ptr,  # *fp32 (M,)        SCA: x's row absmax
    sb_ptr,  # *fp32 (N,)        SCB: the weight's row absmax
    bias_ptr,  # *fp32 (N,)      read if HAS_BIAS
    y_ptr,  # *fp32|fp16 (M, N), or bf16 seen as *int16   out
    # sizes
    M, N, K,
    # meta-parameters
    HAS_BIAS: tl.constexpr,  # add bias[n] in the epilogue
    Y_BF16: tl.constexpr,  # y is a bfloat16 tensor viewed as int16
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,  # row tiles per group (L2 reuse of CB's tiles)
):  # fmt: skip
    # grouped order: program id -> (pid_m, pid_n), GROUP_M row tiles per sweep of the column tiles
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % group_rows
    pid_n = (pid % (GROUP_M * num_n)) // group_rows

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)  # (BK,)
        a = tl.load(a_ptr + rm[:, None] * K + rk[None, :],
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0)  # (BM, BK) int8
        b = tl.load(b_ptr + rn[:, None] * K + rk[None, :],
                    mask=(rn[:, None] < N) & (rk[None, :] < K), other=0)  # (BN, BK) int8
        acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)  # (BM, BK) @ (BK, BN) -> (BM, BN)

    # the dequantizing epilogue: acc * (SCA[m] * SCB[n]) * (1/127^2), in float32
    sa = tl.load(sa_ptr + rm, mask=rm < M, other=0.0)  # (BM,)
    sb = tl.load(sb_ptr + rn, mask=rn < N, other=0.0)  # (BN,)
    y = acc.to(tl.float32) * (sa[:, None] * sb[None, :])  # (BM, BN)
    y = y * tl.full([BLOCK_M, BLOCK_N], _INV_127_SQ, tl.float32)
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rn, mask=rn < N, other=0.0)[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    _store_y(y_ptr, rm[:, None] * N + rn[None, :], y, mask, Y_BF16)


# %%
# The wrappers: check, allocate, launch
# -------------------------------------


def _check(x, CB, SCB, threshold, bias, x_name):
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{x_name} must be fp32/fp16/bf16, got {x.dtype}")
    if CB.dtype != torch.int8 or CB.dim() != 2:
        raise ValueError(f"CB must be a 2-D int8 (out, in) tensor, got {CB.dtype} "
                         f"{tuple(CB.shape)}")
    if SCB.dtype != torch.float32 or tuple(SCB.shape) != (CB.shape[0],):
        raise ValueError(f"SCB must be float32 of shape ({CB.shape[0]},), got {SCB.dtype} "
                         f"{tuple(SCB.shape)}")
    if x_name == "x" and x.shape[-1] != CB.shape[1]:
        raise ValueError(f"x has last dimension {x.shape[-1]}, expected {CB.shape[1]} "
                         f"(CB is {tuple(CB.shape)})")
    if not threshold >= 0:
        raise ValueError(f"threshold must be >= 0 (0: no outlier columns), got {threshold}")
    if bias is not None and tuple(bias.shape) != (CB.shape[0],):
        raise ValueError(f"bias must have shape ({CB.shape[0]},), got {tuple(bias.shape)}")
    if x.device != CB.device or x.device != SCB.device:
        raise ValueError(f"{x_name} on {x.device}, CB on {CB.device}, SCB on {SCB.device}")
    if CB.numel() >= 2**31 or x.numel() >= 2**31:
        raise ValueError("the int8 kernels index with int32: at most 2**31 - 1 elements per tensor")


def int8_gemm(CA, CB, SCA, SCB, bias=None, out_dtype=torch.float32, tile: dict | None = None):
    """(CA (M, K) int8, SCA (M,)) x (CB (N, K) int8, SCB (N,)) -> (M, N) in out_dtype, through the
    Triton kernel: the int32 GEMM and its epilogue (bias float32 (N,) or None). `tile`: one entry of
    GEMM_TILES' kwargs to run as is (the tests run every one); None lets the autotuner choose."""
    M, K = CA.shape
    N = CB.shape[0]
    y = torch.empty(M, N, dtype=out_dtype, device=CA.device)
    if M == 0:
        return y
    kernel = _int8_matmul_kernel if tile is None else _int8_matmul_kernel.fn  # .fn: untuned
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    y_bf16 = out_dtype == torch.bfloat16
    kernel[grid](
        CA.contiguous(), CB.contiguous(), SCA, SCB, bias if bias is not None else SCB,
        y.view(torch.int16) if y_bf16 else y, M, N, K,
        HAS_BIAS=bias is not None, Y_BF16=y_bf16, enable_fp_fusion=False, **(tile or {}),
    )  # fmt: skip
    return y


def int8_gemm_ref(CA, CB, SCA, SCB, bias=None, out_dtype=torch.float32):
    """Plain PyTorch int8_gemm: the exact integer sums, then the same epilogue.

    The sums are computed by a float64 matmul: every partial sum of K products of int8 codes is an
    integer of magnitude at most K * 127^2, which float64 holds exactly up to K = 5.6e11, in any
    summation order, so the result is the kernel's int32 accumulator to the bit; and the BLAS runs
    it several times faster than PyTorch's integer matmul on a CPU (float32 would be exact only up
    to K = 1040, and may be computed in bf16 when float32_matmul_precision is lowered).

    Memory traffic: the int8 operands are widened to float64 copies (8x their bytes) before the
    matmul, and the (M, N) result is written in float64, int32 and float32.
    """
    acc = (CA.double() @ CB.double().t()).to(torch.int32)  # (M, K) @ (K, N) -> (M, N), exact
    y = acc.float() * (SCA[:, None] * SCB[None, :]) * INV_127_SQ
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def _add_outlier_columns(y, x2, CB, SCB, cols):
    """y += x2[:, cols] @ W[:, cols]^T in x's dtype: the outlier columns, in 16 bits."""
    if cols is None or cols.numel() == 0:
        return y
    w_cols = dequantize_int8(CB[:, cols], SCB, x2.dtype)  # (N, n_cols)
    return y.addmm_(x2[:, cols], w_cols.t())  # (M, n_cols) @ (n_cols, N)


def int8_matmul(x, CB, SCB, threshold=0.0, bias=None, backend="auto"):
    """y = x @ W^T as LLM.int8 for x (..., in_features) and W (out, in) stored as (CB, SCB).

    threshold: input columns holding any |x| >= threshold go through 16 bits (0: none, as
    bitsandbytes' Linear8bitLt by default; transformers' llm_int8_threshold is 6.0). bias: (out,)
    or None, added in the float32 epilogue. y has x's dtype. `backend`: see `nf4.use_triton`.
    """
    # 1) check
    _check(x, CB, SCB, threshold, bias, "x")
    if not use_triton(x, backend):
        return int8_matmul_ref(x, CB, SCB, threshold, bias)
    x2 = x.reshape(-1, CB.shape[1])  # (M, K)
    # 2) quantize x (int8.py's kernel), 3) the int8 GEMM + epilogue, 4) the outlier columns
    CA, SCA, cols = quantize_int8_rows(x2, threshold, backend="triton")
    bias32 = bias.float().contiguous() if bias is not None else None
    y = int8_gemm(CA, CB, SCA, SCB, bias32, x.dtype)
    y = _add_outlier_columns(y, x2, CB, SCB, cols)
    return y.view(*x.shape[:-1], CB.shape[0])


def int8_matmul_ref(x, CB, SCB, threshold=0.0, bias=None):
    """Plain PyTorch int8_matmul: the reference quantizer, int8_gemm_ref, the same outlier part."""
    _check(x, CB, SCB, threshold, bias, "x")
    x2 = x.reshape(-1, CB.shape[1])  # (M, K)
    CA, SCA, cols = quantize_int8_rows_ref(x2, threshold)
    y = int8_gemm_ref(CA, CB, SCA, SCB, bias, x.dtype)
    y = _add_outlier_columns(y, x2, CB, SCB, cols)
    return y.view(*x.shape[:-1], CB.shape[0])


def int8_matmul_backward_input(grad_y, CB, SCB):
    """grad_x = grad_y @ dequantize(W) for grad_y (..., out): the input gradient, in grad_y's
    dtype, through the dequantized weight (a dense matmul: cuBLAS on a GPU). The forward's int8
    rounding of x is treated as the identity (a straight-through estimator), as bitsandbytes'
    MatMul8bitLt does for LoRA training."""
    _check(grad_y, CB, SCB, 0.0, None, "grad_y")
    if grad_y.shape[-1] != CB.shape[0]:
        raise ValueError(f"grad_y has last dimension {grad_y.shape[-1]}, expected {CB.shape[0]}")
    return grad_y @ dequantize_int8(CB, SCB, grad_y.dtype)  # (..., N) @ (N, K) -> (..., K)


# %%
# Check
# -----
#
# Every tile against the reference, on awkward shapes, with and without outlier columns.
#
# Numerics: the int32 sums are exact on both sides, and the kernel's epilogue performs the same
# float32 operations in the same order (fusion off), so without outlier columns y matches the
# reference bit for bit (tests/test_int8_kernels.py checks that). The outlier part is a 16-bit
# matmul, which a GPU sums in another order than the CPU reference: hence one ulp of tolerance.
TOLERANCE = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=1e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=8e-3),
}
DEFAULT_TILE = GEMM_TILES[0].kwargs
SMALL_TILE = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2}  # many programs, K loop


def check(device, shapes=None, matmul_ref=int8_matmul_ref) -> bool:
    """Print a ✅/❌ row per (tile, shape, dtype, threshold): the kernel's y must be within
    TOLERANCE of the reference's, computed on the CPU. Returns whether every row passed."""
    # (37, 129) x (29, 129)^T: partial tiles everywhere, K not a multiple of BLOCK_K; (1, 64) x
    # (48, 64): one row, as decoding. A GPU adds large awkward shapes and the autotuned kernel.
    if shapes is None:
        shapes = [((37, 129), 29), ((1, 64), 48)]
        if device.type == "cuda":
            shapes += [((1823, 781), 1536), ((4, 4096), 11008)]
    from .int8 import awkward_rows, quantize_int8

    rows = []
    g = torch.Generator().manual_seed(0)
    for (m, k), n in shapes:
        CB, SCB = quantize_int8(torch.randn(n, k, generator=g) * 0.02)
        bias = torch.randn(n, generator=g)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for threshold in (0.0, 6.0):
                x = awkward_rows((m, k), dtype, seed=1, outliers=True)
                expect = matmul_ref(x, CB, SCB, threshold, bias)
                tiles = [("small tile", SMALL_TILE), ("default tile", DEFAULT_TILE)]
                if device.type == "cuda":
                    tiles.append(("autotuned", None))
                for name, tile in tiles:
                    xd, CBd, SCBd = x.to(device), CB.to(device), SCB.to(device)
                    CA, SCA, cols = quantize_int8_rows(xd, threshold, backend="triton")
                    y = int8_gemm(CA, CBd, SCA, SCBd, bias.to(device), dtype, tile=tile)
                    y = _add_outlier_columns(y, xd, CBd, SCBd, cols).cpu()
                    err = (y.double() - expect.double()).abs().max().item()
                    ok = torch.allclose(y, expect, **TOLERANCE[dtype])
                    rows.append({"tile": name, "x": f"{m}x{k}", "W": f"{n}x{k}",
                                 "dtype": str(dtype)[6:], "threshold": threshold,
                                 "max |err|": f"{err:.2g}", "ok": OK if ok else FAIL})
    print_table(rows)
    return all(r["ok"] == OK for r in rows)


# %%
# Benchmark
# ---------
#
# GPU only. Prefill and training batches are compute bound: TFLOP/s of the int8 GEMM (int8 tensor
# cores run at twice the bf16 rate on A100 and H100) against bf16 cuBLAS on the dense weight, with
# and without the quantization of x and the outlier columns.


def benchmark(device, shapes=((4096, 4096, 4096), (4096, 11008, 4096), (1, 11008, 4096)),
              timer=time_s) -> None:
    """TFLOP/s of y = x @ W^T for (M, N, K) shapes: the int8 GEMM alone (x already quantized),
    int8_matmul (quantize + GEMM; threshold 0, and 6 with a few outlier columns), and bf16 cuBLAS
    on the dense weight. (`timer` lets a test run this on the interpreter.)"""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device
    print(f"\n{name}, bf16 activations, int8 weights")
    print_table([row for m, n, k in shapes for row in _benchmark_shape(device, m, n, k, timer)])


def _benchmark_shape(device, m, n, k, timer) -> list[dict]:
    from .int8 import quantize_int8

    w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
    CB, SCB = quantize_int8(w)
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    x[:, :: max(1, k // 4)] *= 10  # a few outlier columns past 6
    CA, SCA, _ = quantize_int8_rows(x, 0.0, backend="triton")
    cases = {
        "int8 GEMM + epilogue": lambda: int8_gemm(CA, CB, SCA, SCB, None, torch.bfloat16),
        "int8_matmul, threshold 0": lambda: int8_matmul(x, CB, SCB, 0.0, backend="triton"),
        "int8_matmul, threshold 6": lambda: int8_matmul(x, CB, SCB, 6.0, backend="triton"),
        "bf16 x @ W^T (cuBLAS)": lambda: x @ w.t(),
    }
    rows = []
    for what, fn in cases.items():
        fn()  # the autotuner times its tiles on the first call
        seconds = timer(fn)
        rows.append({"M x N x K": f"{m}x{n}x{k}", "what": what, "us": f"{seconds * 1e6:.0f}",
                     "TFLOP/s": f"{2 * m * n * k / seconds / 1e12:.1f}"})
    return rows


if __name__ == "__main__":
    main(check, benchmark, "minillm.kernels.int8_matmul")
