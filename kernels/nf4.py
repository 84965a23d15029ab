"""NF4: 4-bit NormalFloat block quantization, bit for bit as bitsandbytes stores it.

A runnable tutorial:

    python -m minillm.kernels.nf4                     # GPU: check against the reference, then GB/s
    TRITON_INTERPRET=1 python -m minillm.kernels.nf4  # CPU: the check only, through the interpreter

NF4 is the weight format of QLoRA (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314,
section 3).

What you will learn here:
  * how a weight becomes 4.5 bits per parameter: 16 fixed code values + one float32 scale per block
    of 64;
  * how to pack two 4-bit codes in a byte and unpack them with shifts and masks inside a Triton
    kernel;
  * why "nearest code" must be spelled out to the last bit (reciprocal, midpoints, ties) to match a
    format;
  * why dequantization is a pure stream whose speed is set by bytes in flight, measured against a
    copy.

Each part is explained in a `# %%` cell right above the code it describes, as in Triton's tutorials.
"""

import os

import torch
import triton
import triton.language as tl

from .tutorial import FAIL, OK, copy_gbs, main, print_table, time_s

# %%
# The format
# ----------
#
# Bit for bit the layout of bitsandbytes' `quantize_4bit(..., quant_type="nf4")`:
#
#   w (any shape) is flattened row-major and cut into blocks of `blocksize` (64) elements. A block
#   may straddle two rows of an (out, in) weight; the last block may be partial.
#   absmax[b] = max |w_i| over block b                                   (float32)
#   s_i       = clamp(w_i * (1 / absmax[b]), -1, 1)                      (float32, reciprocal once)
#               last partial block only: s_i = clamp(w_i / absmax[b], -1, 1) (bitsandbytes' quirk)
#               absmax is clamped to >= 1e-38 first, so an all-zero block gives s = 0 -> code 7
#   q_i       = #{ j : s_i > mid_j },  mid_j = (code[j] + code[j+1]) / 2 in float32
#               i.e. the nearest code, and a value exactly on a midpoint takes the lower code
#   byte k    = q_{2k} << 4 | q_{2k+1}     (even element in the high nibble; odd count pads with 7)
#   w_hat_i   = code[q_i] * absmax[b]       (float32, rounded once to the output dtype)
#
# The 15 float32 midpoints are exactly the thresholds of bitsandbytes' `dQuantizeNF4` decision
# tree, which compares with a strict `>`; that is where the "ties go down" rule comes from.
#
# The codebook of NF4, index 0..15: the float32 values bitsandbytes ships (quantiles of N(0, 1),
# scaled to [-1, 1], with an exact 0 and an extra positive value so that both -1 and 1 are
# representable). ZERO_CODE and ABSMAX_FLOOR, below, are the code of 0.0 and the clamp above.
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
ZERO_CODE = 7  # index of 0.0: all-zero blocks and the pad nibble of an odd element count
ABSMAX_FLOOR = 1e-38  # absmax is clamped to this before taking the reciprocal
# The same two constants as compile-time values, for use inside the kernels.
_ZERO_CODE = tl.constexpr(ZERO_CODE)
_ABSMAX_FLOOR = tl.constexpr(ABSMAX_FLOOR)


# %%
# Helpers shared by the kernels and their wrappers
# ------------------------------------------------
#
# The codebook and its midpoints on a device, the backend choice, the autotuner's list of tiles,
# and the argument checks.

_CODE_ON: dict[torch.device, torch.Tensor] = {}  # device -> the codebook there, made once


def nf4_code(device=None) -> torch.Tensor:
    """The 16 code values as a float32 tensor (16,) on `device`; treat it as read-only.

    Made once per device and then reused: a fresh host-to-device copy on every matmul would stall
    the GPU each call, and is not allowed while a CUDA graph is being captured (torch.compile's
    mode="reduce-overhead" in generate.py --compile).
    """
    device = torch.device(device if device is not None else "cpu")
    if device not in _CODE_ON:
        _CODE_ON[device] = torch.tensor(NF4_CODE, dtype=torch.float32, device=device)
    return _CODE_ON[device]


def nf4_midpoints(device=None) -> torch.Tensor:
    """The 15 decision thresholds (code[j] + code[j+1]) / 2, computed in float32 as bitsandbytes
    does."""
    code = nf4_code(device)
    return (code[:-1] + code[1:]) / 2


