"""ggml tensor types: F32, F16, BF16, Q8_0 and Q4_0 encoders/decoders, bit-exact with llama.cpp.

Spec: ggml's reference quantizers, `quantize_row_q8_0_ref` / `quantize_row_q4_0_ref` and
`dequantize_row_q8_0` / `dequantize_row_q4_0` in ggml/src/ggml-quants.c, and `ggml_compute_fp32_to_bf16`
in ggml/src/ggml-impl.h (https://github.com/ggml-org/llama.cpp). Rows are cut into blocks of 32 values:

    Q8_0 block (34 bytes):  d = amax / 127          (float32, stored as fp16)
                            q[j] = roundf(x[j] * id)            id = 1/d, or 0 when d == 0
    Q4_0 block (18 bytes):  d = m / -8              m = the value of largest |x| *with its sign*
                            q[j] = min(15, (int8)(x[j] * id + 8.5f))      (a fused multiply-add)
                            byte j = q[j] | q[j + 16] << 4
    dequantize:             Q8_0: q * d        Q4_0: (q - 8) * d        (float32)

Three details decide bit-exactness, and each is emulated here:
1. `roundf` rounds halves away from zero (torch.round rounds them to even);
2. the C loop for Q4_0 keeps the *first* element of largest magnitude (strict `<`), and an all-zero
   block keeps m = +0.0, so d = 0 / -8 = -0.0 and its fp16 bytes are 00 80;
3. compilers contract `x0*id + 8.5f` into one FMA (single rounding). x*id of two float32s is exact in
   float64 and so is the sum once |x*id| >= 0.25, so float64 arithmetic rounded once to float32
   reproduces the FMA; plain float32 arithmetic (two roundings) differs in about 1 value per million.

Everything is vectorized in torch; callers pass rows of any length divisible by 32 (the writer chunks
big tensors). Byte layouts assume a little-endian host, as GGUF does.
"""

from __future__ import annotations

import sys

import torch

QK = 32  # values per Q8_0 / Q4_0 block

# ggml type ids (ggml.h `enum ggml_type`): id -> (name, values per block, bytes per block).
# Enough of the table to validate any common GGUF file; only the first five have codecs here.
GGML_F32, GGML_F16, GGML_Q4_0, GGML_Q8_0, GGML_BF16 = 0, 1, 2, 8, 30
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    30: ("BF16", 1, 2),
}

if sys.byteorder != "little":
    raise ImportError("minillm.ggml_quants assumes a little-endian host (GGUF is little-endian)")


def _blocks(x: torch.Tensor, what: str) -> torch.Tensor:
    """(..., K) float -> (N, 32) float32 blocks, checking K and finiteness."""
    if x.shape[-1] % QK != 0:
        raise ValueError(f"{what}: row length {x.shape[-1]} is not a multiple of the block size {QK}")
    xb = x.detach().to(device="cpu", dtype=torch.float32).reshape(-1, QK)
    if not bool(torch.isfinite(xb).all()):
        raise ValueError(f"{what}: input holds NaN or infinite values (ggml's quantizers are undefined there)")
    return xb


def _fp16_bytes(d: torch.Tensor) -> torch.Tensor:
    """(N, 1) float32 -> (N, 2) uint8: round to nearest even fp16 (as F16C / ggml), little-endian."""
    return d.to(torch.float16).view(torch.uint8).reshape(-1, 2)


def _round_half_away(v: torch.Tensor) -> torch.Tensor:
    """C roundf on float32: torch.round rounds halves to even, so round the truncation away instead.
    v - trunc(v) is exact in float32, so the comparison with 0.5 sees true ties."""
    t = v.trunc()
    return torch.where((v - t).abs() >= 0.5, t + torch.sign(v), t)


# ---------------------------------------------------------------------------------------------------
# Q8_0


def quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    """(R, K) float -> (R, K/32 * 34) uint8 Q8_0 blocks, as `quantize_row_q8_0_ref`."""
    rows = x.shape[0] if x.dim() > 1 else 1
    xb = _blocks(x, "Q8_0")  # (N, 32)
    amax = xb.abs().amax(dim=1, keepdim=True)  # (N, 1)
    d = amax / 127.0  # float32 division, as in C
    inv = torch.where(d != 0, 1.0 / torch.where(d != 0, d, 1.0), 0.0)
    q = _round_half_away(xb * inv).to(torch.int8)  # x*id is a plain float32 product
    out = torch.cat([_fp16_bytes(d), q.view(torch.uint8)], dim=1)  # (N, 34)
    return out.reshape(rows, -1)


def dequantize_q8_0(data: torch.Tensor, n: int) -> torch.Tensor:
    """(R, n/32 * 34) uint8 -> (R, n) float32, as `dequantize_row_q8_0`."""
    blocks = data.reshape(-1, 34)
    d = blocks[:, :2].contiguous().view(torch.float16).float()  # (N, 1)
    q = blocks[:, 2:].contiguous().view(torch.int8).float()  # (N, 32)
    return (q * d).reshape(-1, n)


# ---------------------------------------------------------------------------------------------------
# Q4_0


