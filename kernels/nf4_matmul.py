"""y = x @ W^T with W in NF4 (see nf4.py): the matmul of a QLoRA base layer, and its input gradient.

The weight is frozen (QLoRA): there is no gradient for packed/absmax, only for x.

Run it: `python -m minillm.kernels.nf4_matmul` (GPU: check, then GB/s next to the copy roofline), or
with TRITON_INTERPRET=1 on a CPU (the check only).

What you will learn here:
  * why decoding one token is memory bound: each weight is used once per generated token, so the
    time is the time to read the weight, and reading 4.5 bits instead of 16 makes it up to 3.5x
    faster;
  * how to dequantize inside a kernel: gather a byte, shift out a nibble, look it up, scale it;
  * why a large batch is better served by "dequantize, then cuBLAS": at 2048 rows the matmul is
    compute bound, and a one-off dequantization (n/2 bytes in, 2n out) is cheap next to 2*M*n FLOPs
    on tensor cores.

Each part is explained in a `# %%` cell right above the code it describes, as in Triton's tutorials.
"""

import torch
import triton
import triton.language as tl

from .nf4 import (
    autotune_configs,
    bf16_bits,
    dequantize_nf4,
    dequantize_nf4_ref,
    nf4_code,
    quantize_nf4,
    quantize_nf4_ref,
    round_to_bf16,
    use_triton,
)
from .tutorial import FAIL, OK, copy_gbs, main, print_table, time_s

# %%
# Two paths
# ---------
#
# The path is chosen by the number of input rows M (`choose_path`, threshold GEMV_MAX_ROWS):
#
#   (a) M <= GEMV_MAX_ROWS: a fused GEMV kernel, in two versions that this file builds one after
#       the other (the plain loop, then the paired loop, below).
#   (b) M > GEMV_MAX_ROWS: W = dequantize_nf4(..., dtype=x.dtype) (Triton), then torch.matmul
#       (cuBLAS). The dense W is a temporary of N_out * K elements that is freed after the call.
GEMV_MAX_ROWS = 16  # input rows up to which the fused GEMV kernel beats dequantize + cuBLAS


def choose_path(m_rows: int) -> str:
    """'gemv' (fused kernel, reads 4.5 bits per weight) for few rows, else 'dequant_matmul'.

    Decode steps (M = batch size, usually 1..16) are bound by reading the weight, so the fused
    kernel wins; prefill and training batches (M in the thousands) are bound by FLOPs, so
    tensor-core cuBLAS on a dequantized copy wins.
    """
    return "gemv" if m_rows <= GEMV_MAX_ROWS else "dequant_matmul"


# %%
# The fused GEMV
# --------------
#
# Each program owns BLOCK_O outputs of one row of x. Both loops below make each weight with
# `_weight` and write y with `_store`.


@triton.jit
def _weight(code_ptr, q, scale, x_ptr, X_BF16: tl.constexpr):
    """The weight the reference multiplies by: code[q] * absmax in float32, rounded once to x's
    dtype."""
    w = tl.load(code_ptr + q) * scale
    if X_BF16:
        w = round_to_bf16(w)
    else:
        w = w.to(x_ptr.dtype.element_ty).to(tl.float32)
    return w


@triton.jit
def _store(y_ptr, offsets, acc, mask, X_BF16: tl.constexpr):
    """Write float32 acc to y in x's dtype (a bfloat16 y is seen as int16: see nf4.bf16_bits)."""
    if X_BF16:
        tl.store(y_ptr + offsets, bf16_bits(acc), mask=mask)
    else:
        tl.store(y_ptr + offsets, acc.to(y_ptr.dtype.element_ty), mask=mask)


