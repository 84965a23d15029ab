"""ggml tensor types: F32, F16, BF16 and the 32-value block types Q8_0, Q4_0, Q4_1, Q5_0, Q5_1,
bit-exact with llama.cpp; the K-quants (Q4_K, Q5_K, Q6_K) live in kquants.py and are dispatched from
here.

Spec: ggml's reference quantizers `quantize_row_{q8_0,q4_0,q4_1,q5_0,q5_1}_ref` and their
`dequantize_row_*` in ggml/src/ggml-quants.c, the block structs in ggml/src/ggml-common.h, and
`ggml_compute_fp32_to_bf16` in ggml/src/ggml-impl.h (https://github.com/ggml-org/llama.cpp). Rows
are cut into blocks of 32 values; d and m are computed in float32 and stored as fp16:

    Q8_0 (34 B): d = amax / 127                 q[j] = roundf(x[j] * id)  id = 1/d, or 0 when d == 0
    Q4_0 (18 B): d = m / -8                     q[j] = min(15, (int8)(x[j] * id + 8.5f))
    Q5_0 (22 B): d = m / -16                    q[j] = min(31, (int8)(x[j] * id + 16.5f))
                 (m = the value of largest |x| *with its sign*)
    Q4_1 (20 B): d = (max - min) / 15, m = min  q[j] = min(15, (int8)((x[j] - min) * id + 0.5f))
    Q5_1 (24 B): d = (max - min) / 31, m = min  q[j] = (uint8)((x[j] - min) * id + 0.5f)
    layout:      4-bit codes: byte j = q[j] & 15 | (q[j + 16] & 15) << 4; the 5-bit types keep
                 each fifth bit in a little-endian uint32 qh (bit j for q[j]);
                 struct order d, [m], [qh], qs
    dequantize:  Q8_0 q·d   Q4_0 (q - 8)·d   Q5_0 (q - 16)·d   Q4_1 / Q5_1 q·d + m     (float32)

Three details decide bit-exactness, and each is emulated here:
1. `roundf` rounds halves away from zero (torch.round rounds them to even);
2. the C loop for Q4_0 keeps the *first* element of largest magnitude (strict `<`), and an all-zero
   block keeps m = +0.0, so d = 0 / -8 = -0.0 and its fp16 bytes are 00 80;
3. `x0 = x*id; x0 + 8.5f` rounds twice in float32 (no fused multiply-add), as llama.cpp's x86-64
   builds do: ggml-base, where the quantizers live, is compiled without -mfma. A compiler that
   contracts it into one FMA (gcc on aarch64, or -march=native) picks another code in about 1 block
   of Q4_0 in 500,000 (measured against llama-cpp-python's libggml-base: 0 of 524,288 blocks differ
   here, 1 with the FMA).
4. Q4_1 / Q5_1 keep the *first* minimum and maximum (strict `<` / `>`), so a zero min keeps its sign
   in m.

Everything is vectorized in torch; callers pass rows of any length divisible by 32 (the writer
chunks big tensors). Byte layouts assume a little-endian host, as GGUF does.
"""

from __future__ import annotations

import sys

import torch

from minillm.formats import kquants

QK = 32  # values per block of the 32-value types

# ggml type ids (ggml.h `enum ggml_type`): id -> (name, values per block, bytes per block).
# Enough of the table to validate any common GGUF file; the named ones have codecs here.
GGML_F32, GGML_F16, GGML_Q4_0, GGML_Q4_1, GGML_Q5_0, GGML_Q5_1, GGML_Q8_0 = 0, 1, 2, 3, 6, 7, 8
GGML_Q4_K, GGML_Q5_K, GGML_Q6_K, GGML_BF16 = 12, 13, 14, 30
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
    raise ImportError("minillm.formats.ggml_quants assumes a little-endian host "
                      "(GGUF is little-endian)")


def _blocks(x: torch.Tensor, what: str, block: int = QK) -> torch.Tensor:
    """(..., K) float -> (N, block) float32 blocks, checking K and finiteness."""
    if x.shape[-1] % block != 0:
        raise ValueError(f"{what}: row length {x.shape[-1]} is not a multiple of the block size "
                         f"{block}")
    xb = x.detach().to(device="cpu", dtype=torch.float32).reshape(-1, block)
    if not bool(torch.isfinite(xb).all()):
        raise ValueError(f"{what}: input holds NaN or infinite values "
                         f"(ggml's quantizers are undefined there)")
    return xb


def _fp16_bytes(d: torch.Tensor) -> torch.Tensor:
    """(N, 1) float32 -> (N, 2) uint8: round to nearest even fp16 (as F16C / ggml),
    little-endian."""
    return d.to(torch.float16).view(torch.uint8).reshape(-1, 2)


def _round_half_away(v: torch.Tensor) -> torch.Tensor:
    """C roundf on float32: torch.round rounds halves to even, so round the truncation away instead.
    v - trunc(v) is exact in float32, so the comparison with 0.5 sees true ties."""
    t = v.trunc()
    return torch.where((v - t).abs() >= 0.5, t + torch.sign(v), t)


# --------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------
# Q4_0