def quantize_q4_0(x: torch.Tensor) -> torch.Tensor:
    """(R, K) float -> (R, K/32 * 18) uint8 Q4_0 blocks, as `quantize_row_q4_0_ref`."""
    rows = x.shape[0] if x.dim() > 1 else 1
    xb = _blocks(x, "Q4_0")  # (N, 32)
    # argmax returns the first maximal index, like the C loop's strict `amax < fabsf(v)`
    idx = xb.abs().argmax(dim=1, keepdim=True)  # (N, 1)
    m = xb.gather(1, idx)
    m = torch.where(m != 0, m, 0.0)  # an all-zero block keeps the C initial value +0.0 (also for -0.0)
    d = m / -8.0  # exact (power of two) except in the subnormal range, as in C
    inv = torch.where(d != 0, 1.0 / torch.where(d != 0, d, 1.0), 0.0)
    # the FMA: exact product + 8.5 in float64, then one rounding to float32, then (int8) truncation
    v = (xb.double() * inv.double() + 8.5).float()
    q = v.trunc().clamp(max=15).to(torch.uint8)  # (N, 32), values 0..15
    packed = q[:, :16] | (q[:, 16:] << 4)  # element j low nibble, j+16 high nibble
    out = torch.cat([_fp16_bytes(d), packed], dim=1)  # (N, 18)
    return out.reshape(rows, -1)


def dequantize_q4_0(data: torch.Tensor, n: int) -> torch.Tensor:
    """(R, n/32 * 18) uint8 -> (R, n) float32, as `dequantize_row_q4_0`."""
    blocks = data.reshape(-1, 18)
    d = blocks[:, :2].contiguous().view(torch.float16).float()  # (N, 1)
    qs = blocks[:, 2:]
    q = torch.cat([qs & 0x0F, qs >> 4], dim=1).float() - 8.0  # (N, 32)
    return (q * d).reshape(-1, n)


# ---------------------------------------------------------------------------------------------------
# F16 / BF16 / F32


def f32_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """float32 -> bfloat16 exactly as `ggml_compute_fp32_to_bf16`.

    Round to nearest even on the top 16 bits; a NaN keeps its sign and top payload bits with the quiet
    bit forced (`bits >> 16 | 64`), where torch would return one canonical NaN.
    """
    u = x.detach().to(device="cpu", dtype=torch.float32).contiguous().view(torch.int32)
    is_nan = (u & 0x7FFFFFFF) > 0x7F800000
    # int32 arithmetic: the low 16 bits after `>> 16` are those of the uint32 C code (wrap-around only
    # happens in the NaN lanes, which `where` discards)
    b = torch.where(is_nan, (u >> 16) | 64, (u + (0x7FFF + ((u >> 16) & 1))) >> 16).to(torch.int16)
    return b.view(torch.bfloat16)


def quantize(x: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """(R, K) float -> (R, row_bytes) uint8 in the given ggml type."""
    x = x.detach().cpu()
    rows = x.shape[0] if x.dim() > 1 else 1
    if ggml_type == GGML_F32:
        return x.float().contiguous().view(torch.uint8).reshape(rows, -1)
    if ggml_type == GGML_F16:
        return x.float().to(torch.float16).contiguous().view(torch.uint8).reshape(rows, -1)
    if ggml_type == GGML_BF16:
        return f32_to_bf16(x).view(torch.uint8).reshape(rows, -1)
    if ggml_type == GGML_Q8_0:
        return quantize_q8_0(x.reshape(rows, -1))
    if ggml_type == GGML_Q4_0:
        return quantize_q4_0(x.reshape(rows, -1))
    raise ValueError(f"no encoder for ggml type {type_name(ggml_type)}")


def dequantize(data: torch.Tensor, ggml_type: int, n: int) -> torch.Tensor:
    """(R, row_bytes) uint8 -> (R, n) float32 (for F32 a view of `data`, no copy)."""
    data = data.reshape(-1)
    if ggml_type == GGML_F32:
        return data.view(torch.float32).reshape(-1, n)
    if ggml_type == GGML_F16:
        return data.view(torch.float16).float().reshape(-1, n)
    if ggml_type == GGML_BF16:
        return data.view(torch.bfloat16).float().reshape(-1, n)
    if ggml_type == GGML_Q8_0:
        return dequantize_q8_0(data, n)
    if ggml_type == GGML_Q4_0:
        return dequantize_q4_0(data, n)
    raise ValueError(f"no decoder for ggml type {type_name(ggml_type)} (minillm reads F32/F16/BF16/Q8_0/Q4_0)")


def type_name(ggml_type: int) -> str:
    return GGML_TYPES[ggml_type][0] if ggml_type in GGML_TYPES else f"id {ggml_type}"


def row_bytes(ggml_type: int, n: int) -> int:
    """Bytes of one row of n values; n must be a multiple of the type's block size."""
    _, block, size = GGML_TYPES[ggml_type]
    if n % block != 0:
        raise ValueError(f"row length {n} is not a multiple of the {type_name(ggml_type)} block size {block}")
    return n // block * size
