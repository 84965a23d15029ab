"""ggml Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1 / BF16 codecs against slow per-element
transcriptions of ggml's C.

The references below follow `quantize_row_{q8_0,q4_0,q4_1,q5_0,q5_1}_ref`, the
dequantizers and `ggml_compute_fp32_to_bf16` line by line, in Python floats with
explicit float32 roundings (`f32`). The golden Q4_0 blocks are llama.cpp's own bytes
(`ggml_quantize_chunk` of llama-cpp-python's libggml-base, x86-64, no FMA); the same C
compiled with `gcc -O2 -march=native` fuses `x0 + 8.5f` and differs there.
"""

import math
import struct

import pytest
import torch

from minillm.formats.ggml_quants import (
    GGML_BF16,
    GGML_F16,
    GGML_F32,
    GGML_Q4_0,
    GGML_Q4_1,
    GGML_Q5_0,
    GGML_Q5_1,
    GGML_Q8_0,
    dequantize,
    f32_to_bf16,
    quantize,
    quantize_q4_0,
    quantize_q4_1,
    quantize_q5_0,
    quantize_q5_1,
    quantize_q8_0,
    row_bytes,
)


def f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def fp16_bytes(x: float) -> bytes:
    return struct.pack("<e", x)  # IEEE half, round to nearest even (as F16C)


def ref_q8_0_block(xs: list[float]) -> bytes:
    amax = 0.0
    for v in xs:
        amax = max(amax, abs(v))
    d = f32(amax / 127)
    inv = f32(1.0 / d) if d else 0.0
    out = fp16_bytes(d)
    for v in xs:
        x0 = f32(v * inv)
        q = math.copysign(math.floor(abs(x0) + 0.5), x0)  # roundf: halves away from zero
        out += struct.pack("<b", int(q))
    return out


def ref_q4_0_block(xs: list[float]) -> bytes:
    amax, mx = 0.0, 0.0
    for v in xs:
        if amax < abs(v):  # strict: the first of equal magnitudes wins
            amax, mx = abs(v), v
    d = f32(mx / -8)
    inv = f32(1.0 / d) if d else 0.0
    q = []
    for v in xs:
        x0 = f32(v * inv)  # const float x0 = x*id; then x0 + 8.5f, each rounded to float32 (no FMA)
        q.append(min(15, int(f32(x0 + 8.5))))  # int() truncates like the (int8_t) cast
    return fp16_bytes(d) + bytes(q[j] | (q[j + 16] << 4) for j in range(16))


def ref_q5_0_block(xs: list[float]) -> bytes:
    amax, mx = 0.0, 0.0
    for v in xs:
        if amax < abs(v):
            amax, mx = abs(v), v
    d = f32(mx / -16)
    inv = f32(1.0 / d) if d else 0.0
    q = [min(31, int(f32(f32(v * inv) + 16.5))) for v in xs]  # x0 = x*id, then (int8_t)(x0 + 16.5f)
    qh = sum(((q[j] & 0x10) >> 4) << j for j in range(32))
    return fp16_bytes(d) + struct.pack("<I", qh) + bytes((q[j] & 15) | ((q[j + 16] & 15) << 4)
                                                         for j in range(16))


def ref_type1_block(xs: list[float], nmax: int) -> bytes:
    """quantize_row_q4_1_ref (nmax 15) and quantize_row_q5_1_ref (nmax 31)."""
    mn, mx = 3.4028234663852886e38, -3.4028234663852886e38  # FLT_MAX
    for v in xs:
        if v < mn:
            mn = v
        if v > mx:
            mx = v
    d = f32((mx - mn) / nmax)
    inv = f32(1.0 / d) if d else 0.0
    q = [int(f32(f32(f32(v - mn) * inv) + 0.5)) for v in xs]  # (int8_t) / (uint8_t) truncation
    head = fp16_bytes(d) + fp16_bytes(mn)
    if nmax == 15:
        q = [min(15, c) for c in q]
        return head + bytes(q[j] | (q[j + 16] << 4) for j in range(16))
    qh = sum(((q[j] & 0x10) >> 4) << j for j in range(32))
    return head + struct.pack("<I", qh) + bytes((q[j] & 15) | ((q[j + 16] & 15) << 4)
                                                for j in range(16))