def quantize_q4_0(x: torch.Tensor) -> torch.Tensor:
    """(R, K) float -> (R, K/32 * 18) uint8 Q4_0 blocks, as `quantize_row_q4_0_ref`."""
    rows = x.shape[0] if x.dim() > 1 else 1
    xb = _blocks(x, "Q4_0")  # (N, 32)
    # argmax returns the first maximal index, like the C loop's strict `amax < fabsf(v)`
    idx = xb.abs().argmax(dim=1, keepdim=True)  # (N, 1)
    m = xb.gather(1, idx)
    # an all-zero block keeps the C initial value +0.0 (also for -0.0)
    m = torch.where(m != 0, m, 0.0)
    d = m / -8.0  # exact (power of two) except in the subnormal range, as in C
    inv = torch.where(d != 0, 1.0 / torch.where(d != 0, d, 1.0), 0.0)
    v = xb * inv + 8.5  # two float32 roundings (see 3. above), then the (int8) cast truncates
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


# --------------------------------------------------------------------------------------------------
# Q5_0, Q4_1, Q5_1


def _signed_absmax(xb: torch.Tensor) -> torch.Tensor:
    """(N, 32) -> (N, 1): the first value of largest |x|, with its sign (+0.0 for an all-zero
    block)."""
    m = xb.gather(1, xb.abs().argmax(dim=1, keepdim=True))
    return torch.where(m != 0, m, 0.0)


def _first_min_max(xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 32) -> min, max (N, 1) as the C loop finds them: the first element equal to each (a zero
    keeps the sign of the first zero that attains it)."""
    first = [(xb == v).to(torch.uint8).argmax(dim=1, keepdim=True)
             for v in (xb.amin(1, True), xb.amax(1, True))]
    return xb.gather(1, first[0]), xb.gather(1, first[1])


def _inverse(d: torch.Tensor) -> torch.Tensor:
    # id = d ? 1.0f/d : 0.0f
    return torch.where(d != 0, torch.tensor(1.0) / torch.where(d != 0, d, 1.0), 0.0)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(N, 32) codes -> (N, 16) bytes: low nibble q[j], high nibble q[j + 16]."""
    q = q.to(torch.uint8) & 0x0F
    return q[:, :16] | (q[:, 16:] << 4)


def _pack_fifth_bits(q: torch.Tensor) -> torch.Tensor:
    """(N, 32) codes -> (N, 4) bytes: the little-endian uint32 whose bit j is bit 4 of q[j]."""
    bits = ((q.to(torch.int64) >> 4) & 1) << torch.arange(32)
    return bits.sum(dim=1, keepdim=True).view(torch.uint8)[:, :4]  # low 4 bytes of the int64