def use_triton(t: torch.Tensor, backend: str = "auto") -> bool:
    """Backend choice shared by the NF4 kernels.

    "triton" and "torch" force a path; "auto" runs Triton when the tensor is on CUDA or when
    Triton's CPU interpreter is switched on (TRITON_INTERPRET=1, as the tests do), and the
    plain-PyTorch reference otherwise, so a CPU-only machine works without the (slow) interpreter.
    """
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "auto":
        return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return backend == "triton"


# Whether @triton.jit made the kernels below interpreted (it decides once, at import, as we do
# here).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def autotune_configs(configs: list[triton.Config]) -> list[triton.Config]:
    """The tile shapes the autotuner times on a kernel's first call for each problem size, keeping
    the fastest. The first entry is the hand-picked default; it is the only one under the
    interpreter, where timing means nothing (and the tests should not pay for it)."""
    return configs[:1] if INTERPRET else configs


def _check_blocksize(blocksize: int) -> None:
    if blocksize < 16 or blocksize > 4096 or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a power of two in [16, 4096], got {blocksize}")


def _check_packed(packed: torch.Tensor, absmax: torch.Tensor, n: int, blocksize: int) -> None:
    _check_blocksize(blocksize)
    if packed.dtype != torch.uint8 or packed.numel() != (n + 1) // 2:
        raise ValueError(
            f"packed must be uint8 with ceil({n}/2) = {(n + 1) // 2} bytes, "
            f"got {packed.dtype} with {packed.numel()}"
        )
    n_blocks = -(-n // blocksize)
    if absmax.dtype != torch.float32 or absmax.numel() != n_blocks:
        raise ValueError(
            f"absmax must be float32 with ceil({n}/{blocksize}) = {n_blocks} entries, "
            f"got {absmax.dtype} with {absmax.numel()}"
        )
    if packed.device != absmax.device:
        raise ValueError(f"packed is on {packed.device} but absmax is on {absmax.device}")


# %%
# bfloat16 rounding by hand
# -------------------------
#
# Triton's CPU interpreter truncates float32 -> bfloat16 instead of rounding to nearest-even as GPUs
# (and PyTorch) do, so the kernels round with integer operations, which is exact everywhere. (NaN
# payloads are not preserved; the weights have none.)


@triton.jit
def round_to_bf16(x):
    """float32 -> float32 holding the nearest bfloat16 (ties to even)."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # -65536 == 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def bf16_bits(x):
    """float32 -> the int16 bit pattern of the nearest bfloat16, to store through an int16 view."""
    bits = x.to(tl.int32, bitcast=True)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.int16)


# %%
# Quantize
# --------
#
# The blocked algorithm of the quantize kernel (one program = BLOCKS_PER_PROG quantization blocks,
# NB below):
#
#   for each program p:
#       pairs   = the (NB, blocksize/2) byte slots of blocks p*NB ... p*NB + NB - 1
#       x_even, x_odd = w[2*pairs], w[2*pairs + 1]              # (NB, HALF) each, in float32
#       absmax  = max over the row of max(|x_even|, |x_odd|)      # (NB,)
#       s       = x * (1 / absmax)   (x / absmax in the last partial block), clamped to [-1, 1]
#       q       = sum_j (s > mid_j)                               # 15 compares, no table search
#       packed[pairs] = q_even << 4 | q_odd


@triton.jit
def _nf4_quantize_kernel(
    # pointers
    w_ptr,  # *fp32|fp16|bf16 (n,)      the flattened weight
    packed_ptr,  # *uint8 (ceil(n/2),)  out: two codes per byte
    absmax_ptr,  # *fp32 (n_blocks,)    out: max |w| per block
    mid_ptr,  # *fp32 (15,)             thresholds between neighbouring codes
    # sizes
    n,  # number of weight elements
    n_blocks,  # ceil(n / BLOCKSIZE)
    # meta-parameters
    BLOCKSIZE: tl.constexpr,  # elements per quantization block (64)
    BLOCKS_PER_PROG: tl.constexpr,  # quantization blocks handled by one program
):
    HALF: tl.constexpr = BLOCKSIZE // 2
    pid = tl.program_id(0)
    blk = pid * BLOCKS_PER_PROG + tl.arange(0, BLOCKS_PER_PROG)  # (NB,)
    pair = blk[:, None] * HALF + tl.arange(0, HALF)[None, :]  # (NB, HALF) byte index
    ev = 2 * pair  # (NB, HALF) element going to the high nibble
    od = ev + 1  # (NB, HALF) element going to the low nibble
    x0 = tl.load(w_ptr + ev, mask=ev < n, other=0.0).to(tl.float32)
    x1 = tl.load(w_ptr + od, mask=od < n, other=0.0).to(tl.float32)

    amax = tl.max(tl.maximum(tl.abs(x0), tl.abs(x1)), axis=1)  # (NB,)
    tl.store(absmax_ptr + blk, amax, mask=blk < n_blocks)

    # One correctly rounded reciprocal per block (div_rn: Triton's plain `/` is approximate on
    # GPUs). Every constant is built with an explicit float32 dtype: a bare literal's type is
    # inferred, and Triton 3.8 infers 1e-38 (below float32's smallest normal) as fp64, which div_rn
    # then rejects.
    floor = tl.full([BLOCKS_PER_PROG], _ABSMAX_FLOOR, tl.float32)  # (NB,)
    one = tl.full([BLOCKS_PER_PROG], 1.0, tl.float32)  # (NB,)
    safe = tl.maximum(amax, floor)  # (NB,)
    recip = tl.math.div_rn(one, safe)  # (NB,)
    # bitsandbytes divides instead of multiplying in the last, partial block.
    partial = ((blk + 1) * BLOCKSIZE > n)[:, None]  # (NB, 1)
    nonzero = (amax > 0)[:, None]  # guards 0 * inf should a GPU flush the subnormal floor to zero
    s0 = tl.where(partial, tl.math.div_rn(x0, safe[:, None]), x0 * recip[:, None])
    s1 = tl.where(partial, tl.math.div_rn(x1, safe[:, None]), x1 * recip[:, None])
    lo = tl.full([BLOCKS_PER_PROG, HALF], -1.0, tl.float32)  # (NB, HALF)
    hi = tl.full([BLOCKS_PER_PROG, HALF], 1.0, tl.float32)
    zero = tl.zeros([BLOCKS_PER_PROG, HALF], dtype=tl.float32)
    s0 = tl.where(nonzero, tl.minimum(tl.maximum(s0, lo), hi), zero)
    s1 = tl.where(nonzero, tl.minimum(tl.maximum(s1, lo), hi), zero)

    # Nearest code = number of midpoints strictly below s (ties go to the lower code).
    q0 = tl.zeros([BLOCKS_PER_PROG, HALF], dtype=tl.int32)
    q1 = tl.zeros([BLOCKS_PER_PROG, HALF], dtype=tl.int32)
    for j in tl.static_range(15):
        mid = tl.load(mid_ptr + j)
        q0 += (s0 > mid).to(tl.int32)
        q1 += (s1 > mid).to(tl.int32)
    q1 = tl.where(od < n, q1, _ZERO_CODE)  # odd element count: pad nibble
    byte = (q0 << 4) | q1
    tl.store(packed_ptr + pair, byte.to(tl.uint8), mask=ev < n)


# %%
# The wrapper (1) checks its arguments, (2) allocates the outputs and (3) launches the kernel.
#
# Failure modes: NaN or inf weights are not supported (they poison their block's absmax, and the
# kernel and the reference may then disagree on codes); blocks whose absmax is below 1e-38
# (subnormal weights) follow the clamp. Element indices are int32 inside the kernels: up to
# 2**31 - 1 elements per tensor.


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, backend: str = "auto"):
    """Quantize `w` (any shape, fp32/fp16/bf16) to NF4.

    Returns (packed uint8 (ceil(numel/2),), absmax float32 (ceil(numel/blocksize),)); see the format
    cell above NF4_CODE for the exact rules. `backend`: see `use_triton`.
    """
    # 1) check
    _check_blocksize(blocksize)
    if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"quantize_nf4 takes fp32/fp16/bf16 weights, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError("quantize_nf4 got an empty tensor")
    if not use_triton(w, backend):
        return quantize_nf4_ref(w, blocksize)
    flat = w.detach().contiguous().view(-1)
    n = flat.numel()
    if n >= 2**31:
        raise ValueError(f"quantize_nf4 indexes with int32: at most 2**31 - 1 elements, got {n}")
    # 2) allocate
    n_blocks = triton.cdiv(n, blocksize)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=w.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=w.device)
    # 3) launch: about 1024 elements per program
    blocks_per_prog = max(1, 1024 // blocksize)
    grid = (triton.cdiv(n_blocks, blocks_per_prog),)
    _nf4_quantize_kernel[grid](
        flat, packed, absmax, nf4_midpoints(w.device), n, n_blocks,
        BLOCKSIZE=blocksize, BLOCKS_PER_PROG=blocks_per_prog,
    )  # fmt: skip
    return packed, absmax


def quantize_nf4_ref(w: torch.Tensor, blocksize: int = 64):
    """Plain-PyTorch quantize_nf4: the same rules, in float32, on any device.

    Memory traffic: reads n weights, writes n/2 + 4n/blocksize bytes, but materialises float32
    copies of the weight (the padded blocks and the scaled values): about 12 bytes per element of
    temporaries.
    """
    _check_blocksize(blocksize)
    n = w.numel()
    n_blocks = -(-n // blocksize)
    flat = w.detach().reshape(-1).to(torch.float32)
    x = torch.nn.functional.pad(flat, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)
    absmax = x.abs().amax(dim=1)  # (n_blocks,)
    safe = absmax.clamp_min(ABSMAX_FLOOR)
    scaled = x * torch.reciprocal(safe)[:, None]  # (n_blocks, blocksize)
    if n % blocksize:
        scaled[-1] = x[-1] / safe[-1]  # bitsandbytes' last-partial-block division
    # An all-zero block is code 7. The floor alone does not ensure it: 1e-38 is subnormal, and a
    # process that runs with denormals flushed to zero (a library built with -ffast-math, loaded by
    # torch.compile's C++ kernels on older torch, sets that for the whole process) turns
    # 0 * (1 / 1e-38) into NaN.
    scaled = torch.where(absmax[:, None] > 0, scaled, 0.0)
    scaled = scaled.clamp(-1.0, 1.0).view(-1)[:n]
    # bucketize(right=False) returns #{j : mid_j < s}: the nearest code, ties to the lower one.
    q = torch.bucketize(scaled, nf4_midpoints(w.device)).to(torch.uint8)  # (n,)
    if n % 2:
        q = torch.cat([q, q.new_full((1,), ZERO_CODE)])
    packed = (q[0::2] << 4) | q[1::2]
    return packed, absmax


# %%
# Dequantize
# ----------
#
# The blocked algorithm of the dequantize kernel (one program = BLOCK_BYTES packed bytes
# = 2 * BLOCK_BYTES weights):
#
#   for each program p:
#       k       = p*BLOCK_BYTES ... p*BLOCK_BYTES + BLOCK_BYTES - 1    # contiguous byte indices
#       byte    = packed[k]                                           # one vector load per thread
#       scale   = absmax[2k // blocksize]                             # both nibbles share a block
#       w[2k], w[2k + 1] = code[byte >> 4] * scale, code[byte & 15] * scale
#       out[2k, 2k + 1]  = interleave(w_even, w_odd), rounded to the output dtype   # vector stores
#
# Dequantize is a pure stream (read n/2 + 4n/64 bytes, write 2n): the tile only sets how many bytes
# each program keeps in flight. DEQUANT_CONFIGS: (BLOCK_BYTES, warps) from small to large; the GPU
# picks (`autotune_configs`).
DEQUANT_CONFIGS = autotune_configs([
    triton.Config({"BLOCK_BYTES": b}, num_warps=w)
    for b, w in ((1024, 4), (512, 4), (2048, 4), (2048, 8), (4096, 8))
])  # fmt: skip


@triton.autotune(configs=DEQUANT_CONFIGS, key=["n", "OUT_BF16"])
@triton.jit
def _nf4_dequantize_kernel(
    # pointers
    packed_ptr,  # *uint8 (ceil(n/2),)
    absmax_ptr,  # *fp32 (n_blocks,)
    code_ptr,  # *fp32 (16,)           the NF4 codebook
    out_ptr,  # *fp32|fp16 (n,), or bf16 seen as *int16  out: the flattened weight
    # sizes
    n,  # number of weight elements
    n_bytes,  # ceil(n / 2), passed in (not computed here) so Triton sees its divisibility
    # meta-parameters
    BLOCKSIZE: tl.constexpr,  # elements per quantization block
    BLOCK_BYTES: tl.constexpr,  # packed bytes handled by one program
    OUT_BF16: tl.constexpr,  # out_ptr is a bfloat16 tensor viewed as int16
):
    pid = tl.program_id(0)
    byte_idx = pid * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)  # (BLOCK_BYTES,)
    in_bounds = byte_idx < n_bytes  # contiguous, so loads of neighbouring bytes can be vectorized
    byte = tl.load(packed_ptr + byte_idx, mask=in_bounds, other=0).to(tl.int32)
    # both elements of a byte (2k, 2k + 1) share a quantization block: BLOCKSIZE is even
    scale = tl.load(absmax_ptr + (2 * byte_idx) // BLOCKSIZE, mask=in_bounds, other=0.0)
    w_hi = tl.load(code_ptr + (byte >> 4)) * scale  # element 2k, float32 (rounded once below)
    w_lo = tl.load(code_ptr + (byte & 15)) * scale  # element 2k + 1
    # interleave into one contiguous run of 2 * BLOCK_BYTES outputs: (B,) (B,) -> (B, 2) -> (2B,)
    w = tl.reshape(tl.join(w_hi, w_lo), [2 * BLOCK_BYTES])
    e = 2 * pid * BLOCK_BYTES + tl.arange(0, 2 * BLOCK_BYTES)  # (2 * BLOCK_BYTES,) element index
    if OUT_BF16:
        tl.store(out_ptr + e, bf16_bits(w), mask=e < n)
    else:
        tl.store(out_ptr + e, w.to(out_ptr.dtype.element_ty), mask=e < n)


def dequantize_nf4(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape,
    blocksize: int = 64,
    dtype: torch.dtype = torch.bfloat16,
    backend: str = "auto",
) -> torch.Tensor:
    """Rebuild the weight of `shape` from NF4 codes: code[q] * absmax in float32, rounded once to
    `dtype`."""
    # 1) check
    shape = torch.Size(shape)
    n = shape.numel()
    _check_packed(packed, absmax, n, blocksize)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dequantize_nf4 writes fp32/fp16/bf16, got {dtype}")
    if not use_triton(packed, backend):
        return dequantize_nf4_ref(packed, absmax, shape, blocksize, dtype)
    # 2) allocate
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    # 3) launch (BLOCK_BYTES comes from the autotuner: DEQUANT_CONFIGS)
    grid = lambda meta: (triton.cdiv(packed.numel(), meta["BLOCK_BYTES"]),)
    out_bf16 = dtype == torch.bfloat16
    _nf4_dequantize_kernel[grid](
        packed.contiguous(), absmax.contiguous(), nf4_code(packed.device),
        out.view(torch.int16) if out_bf16 else out, n, packed.numel(),
        BLOCKSIZE=blocksize, OUT_BF16=out_bf16,
    )  # fmt: skip
    return out


def dequantize_nf4_ref(
    packed, absmax, shape, blocksize: int = 64, dtype: torch.dtype = torch.bfloat16
):
    """Plain-PyTorch dequantize_nf4.

    Memory traffic: reads n/2 + 4n/blocksize bytes and writes n * sizeof(dtype), plus int32 codes
    and a float32 copy of n elements each (about 8 bytes per element of temporaries).
    """
    shape = torch.Size(shape)
    n = shape.numel()
    _check_packed(packed, absmax, n, blocksize)
    n_blocks = absmax.numel()
    q = torch.stack([packed >> 4, packed & 15], dim=1).view(-1)[:n].int()  # (n,) high nibble first
    q = torch.nn.functional.pad(q, (0, n_blocks * blocksize - n), value=ZERO_CODE)  # whole blocks
    w = nf4_code(packed.device)[q].view(n_blocks, blocksize) * absmax[:, None]  # float32
    return w.view(-1)[:n].to(dtype).view(shape)


# %%
# Check
# -----
#
# The kernels against the references, bit for bit, on awkward shapes.


def awkward_weight(shape, dtype, seed=0, device="cpu") -> torch.Tensor:
    """Gaussian weights whose scale grows from 1e-3 to 1e3 along the flat index, with the second
    block all zeros (absmax 0 -> code 7): every code, tiny and huge blocks, and the zero guard get
    exercised."""
    g = torch.Generator().manual_seed(seed)
    n = shape[0] * shape[1]
    w = torch.randn(n, generator=g) * 10.0 ** torch.linspace(-3, 3, n)
    w[64:128] = 0.0
    return w.view(shape).to(dtype).to(device)


def check(
    device, shapes=None, quantize_ref=quantize_nf4_ref, dequantize_ref=dequantize_nf4_ref
) -> bool:
    """Print a ✅/❌ row per (op, shape, dtype): the Triton kernel's bytes, scales and weights must
    equal the reference's exactly. The references run on the CPU. Returns whether every row
    passed."""
    # (37, 129): blocks straddle rows, odd count (a pad nibble); (3, 5): one partial block; (1, 1):
    # one element; (64, 130): whole blocks. A GPU also runs a large awkward shape.
    if shapes is None:
        shapes = [(37, 129), (3, 5), (1, 1), (64, 130)]
        if device.type == "cuda":
            shapes.append((1823, 781))
    rows = []
    for shape in shapes:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            w = awkward_weight(shape, dtype)
            packed, absmax = quantize_nf4(w.to(device), backend="triton")
            ref_packed, ref_absmax = quantize_ref(w, 64)
            bad = int((packed.cpu() != ref_packed).sum()) + int((absmax.cpu() != ref_absmax).sum())
            rows.append({"op": "quantize", "shape": "x".join(map(str, shape)),
                         "dtype": str(dtype)[6:], "mismatches": bad,
                         "ok": OK if bad == 0 else FAIL})
            w_hat = dequantize_nf4(packed, absmax, shape, dtype=dtype, backend="triton")
            ref = dequantize_ref(ref_packed, ref_absmax, shape, 64, dtype)
            bad = int((w_hat.cpu() != ref).sum())
            rows.append({**rows[-1], "op": "dequantize", "mismatches": bad,
                         "ok": OK if bad == 0 else FAIL})
    print_table(rows)
    return all(r["ok"] == OK for r in rows)


# %%
# Benchmark
# ---------
#
# GPU only: both kernels stream, so GB/s against a device copy is the figure of merit.


def benchmark(device, shape=(11008, 4096), timer=time_s, copy_bytes=2**30) -> None:
    """GB/s of quantize and dequantize on a bf16 Llama-7B MLP weight, Triton vs the reference,
    beside the copy roofline. Bytes moved: quantize reads 2n and writes n/2 + 4n/64; dequantize the
    reverse. (`timer` and `copy_bytes` let a test run this on the interpreter with a fake clock.)"""
    w = torch.randn(shape, device=device, dtype=torch.bfloat16)
    n = w.numel()
    nf4_bytes = n // 2 + 4 * triton.cdiv(n, 64)
    packed, absmax = quantize_nf4(w)
    cases = {
        "quantize_nf4 (Triton)": lambda: quantize_nf4(w, backend="triton"),
        "quantize_nf4_ref (PyTorch)": lambda: quantize_nf4_ref(w),
        "dequantize_nf4 (Triton)": lambda: dequantize_nf4(packed, absmax, shape, backend="triton"),
        "dequantize_nf4_ref (PyTorch)": lambda: dequantize_nf4_ref(packed, absmax, shape),
    }
    roofline = copy_gbs(device, copy_bytes, timer)
    rows = [{"what": "device copy (the roofline)", "us": "", "GB/s": f"{roofline:.0f}",
             "of roofline": "100%"}]
    for name, fn in cases.items():
        fn()  # the autotuner times its tiles on the first call
        seconds = timer(fn)
        gbs = (2 * n + nf4_bytes) / seconds / 1e9
        rows.append({"what": name, "us": f"{seconds * 1e6:.0f}", "GB/s": f"{gbs:.0f}",
                     "of roofline": f"{gbs / roofline:.0%}"})
    print(f"\n{torch.cuda.get_device_name(device) if device.type == 'cuda' else device}, "
          f"{shape[0]}x{shape[1]} bf16 weight")
    print_table(rows)


if __name__ == "__main__":
    main(check, benchmark, "minillm.kernels.nf4")