def ref_dequant(block: bytes, kind: str) -> list[float]:
    d = struct.unpack("<e", block[:2])[0]
    if kind in ("q5_0", "q5_1"):
        m = struct.unpack("<e", block[2:4])[0] if kind == "q5_1" else 0.0
        qh = struct.unpack("<I", block[-20:-16])[0]
        qs = block[-16:]
        q = [(qs[j] & 15) | (((qh >> j) & 1) << 4) for j in range(16)]
        q += [(qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4) for j in range(16)]
        if kind == "q5_0":
            return [f32((c - 16) * d) for c in q]
        return [f32(f32(c * d) + m) for c in q]  # x0*d + m
    if kind == "q4_1":
        m = struct.unpack("<e", block[2:4])[0]
        return [f32(f32(q * d) + m)
                for q in [b & 15 for b in block[4:]] + [b >> 4 for b in block[4:]]]
    if kind == "q8_0":
        return [f32(q * d) for q in struct.unpack("<32b", block[2:])]
    lo = [(b & 0x0F) - 8 for b in block[2:]]
    hi = [(b >> 4) - 8 for b in block[2:]]
    return [f32(q * d) for q in lo + hi]


def ref_bf16_bits(x: float) -> int:
    u = struct.unpack("<I", struct.pack("<f", x))[0]
    if (u & 0x7FFFFFFF) > 0x7F800000:
        return (u >> 16) | 64
    return ((u + (0x7FFF + ((u >> 16) & 1))) >> 16) & 0xFFFF


def special_blocks() -> torch.Tensor:
    """Blocks where a plausible-but-wrong implementation differs from ggml."""
    g = torch.Generator().manual_seed(1)
    blocks = []
    # Q8_0 ties: amax 127 gives d = 1, id = 1, so x*id sits exactly on .5
    b = torch.tensor([2.5, -3.5, 0.5, -0.5, 126.5, 127.0] + [1.5] * 26)
    blocks.append(b)
    blocks.append(torch.zeros(32))  # all-zero
    blocks.append(-torch.zeros(32))  # all negative zero
    b = torch.randn(32, generator=g)
    b[7] = -9.0  # negative extreme value
    blocks.append(b)
    b = torch.randn(32, generator=g)
    b[3], b[20] = -4.0, 4.0  # equal magnitudes: the first (negative) sets the sign of d
    blocks.append(b)
    b = torch.randn(32, generator=g)
    b[3], b[20] = 4.0, -4.0
    blocks.append(b)
    # d not representable in fp16: rounding matters
    blocks.append(torch.randn(32, generator=g) * 0.3337)
    blocks.append(torch.randn(32, generator=g) * 1e-6)  # fp16 subnormal scales
    blocks.append(torch.full((32,), 1.0 / 3.0))  # all equal
    # Q4_0 ties: m = -8 gives d = 1, id = 1, so x*id + 8.5 lands on integers and halves
    blocks.append(torch.tensor([-8.0, 7.5, -7.5, 0.5, -0.5, 6.0, 7.0, 7.49] + [0.0] * 24))
    return torch.stack(blocks)


@pytest.fixture(scope="module")
def values() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    # awkward (9, 96), many scales
    return torch.randn(9, 96, generator=g) * torch.logspace(-3, 2, 9)[:, None]


def blocks_of(x: torch.Tensor) -> list[list[float]]:
    return [[float(v) for v in row] for row in x.reshape(-1, 32)]


def test_q8_0_matches_reference(values):
    x = torch.cat([values.reshape(-1, 32), special_blocks()])
    got = quantize_q8_0(x)
    expected = b"".join(ref_q8_0_block(b) for b in blocks_of(x))
    assert got.numpy().tobytes() == expected
    # the tie block: 2.5 -> 3 and -3.5 -> -4, 0.5 -> 1, -0.5 -> -1, 126.5 -> 127
    # (torch.round: 2, -4, 0, 0, 126)
    tie = quantize_q8_0(special_blocks()[:1]).numpy().tobytes()
    assert tie[:2] == fp16_bytes(1.0)
    assert list(struct.unpack("<6b", tie[2:8])) == [3, -4, 1, -1, 127, 127]


def test_q4_0_matches_reference(values):
    x = torch.cat([values.reshape(-1, 32), special_blocks()])
    got = quantize_q4_0(x)
    expected = b"".join(ref_q4_0_block(b) for b in blocks_of(x))
    assert got.numpy().tobytes() == expected