def _unpack_5bit(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """(N, 4) qh and (N, 16) qs bytes -> (N, 32) float32 codes 0..31."""
    low = torch.cat([qs & 0x0F, qs >> 4], dim=1).int()
    high = (qh.contiguous().view(torch.int32) >> torch.arange(32, dtype=torch.int32)) & 1
    return (low | (high << 4)).float()


def quantize_q5_0(x: torch.Tensor) -> torch.Tensor:
    """(R, K) float -> (R, K/32 * 22) uint8 Q5_0 blocks, as `quantize_row_q5_0_ref`."""
    rows = x.shape[0] if x.dim() > 1 else 1
    xb = _blocks(x, "Q5_0")  # (N, 32)
    d = _signed_absmax(xb) / -16.0
    v = xb * _inverse(d) + 16.5  # two float32 roundings (no FMA), see the module docstring
    q = v.trunc().clamp(max=31)  # (int8_t) truncates; MIN(31, .)
    out = torch.cat([_fp16_bytes(d), _pack_fifth_bits(q), _pack_nibbles(q)], dim=1)  # (N, 22)
    return out.reshape(rows, -1)


def dequantize_q5_0(data: torch.Tensor, n: int) -> torch.Tensor:
    """(R, n/32 * 22) uint8 -> (R, n) float32, as `dequantize_row_q5_0`."""
    blocks = data.reshape(-1, 22)
    d = blocks[:, :2].contiguous().view(torch.float16).float()
    return ((_unpack_5bit(blocks[:, 2:6], blocks[:, 6:]) - 16.0) * d).reshape(-1, n)


def _quantize_type1(x: torch.Tensor, what: str, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_1 / Q5_1 common part: (fp16 d and m bytes (N, 4), codes before clamping (N, 32)
    float32)."""
    xb = _blocks(x, what)  # (N, 32)
    mn, mx = _first_min_max(xb)
    d = (mx - mn) / float(nmax)
    # two float32 roundings, then the integer cast truncates
    q = ((xb - mn) * _inverse(d) + 0.5).trunc()
    return torch.cat([_fp16_bytes(d), _fp16_bytes(mn)], dim=1), q


def quantize_q4_1(x: torch.Tensor) -> torch.Tensor:
    """(R, K) float -> (R, K/32 * 20) uint8 Q4_1 blocks, as `quantize_row_q4_1_ref`."""
    rows = x.shape[0] if x.dim() > 1 else 1
    head, q = _quantize_type1(x, "Q4_1", 15)
    return torch.cat([head, _pack_nibbles(q.clamp(max=15))], dim=1).reshape(rows, -1)


def quantize_q5_1(x: torch.Tensor) -> torch.Tensor:
    """(R, K) float -> (R, K/32 * 24) uint8 Q5_1 blocks, as `quantize_row_q5_1_ref` (which has no
    MIN(31, .): a code of 32 keeps only its low five bits, 0)."""
    rows = x.shape[0] if x.dim() > 1 else 1
    head, q = _quantize_type1(x, "Q5_1", 31)
    return torch.cat([head, _pack_fifth_bits(q), _pack_nibbles(q)], dim=1).reshape(rows, -1)


def dequantize_q4_1(data: torch.Tensor, n: int) -> torch.Tensor:
    """(R, n/32 * 20) uint8 -> (R, n) float32, as `dequantize_row_q4_1`."""
    blocks = data.reshape(-1, 20)
    dm = blocks[:, :4].contiguous().view(torch.float16).float()  # (N, 2): d, m
    qs = blocks[:, 4:]
    q = torch.cat([qs & 0x0F, qs >> 4], dim=1).float()
    return (q * dm[:, :1] + dm[:, 1:]).reshape(-1, n)


def dequantize_q5_1(data: torch.Tensor, n: int) -> torch.Tensor:
    """(R, n/32 * 24) uint8 -> (R, n) float32, as `dequantize_row_q5_1`."""
    blocks = data.reshape(-1, 24)
    dm = blocks[:, :4].contiguous().view(torch.float16).float()
    return (_unpack_5bit(blocks[:, 4:8], blocks[:, 8:]) * dm[:, :1] + dm[:, 1:]).reshape(-1, n)


# --------------------------------------------------------------------------------------------------
# F16 / BF16 / F32


def f32_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """float32 -> bfloat16 exactly as `ggml_compute_fp32_to_bf16`.

    Round to nearest even on the top 16 bits; a NaN keeps its sign and top payload bits with the
    quiet bit forced (`bits >> 16 | 64`), where torch would return one canonical NaN.
    """
    u = x.detach().to(device="cpu", dtype=torch.float32).contiguous().view(torch.int32)
    is_nan = (u & 0x7FFFFFFF) > 0x7F800000
    # int32 arithmetic: the low 16 bits after `>> 16` are those of the uint32 C code (wrap-around
    # only happens in the NaN lanes, which `where` discards)
    b = torch.where(is_nan, (u >> 16) | 64, (u + (0x7FFF + ((u >> 16) & 1))) >> 16).to(torch.int16)
    return b.view(torch.bfloat16)


# ggml type -> (encoder, decoder); the 32-value types take and give rows, the K-quants super-blocks
_BLOCK32_CODECS = {
    GGML_Q8_0: (quantize_q8_0, dequantize_q8_0),
    GGML_Q4_0: (quantize_q4_0, dequantize_q4_0),
    GGML_Q4_1: (quantize_q4_1, dequantize_q4_1),
    GGML_Q5_0: (quantize_q5_0, dequantize_q5_0),
    GGML_Q5_1: (quantize_q5_1, dequantize_q5_1),
}
_KQUANT_CODECS = {
    GGML_Q4_K: (kquants.quantize_q4_k, kquants.dequantize_q4_k),
    GGML_Q5_K: (kquants.quantize_q5_k, kquants.dequantize_q5_k),
    GGML_Q6_K: (kquants.quantize_q6_k, kquants.dequantize_q6_k),
}


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
    if ggml_type in _BLOCK32_CODECS:
        return _BLOCK32_CODECS[ggml_type][0](x.reshape(rows, -1))
    if ggml_type in _KQUANT_CODECS:
        xb = _blocks(x, type_name(ggml_type), kquants.QK_K)  # (N, 256)
        return _KQUANT_CODECS[ggml_type][0](xb).reshape(rows, -1)
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
    if ggml_type in _BLOCK32_CODECS:
        return _BLOCK32_CODECS[ggml_type][1](data, n)
    if ggml_type in _KQUANT_CODECS:
        _, _, size = GGML_TYPES[ggml_type]
        return _KQUANT_CODECS[ggml_type][1](data.reshape(-1, size)).reshape(-1, n)
    readable = "/".join(type_name(t) for t in (GGML_F32, GGML_F16, GGML_BF16, *_BLOCK32_CODECS,
                                               *_KQUANT_CODECS))
    raise ValueError(f"no decoder for ggml type {type_name(ggml_type)} (minillm reads {readable})")


def type_name(ggml_type: int) -> str:
    return GGML_TYPES[ggml_type][0] if ggml_type in GGML_TYPES else f"id {ggml_type}"


def row_bytes(ggml_type: int, n: int) -> int:
    """Bytes of one row of n values; n must be a multiple of the type's block size."""
    _, block, size = GGML_TYPES[ggml_type]
    if n % block != 0:
        raise ValueError(f"row length {n} is not a multiple of the {type_name(ggml_type)} "
                         f"block size {block}")
    return n // block * size