# %%
# 1. The plain GEMV
# -----------------
#
# `_gemv_plain`, for any shape. Each weight finds its own byte, nibble and scale from its flat
# index:
#
#   acc[BLOCK_O] = 0                                    (float32)
#   for r0 in range(0, N_red, BLOCK_R):
#       f      = flat weight index of (o, r)             # (BLOCK_O, BLOCK_R): o*K + r, or r*K + o
#       byte   = packed[f // 2];  q = byte >> 4 if f is even else byte & 15
#       w      = code[q] * absmax[f // blocksize]        # blocks are cut on the FLAT index, so a
#                                                        # block may straddle two rows of W
#       w      = round(w to x.dtype)                     # the value the reference multiplies by
#       acc   += sum_r w * x[m, r]                       # broadcast-multiply + tl.sum (no tl.dot:
#                                                        # M is tiny and tl.dot needs >= 16 rows)
#   y[m, o] = acc
#
# With TRANS_W=True the same kernels compute grad_x = grad_y @ W (reduction over the output
# features), so the backward pass also reads only the packed weight.


@triton.jit
def _gemv_plain(
    x_row, y_row,  # *x.dtype: this program's input row (N_RED,) and output row (N_OUT,)
    packed_ptr, absmax_ptr, code_ptr,  # the NF4 weight W (out_features, in_features), the codebook
    pid_o,  # this program computes outputs pid_o * BLOCK_O ... + BLOCK_O - 1
    N_OUT, N_RED, K,  # outputs, reduction length, row length of W
    BLOCKSIZE: tl.constexpr, TRANS_W: tl.constexpr, X_BF16: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """y[o] = sum_r W[o, r] x[r], or sum_r W[r, o] x[r] with TRANS_W, one gathered nibble per
    weight."""
    o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)  # (BLOCK_O,)
    acc = tl.zeros([BLOCK_O], dtype=tl.float32)
    for r0 in range(0, N_RED, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
        xr = tl.load(x_row + r, mask=r < N_RED, other=0.0).to(tl.float32)
        if TRANS_W:
            f = r[None, :] * K + o[:, None]  # (BLOCK_O, BLOCK_R) flat index of W[r, o]
        else:
            f = o[:, None] * K + r[None, :]  # (BLOCK_O, BLOCK_R) flat index of W[o, r]
        mask = (o[:, None] < N_OUT) & (r[None, :] < N_RED)
        byte = tl.load(packed_ptr + f // 2, mask=mask, other=0).to(tl.int32)
        q = (byte >> ((1 - (f & 1)) * 4)) & 15  # even flat index -> high nibble
        scale = tl.load(absmax_ptr + f // BLOCKSIZE, mask=mask, other=0.0)
        w = _weight(code_ptr, q, scale, x_row, X_BF16)  # (BLOCK_O, BLOCK_R)
        acc += tl.sum(w * xr[None, :], axis=1)
    _store(y_row, o, acc, o < N_OUT, X_BF16)


# %%
# 2. The paired GEMV
# ------------------
#
# `_gemv_paired` (and `_gemv_paired_t` for TRANS_W), for rows of even length K (every real model).
# Byte o*K/2 + j holds W[o, 2j] (high nibble) and W[o, 2j + 1]: two neighbours in one row and one
# quantization block. Loading each byte once for its two weights makes addresses and masks
# contiguous in j, so the compiler turns 16 one-byte loads per thread into two 8-byte vector loads
# (seen in the PTX for sm_90), and the scale is loaded once per byte instead of once per weight:
#
#   for r0 in range(0, K, BLOCK_R):
#       j      = r0/2 ... r0/2 + BLOCK_R/2 - 1           # byte columns of the rows o
#       byte   = packed[o*K/2 + j]                        # (BLOCK_O, BLOCK_R/2), contiguous in j
#       scale  = absmax[(o*K + 2j) // blocksize]
#       acc   += sum_j code[byte >> 4]*scale * x[2j] + code[byte & 15]*scale * x[2j + 1]


@triton.jit
def _gemv_paired(
    x_row, y_row,  # *x.dtype: this program's input row (K,) and output row (N_OUT,)
    packed_ptr, absmax_ptr, code_ptr,  # the NF4 weight W (N_OUT, K) and the codebook
    pid_o,  # this program computes outputs pid_o * BLOCK_O ... + BLOCK_O - 1
    N_OUT, K,  # outputs, row length of W (= the reduction length here; even)
    BLOCKSIZE: tl.constexpr, X_BF16: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """y[o] = sum_r W[o, r] x[r], reading byte j of row o once for W[o, 2j] (high nibble) and
    W[o, 2j + 1]."""
    o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)  # (BLOCK_O,)
    acc = tl.zeros([BLOCK_O], dtype=tl.float32)
    for r0 in range(0, K, BLOCK_R):
        j = r0 // 2 + tl.arange(0, BLOCK_R // 2)  # (BLOCK_R/2,) byte columns: weights 2j and 2j + 1
        x_even = tl.load(x_row + 2 * j, mask=j < K // 2, other=0.0).to(tl.float32)
        x_odd = tl.load(x_row + 2 * j + 1, mask=j < K // 2, other=0.0).to(tl.float32)
        mask = (o[:, None] < N_OUT) & (j[None, :] < K // 2)
        # contiguous bytes along a row (so the loads can be vectorized): byte o*K/2 + j
        byte = tl.load(packed_ptr + o[:, None] * (K // 2) + j[None, :],
                       mask=mask, other=0).to(tl.int32)
        scale = tl.load(absmax_ptr + (o[:, None] * K + 2 * j[None, :]) // BLOCKSIZE,
                        mask=mask, other=0.0)
        w_even = _weight(code_ptr, byte >> 4, scale, x_row, X_BF16)  # (BLOCK_O, BLOCK_R/2)
        w_odd = _weight(code_ptr, byte & 15, scale, x_row, X_BF16)
        acc += tl.sum(w_even * x_even[None, :] + w_odd * x_odd[None, :], axis=1)
    _store(y_row, o, acc, o < N_OUT, X_BF16)


@triton.jit
def _gemv_paired_t(
    x_row, y_row,  # *x.dtype: this program's input row (N_RED,) and output row (K,)
    packed_ptr, absmax_ptr, code_ptr,  # the NF4 weight W (N_RED, K) and the codebook
    pid_o,  # this program computes outputs pid_o * BLOCK_O ... + BLOCK_O - 1
    N_RED, K,  # reduction length (rows of W), row length of W (= the outputs here; even)
    BLOCKSIZE: tl.constexpr, X_BF16: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """y[o] = sum_r W[r, o] x[r] (grad_x): outputs 2p and 2p + 1 share byte p of every row r."""
    p = pid_o * (BLOCK_O // 2) + tl.arange(0, BLOCK_O // 2)  # (BLOCK_O/2,) output pairs
    p_ok = p < K // 2
    acc_even = tl.zeros([BLOCK_O // 2], dtype=tl.float32)
    acc_odd = tl.zeros([BLOCK_O // 2], dtype=tl.float32)
    for r0 in range(0, N_RED, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
        xr = tl.load(x_row + r, mask=r < N_RED, other=0.0).to(tl.float32)
        mask = p_ok[:, None] & (r[None, :] < N_RED)
        # byte r*K/2 + p holds W[r, 2p] and W[r, 2p + 1]: contiguous along the outputs
        byte = tl.load(packed_ptr + r[None, :] * (K // 2) + p[:, None],
                       mask=mask, other=0).to(tl.int32)
        scale = tl.load(absmax_ptr + (r[None, :] * K + 2 * p[:, None]) // BLOCKSIZE,
                        mask=mask, other=0.0)
        acc_even += tl.sum(_weight(code_ptr, byte >> 4, scale, x_row, X_BF16) * xr[None, :], axis=1)
        acc_odd += tl.sum(_weight(code_ptr, byte & 15, scale, x_row, X_BF16) * xr[None, :], axis=1)
    _store(y_row, 2 * p, acc_even, p_ok, X_BF16)
    _store(y_row, 2 * p + 1, acc_odd, p_ok, X_BF16)


# %%
# The kernel the autotuner launches
# ---------------------------------
#
# Which loop and which tile are fastest depends on the GPU and the shape, so the kernel the
# autotuner launches (`_nf4_gemv_kernel`) is a switch on PAIRED over the two loops above, and
# GEMV_TILES lists tiles of both: plain and paired tiles race.
#
# GEMV tiles: BLOCK_O outputs x BLOCK_R reduction elements per loop step, the warps, and PAIRED
# (which loop). Decode is memory bound: what matters is enough bytes in flight per SM (more
# programs, wider steps) without spilling registers, and for TRANS_W (where outputs are the
# contiguous axis of W) a wide BLOCK_O for coalescing. The best tile depends on the GPU and the
# shape, so the autotuner times these on the first call per (shape, direction) and keeps the
# fastest; the first is the hand-picked default.
GEMV_TILES = [
    triton.Config({"BLOCK_O": o, "BLOCK_R": r, "PAIRED": paired}, num_warps=w)
    for paired, tiles in (
        (False, ((16, 256, 4), (8, 512, 4), (4, 1024, 8), (32, 128, 4), (64, 64, 4))),
        (True, ((16, 256, 4), (8, 512, 4), (4, 1024, 8), (8, 1024, 8), (2, 2048, 8), (32, 128, 4),
                (64, 64, 4), (128, 32, 4))),
    )
    for o, r, w in tiles
]  # fmt: skip


def _drop_paired_tiles_for_odd_rows(configs, named_args, **kwargs):
    """PAIRED tiles need an even row length K: then the two codes of every byte are neighbours
    within one row of W (and one quantization block, as BLOCKSIZE is even)."""
    if named_args["K"] % 2 == 0:
        return configs
    return [c for c in configs if not c.kwargs["PAIRED"]]


# %%
# Grid (ceil(N_out / BLOCK_O), M): program (pid_o, m) runs one of the loops above on row m of x.
# For M > 1 the M programs of one output tile read the same bytes; after the first they come from
# L2.


@triton.autotune(
    configs=autotune_configs(GEMV_TILES),
    key=["N_OUT", "N_RED", "TRANS_W"],
    prune_configs_by={"early_config_prune": _drop_paired_tiles_for_odd_rows},
)
@triton.jit
def _nf4_gemv_kernel(
    # pointers
    x_ptr,  # *fp32|fp16|bf16 (M, N_red)   input rows
    packed_ptr,  # *uint8 (ceil(N*K/2),)   NF4 codes of W (out_features, in_features), flattened
    absmax_ptr,  # *fp32 (ceil(N*K/bs),)   per-block scales
    code_ptr,  # *fp32 (16,)              NF4 codebook
    y_ptr,  # *same as x (M, N_out)       output rows (bfloat16 seen as int16)
    # sizes
    N_OUT,  # outputs per row: out_features (forward) or in_features (TRANS_W)
    N_RED,  # reduction length: in_features (forward) or out_features (TRANS_W)
    K,  # in_features: the row length of W, for flat indices
    # strides (elements)
    stride_xm,
    stride_ym,
    # meta-parameters
    BLOCKSIZE: tl.constexpr,  # NF4 block size
    TRANS_W: tl.constexpr,  # False: y = x @ W^T;  True: y = x @ W
    X_BF16: tl.constexpr,  # x is bfloat16: round weights to bf16 by hand (see nf4.round_to_bf16)
    BLOCK_O: tl.constexpr,  # outputs per program
    BLOCK_R: tl.constexpr,  # reduction step
    PAIRED: tl.constexpr,  # K even: load each byte (and its scale) once for its two weights
):
    pid_o = tl.program_id(0)
    m = tl.program_id(1)
    x_row = x_ptr + m * stride_xm
    y_row = y_ptr + m * stride_ym
    if not PAIRED:
        _gemv_plain(x_row, y_row, packed_ptr, absmax_ptr, code_ptr, pid_o, N_OUT, N_RED, K,
                    BLOCKSIZE, TRANS_W, X_BF16, BLOCK_O, BLOCK_R)  # fmt: skip
    elif not TRANS_W:
        _gemv_paired(x_row, y_row, packed_ptr, absmax_ptr, code_ptr, pid_o, N_OUT, K,
                     BLOCKSIZE, X_BF16, BLOCK_O, BLOCK_R)  # fmt: skip
    else:
        _gemv_paired_t(x_row, y_row, packed_ptr, absmax_ptr, code_ptr, pid_o, N_RED, K,
                       BLOCKSIZE, X_BF16, BLOCK_O, BLOCK_R)  # fmt: skip


# %%
# The wrappers: check shapes, allocate, launch
# --------------------------------------------


def _check(x, packed, absmax, out_features, in_features, blocksize, x_name, x_len):
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{x_name} must be fp32/fp16/bf16, got {x.dtype}")
    if x.shape[-1] != x_len:
        raise ValueError(f"{x_name} has last dimension {x.shape[-1]}, expected {x_len}")
    n = out_features * in_features
    if packed.dtype != torch.uint8 or packed.numel() != (n + 1) // 2:
        raise ValueError(
            f"packed must be uint8 with {(n + 1) // 2} bytes for a "
            f"{out_features}x{in_features} weight"
        )
    if absmax.dtype != torch.float32 or absmax.numel() != -(-n // blocksize):
        raise ValueError(
            f"absmax must be float32 with {-(-n // blocksize)} entries for blocksize {blocksize}"
        )
    if x.device != packed.device or x.device != absmax.device:
        raise ValueError(
            f"{x_name} on {x.device}, packed on {packed.device}, absmax on {absmax.device}"
        )


def _gemv(x2, packed, absmax, *, n_out, n_red, in_features, blocksize, trans_w,
          tile: dict | None = None):
    """Launch the fused kernel on x2 (M, n_red) -> (M, n_out): x2 @ W^T, or x2 @ W if trans_w, for
    the NF4 weight W of row length in_features. `tile`: one entry of GEMV_TILES' kwargs to run that
    tile as is (the tests run every one); None lets the autotuner choose."""
    m_rows = x2.shape[0]
    y = torch.empty(m_rows, n_out, dtype=x2.dtype, device=x2.device)
    if m_rows == 0:
        return y
    # .fn: the kernel under the tuner
    kernel = _nf4_gemv_kernel if tile is None else _nf4_gemv_kernel.fn
    grid = lambda meta: (triton.cdiv(n_out, meta["BLOCK_O"]), m_rows)
    x_bf16 = x2.dtype == torch.bfloat16
    kernel[grid](
        x2, packed, absmax, nf4_code(x2.device), y.view(torch.int16) if x_bf16 else y,
        n_out, n_red, in_features,
        x2.stride(0), y.stride(0),
        BLOCKSIZE=blocksize, TRANS_W=trans_w, X_BF16=x_bf16, **(tile or {}),
    )  # fmt: skip
    return y


def nf4_matmul(x, packed, absmax, out_features, in_features, blocksize=64, backend="auto"):
    """y = x @ W^T for x (..., in_features) and the NF4 weight W (out_features, in_features).

    y has x's dtype. `backend`: see `nf4.use_triton`; the path inside Triton follows `choose_path`.
    """
    # 1) check
    _check(x, packed, absmax, out_features, in_features, blocksize, "x", in_features)
    if out_features * in_features >= 2**31:
        raise ValueError(
            "the NF4 kernels index with int32: out_features * in_features must be < 2**31"
        )
    if not use_triton(x, backend):
        return nf4_matmul_ref(x, packed, absmax, out_features, in_features, blocksize)
    x2 = x.reshape(-1, in_features).contiguous()  # (M, K)
    if choose_path(x2.shape[0]) == "gemv":
        # 2) allocate + 3) launch
        y = _gemv(x2, packed, absmax, n_out=out_features, n_red=in_features,
                  in_features=in_features, blocksize=blocksize, trans_w=False)
    else:
        w = dequantize_nf4(packed, absmax, (out_features, in_features), blocksize, x.dtype,
                           backend="triton")
        y = x2 @ w.t()  # (M, K) @ (K, N) -> (M, N)
    return y.view(*x.shape[:-1], out_features)


def nf4_matmul_backward_input(
    grad_y, packed, absmax, out_features, in_features, blocksize=64, backend="auto"
):
    """grad_x = grad_y @ W for grad_y (..., out_features): the input gradient of `nf4_matmul`."""
    _check(grad_y, packed, absmax, out_features, in_features, blocksize, "grad_y", out_features)
    if out_features * in_features >= 2**31:
        raise ValueError(
            "the NF4 kernels index with int32: out_features * in_features must be < 2**31"
        )
    if not use_triton(grad_y, backend):
        return nf4_matmul_backward_input_ref(
            grad_y, packed, absmax, out_features, in_features, blocksize
        )
    g2 = grad_y.reshape(-1, out_features).contiguous()  # (M, N)
    shape = (out_features, in_features)
    if choose_path(g2.shape[0]) == "gemv":
        gx = _gemv(g2, packed, absmax, n_out=in_features, n_red=out_features,
                   in_features=in_features, blocksize=blocksize, trans_w=True)
    else:
        w = dequantize_nf4(packed, absmax, shape, blocksize, grad_y.dtype, backend="triton")
        gx = g2 @ w  # (M, N) @ (N, K) -> (M, K)
    return gx.view(*grad_y.shape[:-1], in_features)


# %%
# The references: plain PyTorch
# -----------------------------


def nf4_matmul_ref(x, packed, absmax, out_features, in_features, blocksize=64):
    """Plain PyTorch: dequantize to x.dtype, then x @ W^T.

    Memory traffic: the NF4 weight (N*K/2 + 4*N*K/blocksize bytes) is read once, then a dense
    N*K*sizeof(x) copy is written and read back by the matmul: about 4.5x the bytes of the fused
    GEMV for a bf16 decode step.
    """
    w = dequantize_nf4_ref(packed, absmax, (out_features, in_features), blocksize, x.dtype)
    return x @ w.t()  # (..., K) @ (K, N) -> (..., N)


def nf4_matmul_backward_input_ref(grad_y, packed, absmax, out_features, in_features, blocksize=64):
    """Plain PyTorch grad_x = grad_y @ W, on W dequantized to grad_y.dtype (same traffic as
    nf4_matmul_ref)."""
    w = dequantize_nf4_ref(packed, absmax, (out_features, in_features), blocksize, grad_y.dtype)
    return grad_y @ w  # (..., N) @ (N, K) -> (..., K)


# %%
# Check
# -----
#
# Every path and both loops against the references, on awkward shapes.
#
# Numerics: both paths multiply x by exactly the reference weights (dequantized in float32, rounded
# once to x.dtype) and accumulate in float32 (GEMV) or in cuBLAS's accumulator, so they differ from
# `nf4_matmul_ref` only by summation order and the final rounding of y to x.dtype: hence explicit
# tolerances.
TOLERANCE = {
    torch.float32: dict(atol=1e-4, rtol=1e-5),
    torch.float16: dict(atol=2e-2, rtol=2e-3),  # 2 fp16 ulps of outputs around 10
    torch.bfloat16: dict(atol=1.3e-1, rtol=1.6e-2),  # 2 bf16 ulps
}
# the default tile of each loop
PLAIN_TILE = next(t.kwargs for t in GEMV_TILES if not t.kwargs["PAIRED"])
PAIRED_TILE = next(t.kwargs for t in GEMV_TILES if t.kwargs["PAIRED"])


def check(
    device, shapes=None, matmul_ref=nf4_matmul_ref, grad_x_ref=nf4_matmul_backward_input_ref
) -> bool:
    """Print a ✅/❌ row per (loop, direction, shape, dtype, rows): the kernel's y (or grad_x) must
    be within TOLERANCE of the reference's, computed on the CPU. Returns whether every row
    passed."""
    # (37, 129): odd K, blocks straddle rows (plain loop only); (36, 130): even K, both loops.
    # GEMV_MAX_ROWS + 4 rows take the dequantize + cuBLAS path. A GPU adds large awkward shapes.
    if shapes is None:
        shapes = [(37, 129), (36, 130)]
        if device.type == "cuda":
            shapes += [(1823, 782), (781, 1823)]
    rows = []
    g = torch.Generator().manual_seed(0)
    for n_out, n_in in shapes:
        packed, absmax = quantize_nf4_ref(torch.randn(n_out, n_in, generator=g))
        on_device = (packed.to(device), absmax.to(device))
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for trans_w in (False, True):
                if trans_w:
                    name, ref_fn, n_red, n_res = "grad_x = g @ W", grad_x_ref, n_out, n_in
                else:
                    name, ref_fn, n_red, n_res = "y = x @ W^T", matmul_ref, n_in, n_out
                cases = [("plain", PLAIN_TILE, 3)]
                if n_in % 2 == 0:
                    cases.append(("paired", PAIRED_TILE, 3))
                cases.append(("dequant+cuBLAS", None, GEMV_MAX_ROWS + 4))
                for loop, tile, m_rows in cases:
                    x = torch.randn(m_rows, n_red, generator=g).to(dtype)
                    if tile is None:
                        fn = nf4_matmul_backward_input if trans_w else nf4_matmul
                        y = fn(x.to(device), *on_device, n_out, n_in, backend="triton")
                    else:
                        y = _gemv(x.to(device), *on_device, n_out=n_res, n_red=n_red,
                                  in_features=n_in, blocksize=64, trans_w=trans_w, tile=tile)
                    expect = ref_fn(x, packed, absmax, n_out, n_in)
                    err = (y.cpu().double() - expect.double()).abs().max().item()
                    ok = torch.allclose(y.cpu(), expect, **TOLERANCE[dtype])
                    rows.append({"path": loop, "computes": name, "W": f"{n_out}x{n_in}",
                                 "rows": m_rows, "dtype": str(dtype)[6:],
                                 "max |err|": f"{err:.2g}", "ok": OK if ok else FAIL})
    print_table(rows)
    return all(r["ok"] == OK for r in rows)


# %%
# Benchmark
# ---------
#
# GPU only: a decode step reads the weight once, so GB/s against a device copy is the measure.


def benchmark(
    device, shapes=((4096, 4096), (11008, 4096)), timer=time_s, copy_bytes=2**30
) -> None:
    """GB/s of one bf16 decode step (M = 1) through each loop, the autotuned kernel and the
    reference, beside the copy roofline and bf16 cuBLAS. Bytes moved: the NF4 weight
    (N*K/2 + 4*N*K/64) + x + y, whatever the path (the reference really moves about 4.5x that: see
    nf4_matmul_ref). (`timer` and `copy_bytes` let a test run this on the interpreter with a fake
    clock.)"""
    roofline = copy_gbs(device, copy_bytes, timer)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device
    print(f"\n{name}, one bf16 row; device copy (the roofline): {roofline:.0f} GB/s")
    rows = [row for n_out, n_in in shapes
            for row in _benchmark_shape(device, n_out, n_in, roofline, timer)]
    print_table(rows)


def _benchmark_shape(device, n_out, n_in, roofline, timer) -> list[dict]:
    w = torch.randn(n_out, n_in, device=device, dtype=torch.bfloat16)
    packed, absmax = quantize_nf4(w)
    x = torch.randn(1, n_in, device=device, dtype=torch.bfloat16)
    xy_bytes = 2 * (n_in + n_out)
    nf4_bytes = packed.numel() + 4 * absmax.numel() + xy_bytes
    forward = dict(n_out=n_out, n_red=n_in, in_features=n_in, blocksize=64, trans_w=False)
    args = (x, packed, absmax, n_out, n_in)  # nf4_matmul's
    cases = {
        "plain loop": (nf4_bytes, lambda: _gemv(x, packed, absmax, **forward, tile=PLAIN_TILE)),
        "paired loop": (nf4_bytes, lambda: _gemv(x, packed, absmax, **forward, tile=PAIRED_TILE)),
        "autotuned (nf4_matmul)": (nf4_bytes, lambda: nf4_matmul(*args, backend="triton")),
        "nf4_matmul_ref (PyTorch)": (nf4_bytes, lambda: nf4_matmul_ref(*args)),
        # dense bf16 reads 2 bytes per weight: the bar NF4 must beat
        "bf16 x @ W^T (cuBLAS, dense W)": (2 * w.numel() + xy_bytes, lambda: x @ w.t()),
    }
    rows = []
    for name, (n_bytes, fn) in cases.items():
        fn()  # the autotuner times its tiles on the first call
        gbs = n_bytes / timer(fn) / 1e9
        rows.append({"W": f"{n_out}x{n_in}", "what": name, "GB/s": f"{gbs:.0f}",
                     "of roofline": f"{gbs / roofline:.0%}"})
    return rows


if __name__ == "__main__":
    main(check, benchmark, "minillm.kernels.nf4_matmul")