def test_q4_0_edge_cases_exact_bytes():
    sb = special_blocks()
    zero = quantize_q4_0(sb[1:2]).numpy().tobytes()
    # C keeps max = +0.0, so d = 0 / -8 = -0.0 (fp16 bytes 00 80); id = 0, codes (int8)(8.5) = 8
    assert zero == bytes([0x00, 0x80]) + bytes([0x88] * 16)
    assert quantize_q4_0(sb[2:3]).numpy().tobytes() == zero  # -0.0 never beats amax = 0
    neg_first = quantize_q4_0(sb[4:5]).numpy().tobytes()
    pos_first = quantize_q4_0(sb[5:6]).numpy().tobytes()
    assert neg_first[:2] == fp16_bytes(0.5)  # m = -4 -> d = 0.5
    assert pos_first[:2] == fp16_bytes(-0.5)  # m = +4 -> d = -0.5
    ties = quantize_q4_0(sb[-1:]).numpy().tobytes()
    # d = 1: codes trunc(x + 8.5) = 0, 16->15, 1, 9, 8, 14, 15, 15 for the first eight values
    lo = [b & 0x0F for b in ties[2:10]]
    assert ties[:2] == fp16_bytes(1.0) and lo == [0, 15, 1, 9, 8, 14, 15, 15]


def test_q4_0_golden_llama_cpp_blocks():
    """Two blocks where rounding twice and a fused multiply-add disagree:
    llama.cpp's bytes (x86-64 build)."""
    x = torch.zeros(2, 32)
    bits = [(0xC04816BE, 0x3F16110B), (0xBFFDA677, 0xBF5DF1A8)]
    for i, (m, v) in enumerate(bits):
        x[i, 0] = struct.unpack("<f", struct.pack("<I", m))[0]
        x[i, 1] = x[i, 17] = struct.unpack("<f", struct.pack("<I", v))[0]
    got = quantize_q4_0(x).numpy().tobytes().hex()
    # block 0: with an FMA (gcc -march=native) byte 3 would be 0x99
    # block 1: float64 truncated without the final float32 rounding would give 0x44
    assert got == "413680aa8888888888888888888888888888" "ed3380558888888888888888888888888888"


def type1_blocks() -> torch.Tensor:
    """Blocks where Q4_1 / Q5_1 / Q5_0 go wrong in plausible ways."""
    g = torch.Generator().manual_seed(4)
    b = [torch.zeros(32), torch.full((32,), -2.5), torch.rand(32, generator=g) + 3.0,
         -torch.rand(32, generator=g)]
    z = torch.rand(32, generator=g)
    z[4], z[9] = -0.0, 0.0  # the min is zero: the first zero's sign goes into m
    b.append(z)
    # max - min = 31: d = 1, so (x - min)*id + 0.5 lands on halves; 31 -> code 31.5
    t = torch.arange(32.0)
    b.append(t)
    b.append(torch.linspace(-1, 1, 32) * 1e-6)  # fp16 subnormal d
    e = torch.randn(32, generator=g)
    e[11] = 40.0  # one outlier
    b.append(e)
    return torch.stack(b)


@pytest.mark.parametrize("kind", ["q4_1", "q5_0", "q5_1"])
def test_type1_and_q5_0_match_reference(values, kind):
    quant = {"q4_1": quantize_q4_1, "q5_0": quantize_q5_0, "q5_1": quantize_q5_1}[kind]
    ref = {"q4_1": lambda b: ref_type1_block(b, 15), "q5_0": ref_q5_0_block,
           "q5_1": lambda b: ref_type1_block(b, 31)}
    x = torch.cat([values.reshape(-1, 32), special_blocks(), type1_blocks()])
    got = quant(x).numpy().tobytes()
    assert got == b"".join(ref[kind](b) for b in blocks_of(x))
    # the zero-min block keeps the sign of the first zero: m = -0.0 (fp16 bytes 00 80)
    zmin = quant(type1_blocks()[4:5]).numpy().tobytes()
    if kind != "q5_0":
        assert zmin[2:4] == bytes([0x00, 0x80])


@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
def test_dequantize_matches_reference(values, kind):
    gtype, size = {"q8_0": (GGML_Q8_0, 34), "q4_0": (GGML_Q4_0, 18), "q4_1": (GGML_Q4_1, 20),
                   "q5_0": (GGML_Q5_0, 22), "q5_1": (GGML_Q5_1, 24)}[kind]
    data = quantize(values, gtype)  # (9, 3 blocks)
    got = dequantize(data, gtype, 96)
    raw = data.numpy().tobytes()
    expected = [v for i in range(0, len(raw), size) for v in ref_dequant(raw[i : i + size], kind)]
    assert got.shape == (9, 96)
    assert got.reshape(-1).tolist() == expected
    if kind not in ("q8_0", "q4_0"):
        # asymmetric / 5-bit types: within half a step (plus the fp16
        # rounding of d and m) of the input
        amax = values.abs().reshape(-1, 32).amax(dim=1)
        span = values.reshape(-1, 32).amax(1) - values.reshape(-1, 32).amin(1)
        steps = {"q4_1": 15, "q5_0": 16, "q5_1": 31}[kind]
        step = (2 * amax if kind == "q5_0" else span) / steps
        err = (got - values).abs().reshape(-1, 32).amax(dim=1)
        assert bool((err <= 0.5 * step + 2e-3 * amax).all())
        return
    # error per block: half a step for Q8_0, one step for Q4_0 (x = -m clamps to code 15 = 7 steps),
    # plus what rounding d to fp16 costs at the largest code
    d16 = torch.tensor([struct.unpack("<e", raw[i : i + 2])[0]
                        for i in range(0, len(raw), size)]).abs()
    amax = values.abs().reshape(-1, 32).amax(dim=1)
    d32, qmax, step = (amax / 127, 127, 0.5) if kind == "q8_0" else (amax / 8, 8, 1.0)
    err = (got - values).abs().reshape(-1, 32).amax(dim=1)
    assert bool((err <= step * d16 + qmax * (d16 - d32).abs() + 1e-7 * amax).all())


def test_bf16_matches_ggml_including_nan():
    g = torch.Generator().manual_seed(2)
    specials = [1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8), 3.4e38, -0.0, 1e-40, float("inf")]
    x = torch.cat([torch.randn(301, generator=g) * 1e3, torch.tensor(specials)])
    nan_bits = torch.tensor([0x7F800001, 0xFFC12345 - 2**32, 0x7FC00000], dtype=torch.int32)
    x = torch.cat([x, nan_bits.view(torch.float32)])
    got = f32_to_bf16(x).view(torch.int16).tolist()
    expected = [ref_bf16_bits(float(v)) for v in x[:-3]]
    expected += [ref_bf16_bits(struct.unpack("<f", struct.pack("<i", int(b)))[0]) for b in nan_bits]
    assert [b & 0xFFFF for b in got] == expected
    # quiet bit forced, sign and payload top bits kept
    assert expected[-3:] == [0x7FC0, 0xFFC1, 0x7FC0]
    # ties to even: 1 + 2^-8 rounds down to 1.0, 1 + 3*2^-8 up to 1 + 2^-6
    assert expected[301:303] == [0x3F80, 0x3F82]
    # torch agrees on every non-NaN value
    assert torch.equal(f32_to_bf16(x[:-3]).view(torch.int16), x[:-3].bfloat16().view(torch.int16))


def test_type_dispatch_round_trip():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 64, generator=g)
    assert torch.equal(dequantize(quantize(x, GGML_F32), GGML_F32, 64), x)
    assert torch.equal(dequantize(quantize(x, GGML_F16), GGML_F16, 64), x.half().float())
    assert torch.equal(dequantize(quantize(x, GGML_BF16), GGML_BF16, 64), x.bfloat16().float())
    assert quantize(x, GGML_Q8_0).shape == (5, row_bytes(GGML_Q8_0, 64)) == (5, 68)
    assert quantize(x, GGML_Q4_0).shape == (5, row_bytes(GGML_Q4_0, 64)) == (5, 36)


def test_errors():
    with pytest.raises(ValueError, match="not a multiple of the block size 32"):
        quantize_q8_0(torch.ones(2, 40))
    with pytest.raises(ValueError, match="NaN or infinite"):
        quantize_q4_0(torch.tensor([float("nan")] + [0.0] * 31))
    with pytest.raises(ValueError, match="Q4_0 block size 32"):
        row_bytes(GGML_Q4_0, 48)
    with pytest.raises(ValueError, match="no encoder for ggml type Q3_K"):
        quantize(torch.ones(1, 256), 11)
    with pytest.raises(ValueError, match="Q4_K: row length 96 is not a multiple of the "
                                         "block size 256"):
        quantize(torch.ones(1, 96), 12)
