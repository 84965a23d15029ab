"""K-quants: ggml's Q4_K, Q5_K and Q6_K super-blocks, vectorized and bit-exact with llama.cpp's
reference quantizer.

Spec: `quantize_row_q4_K_ref`, `quantize_row_q5_K_ref`, `quantize_row_q6_K_ref`, their helpers
`make_qkx2_quants`, `make_qx_quants`, `nearest_int`, and `dequantize_row_q{4,5,6}_K` in
ggml/src/ggml-quants.c; the block structs in ggml/src/ggml-common.h
(https://github.com/ggml-org/llama.cpp). A row is cut into super-blocks of QK_K = 256:

    Q4_K (144 B): d, dmin (fp16) | scales[12]: 8 six-bit scales sc_j and 8 six-bit mins m_j |
                  qs[128]: 4-bit q
                  8 sub-blocks of 32:   x ≈ (d·sc_j)·q - dmin·m_j            q in 0..15
    Q5_K (176 B): as Q4_K plus qh[32], the fifth bit of each q              q in 0..31
    Q6_K (210 B): ql[128] (low 4 bits) | qh[64] (high 2 bits) | scales[16] (int8) | d (fp16)
                  16 sub-blocks of 16:  x ≈ (d·sc_j)·(q - 32)               q in 0..63

How the scales are chosen. Q4_K / Q5_K: each sub-block is fitted as x ≈ scale·L + min (min ≤ 0) by
`make_qkx2_quants`: a weighted least-squares fit (weights av_x + |x|, av_x the sub-block's RMS)
repeated for nstep+1 trial grids iscale = (nmax + rmin + rdelta·k) / (max - min), keeping the fit of
least weighted squared error; each accepted fit moves `min`, and the next trial grid is laid from
that new min. The 8 scales and 8 mins are then quantized to 6 bits against their maxima
(d = max_scale/63, dmin = max_min/63, stored fp16), and every value is re-quantized with the
fp16-rounded d·sc_j and dmin·m_j. Q6_K: each sub-block's symmetric scale comes from
`make_qx_quants` (weights x², 19 trial grids nmax + 0.1·k), the 16 scales become int8 against the
one of largest magnitude (d = max_scale / -128), and values are re-quantized with fp16(d)·sc_j.

Bit-exactness. The C code runs in float32, one rounding per operation, in source order; this file
does the same. Four things a natural PyTorch version gets wrong, each handled here:
1. sums are C loops `s += t[i]`: `sum_in_order` adds rows one at a time (torch.sum pairs them);
2. `nearest_int` adds 1.5·2^23 and reads mantissa bits (round half to even, and defined bits for any
   input);
3. torch's float32 `sqrt` is not correctly rounded on CPU (it differs from sqrtf in ~17% of values),
   so it is taken in float64 and rounded once; and `scalar / tensor` in torch is
   `reciprocal() * scalar` (two roundings), so every division here has a tensor numerator;
4. no fused multiply-add: x86-64 builds of ggml's quantizer (ggml-base, compiled without -mfma)
   round each product; a build that contracts `a*b + c` (aarch64, or -march=native on ggml-base) may
   pick a different grid in a few blocks per million.

Layout. Values run along dim 0 and blocks along dim 1 — x is (n, M) for M sub-blocks of n values —
so a C loop over i is a loop over rows, and per-block quantities are (M,) vectors that broadcast
over the values. Encoders take (N, 256) float32 super-blocks (finite, checked by the caller) and
return (N, bytes) uint8.
"""

from __future__ import annotations

import numpy as np
import torch

QK_K = 256  # values per super-block
GROUP_MAX_EPS = float(np.float32(1e-15))  # make_qx_quants: below this |max| a sub-block is all zero
# super-blocks encoded at once: (n, M) temporaries of 4 MB, big enough for intra-op threads
CHUNK = 4096


def f32(c: float) -> torch.Tensor:
    """A float32 scalar tensor (a C float constant), so `f32(c) / t` is one correctly rounded
    division."""
    return torch.tensor(c, dtype=torch.float32)


def nearest_int(v: torch.Tensor) -> torch.Tensor:
    """float32 -> int32 as ggml's `nearest_int`: v + 12582912.f rounds v to an integer (half to
    even) in the low mantissa bits, which are read back. Exact for |v| < 2^22; beyond (and for
    inf/NaN) it returns the same wrapped bits as the C code."""
    bits = (v + 12582912.0).view(torch.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def sum_in_order(t: torch.Tensor) -> torch.Tensor:
    """(n, ...) -> (...): ((t[0] + t[1]) + t[2]) + ..., float32, as the C loop `s += t[i]`.

    numpy reduces an axis that is not the fastest in memory one row at a time, in float32 (its
    pairwise summation applies only along the fast axis, see numpy.sum's notes): one call instead
    of n - 1 adds."""
    return torch.from_numpy(np.add.reduce(t.contiguous().numpy(), axis=0))


def round_codes_(v: torch.Tensor, bound: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """MAX(lo, MIN(hi, nearest_int(v))) as float32 codes, in place. torch.round (half to even) is
    nearest_int for |v| < 2^22, which `bound` (M,), an upper bound of |v| per block, vouches for;
    otherwise (huge, inf or NaN values) the exact bit path runs."""
    if bool((bound < 4194304.0).all()):  # false for NaN too
        return v.round_().clamp_(lo, hi)
    return nearest_int(v).clamp_(lo, hi).float()


def sqrt_f32(v: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 sqrt (sqrtf): float64 sqrt rounded once is exact for float32
    inputs."""
    return v.double().sqrt().float()


def _chunked(encode, xb: torch.Tensor) -> torch.Tensor:
    return (torch.cat([encode(xb[i : i + CHUNK]) for i in range(0, xb.shape[0], CHUNK)])
            if xb.shape[0] else encode(xb))


# --------------------------------------------------------------------------------------------------
# the two scale searches


def make_qkx2_quants(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float,
                     nstep: int):
    """Asymmetric fit x ≈ scale·L + min, L in 0..nmax, for each of M sub-blocks (use_mad = false).

    x, w: (n, M) float32 values and weights. Returns scale (M,), the_min = -min (M,) and L (n, M)
    int32. A flat sub-block (max == min after `min = min(min, 0)`) gets scale 0, L 0.
    """
    mn = x.amin(0)  # (M,) the sign of a zero min never reaches the output
    mx = x.amax(0)
    sum_w = sum_in_order(w)
    sum_x = sum_in_order(w * x)
    lowest = mn
    mn = torch.where(mn > 0, 0.0, mn)
    flat = mx == mn
    flat_min = mn

    # clamp(nearest_int(iscale·(x - min)), 0, nmax); x - min spans lowest - min .. max - min
    def codes(iscale, mn):
        reach = torch.maximum((mx - mn).abs(), (lowest - mn).abs())
        bound = torch.where(flat, 0.0, iscale.abs() * reach)
        return round_codes_((x - mn).mul_(iscale), bound, 0, nmax)

    def error(scale, mn, l):  # Σ w·(scale·l + min - x)², in order
        diff = (l * scale).add_(mn).sub_(x)
        return sum_in_order(diff.mul_(diff).mul_(w))

    iscale = f32(nmax) / (mx - mn)
    scale = f32(1.0) / iscale
    L = codes(iscale, mn)  # (n, M) float32 codes
    best = error(scale, mn, L)
    terms = x.new_empty((x.shape[0], 3, x.shape[1]))  # (n, 3, M): w·l, w·l·l, w·l·x
    for k in range(nstep + 1):
        # C float arithmetic
        grid = np.float32(rmin) + np.float32(rdelta) * np.float32(k) + np.float32(nmax)
        l = codes(f32(float(grid)) / (mx - mn), mn)
        wl = torch.mul(w, l, out=terms[:, 0])
        torch.mul(wl, l, out=terms[:, 1])
        torch.mul(wl, x, out=terms[:, 2])
        sum_l, sum_l2, sum_xl = sum_in_order(terms)  # 3 × (M,)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        clip = this_min > 0
        this_min = torch.where(clip, 0.0, this_min)
        this_scale = torch.where(clip, sum_xl / sum_l2, this_scale)
        cur = error(this_scale, this_min, l)
        take = (D > 0) & (cur < best)  # NaN errors compare false, as in C
        L = torch.where(take, l, L)
        best = torch.where(take, cur, best)
        scale = torch.where(take, this_scale, scale)
        mn = torch.where(take, this_min, mn)
    L = torch.where(flat, 0, L.int())
    return torch.where(flat, 0.0, scale), -torch.where(flat, flat_min, mn), L


def make_qx_quants(x: torch.Tensor, nmax: int):
    """Symmetric fit x ≈ scale·(L - nmax), L in 0..2·nmax-1, weights x² (rmse_type 1, no importance
    matrix).

    x: (n, M) float32. Returns scale (M,) and L (n, M) int32. The sign of scale follows the value of
    largest magnitude (the first one on ties). A sub-block with max|x| < 1e-15 gets scale 0 and L 0.
    """
    # (1, M) first index of the largest |x|, like the C loop's strict `>`
    idx = x.abs().argmax(0, keepdim=True)
    mx = x.gather(0, idx)[0]  # (M,) that value, with its sign
    zero = mx.abs() < f32(GROUP_MAX_EPS)  # (M,)
    w = x * x
    wx = w * x
    terms = x.new_empty((x.shape[0], 2, x.shape[1]))  # (n, 2, M): w·x·l, w·l·l

    def fit(iscale):
        bound = torch.where(zero, 0.0, iscale.abs() * mx.abs())  # |iscale·x| <= |iscale·max|
        l = round_codes_(x * iscale, bound, -nmax, nmax - 1)
        torch.mul(wx, l, out=terms[:, 0])
        torch.mul(torch.mul(w, l, out=terms[:, 1]), l, out=terms[:, 1])
        sumlx, suml2 = sum_in_order(terms)  # 2 × (M,)
        return l.int() + nmax, sumlx, suml2

    L, sumlx, suml2 = fit(f32(-nmax) / mx)
    scale = torch.where(suml2 != 0, sumlx / suml2, 0.0)
    best = scale * sumlx
    for k in range(-9, 10):
        if k == 0:
            continue
        grid = -(np.float32(nmax) + np.float32(0.1) * np.float32(k))
        Lk, sumlx, suml2 = fit(f32(float(grid)) / mx)
        take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = torch.where(take, Lk, L)
        scale = torch.where(take, sumlx / suml2, scale)
        best = torch.where(take, scale * sumlx, best)
    return torch.where(zero, 0.0, scale), torch.where(zero, 0, L)


# --------------------------------------------------------------------------------------------------
# Q4_K / Q5_K: shared scale packing and requantization


def _pack_scales_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """(N, 8) six-bit scales and mins -> (N, 12) bytes, the layout `get_scale_min_k4` reads:
    bytes 0-3: sc0-3 | (sc4-7 >> 4) << 6,  bytes 4-7: m0-3 | (m4-7 >> 4) << 6,
    bytes 8-11: sc4-7 & 15 | m4-7 << 4."""
    lo = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    mid = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    hi = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return torch.cat([lo, mid, hi], 1).to(torch.uint8)


def _unpack_scales_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 12) uint8 -> sc, m as (N, 8) int32: `get_scale_min_k4` for j = 0..7."""
    s = s.int()
    sc = torch.cat([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], 1)
    m = torch.cat([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], 1)
    return sc, m


def _quantize_qk(xb: torch.Tensor, nmax: int, rmin: float, nstep: int):
    """Shared body of quantize_row_q4_K_ref / q5_K_ref: (N, 256) -> (d, dmin fp16 bytes (N, 4),
    scales (N, 12), L (N, 256) int32 in 0..nmax)."""
    N = xb.shape[0]
    x = xb.reshape(N * 8, 32).t().contiguous()  # (32, M) values × sub-blocks, M = 8N
    sum_x2 = sum_in_order(x * x)  # (M,)
    av_x = sqrt_f32(sum_x2 / 32)
    w = av_x + x.abs()
    scales, mins, L = make_qkx2_quants(x, w, nmax, rmin, 0.1, nstep)
    scales, mins = scales.reshape(N, 8), mins.reshape(N, 8)
    max_scale = scales.amax(1)
    max_scale = torch.where(max_scale > 0, max_scale, 0.0)  # C starts the running max at 0
    max_min = mins.amax(1)
    max_min = torch.where(max_min > 0, max_min, 0.0)
    inv_scale = torch.where(max_scale > 0, f32(63.0) / max_scale, 0.0)
    inv_min = torch.where(max_min > 0, f32(63.0) / max_min, 0.0)
    # (uint8_t) cast, then MIN(63, .)
    ls = (nearest_int(inv_scale[:, None] * scales) & 0xFF).clamp_(max=63)
    lm = (nearest_int(inv_min[:, None] * mins) & 0xFF).clamp_(max=63)
    d16 = (max_scale / 63).half()  # (N,)
    dmin16 = (max_min / 63).half()
    # requantize with the stored (fp16-rounded) scales; a sub-block whose d·sc is 0 keeps the
    # fit's L
    d = d16.float()[:, None] * ls.float()  # (N, 8)
    dm = dmin16.float()[:, None] * lm.float()
    d_t, dm_t = d.reshape(-1), dm.reshape(-1)  # (M,)
    requant = nearest_int((x + dm_t) / d_t).clamp_(0, nmax)
    L = torch.where(d_t != 0, requant, L).t().reshape(N, 256)
    head = torch.stack([d16, dmin16], 1).view(torch.uint8)  # (N, 4)
    return head, _pack_scales_k4(ls, lm), L


def _encode_q4_k(xb: torch.Tensor) -> torch.Tensor:
    head, scales, L = _quantize_qk(xb, 15, -1.0, 20)
    L = L.reshape(-1, 4, 2, 32).to(torch.uint8)  # 64-value chunks: byte l = L[l] | L[l + 32] << 4
    qs = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(-1, 128)
    return torch.cat([head, scales, qs], 1)


def _encode_q5_k(xb: torch.Tensor) -> torch.Tensor:
    head, scales, L = _quantize_qk(xb, 31, -0.5, 15)
    L = L.reshape(-1, 4, 2, 32).to(torch.uint8)  # (N, chunk c, half, l)
    low = L & 0xF
    ql = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    # qh[l] bit 2c holds the fifth bit of L[64c + l], bit 2c+1 that of L[64c + 32 + l]
    bit = (L >> 4).permute(0, 3, 1, 2).reshape(-1, 32, 8)  # (N, l, 2c + half)
    qh = (bit << torch.arange(8, dtype=torch.uint8)).sum(2, dtype=torch.uint8)
    return torch.cat([head, scales, qh, ql], 1)


def quantize_q4_k(xb: torch.Tensor) -> torch.Tensor:
    """(N, 256) float32 -> (N, 144) uint8, as `quantize_row_q4_K_ref`."""
    return _chunked(_encode_q4_k, xb)


def quantize_q5_k(xb: torch.Tensor) -> torch.Tensor:
    """(N, 256) float32 -> (N, 176) uint8, as `quantize_row_q5_K_ref`."""
    return _chunked(_encode_q5_k, xb)


def _dequantize_qk(head, scales, q) -> torch.Tensor:
    """d·sc_j·q - dmin·m_j per 32-value sub-block; q (N, 8, 32) float32."""
    dd = head.contiguous().view(torch.float16).float()  # (N, 2)
    sc, m = _unpack_scales_k4(scales)
    d = dd[:, :1] * sc.float()  # (N, 8)
    mn = dd[:, 1:] * m.float()
    return (d[:, :, None] * q - mn[:, :, None]).reshape(-1, QK_K)


def dequantize_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    """(N, 144) uint8 -> (N, 256) float32, as `dequantize_row_q4_K`."""
    qs = blocks[:, 16:].reshape(-1, 4, 1, 32)
    q = torch.cat([qs & 0xF, qs >> 4], 2).reshape(-1, 8, 32).float()
    return _dequantize_qk(blocks[:, :4], blocks[:, 4:16], q)


def dequantize_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    """(N, 176) uint8 -> (N, 256) float32, as `dequantize_row_q5_K`."""
    qh = blocks[:, 16:48]  # (N, 32)
    ql = blocks[:, 48:].reshape(-1, 4, 1, 32)
    low = torch.cat([ql & 0xF, ql >> 4], 2).reshape(-1, 8, 32)  # (N, sub-block 2c + half, l)
    # bit j of qh[l]
    high = (qh[:, None, :] >> torch.arange(8, dtype=torch.uint8)[None, :, None]) & 1
    return _dequantize_qk(blocks[:, :4], blocks[:, 4:16], (low | (high << 4)).float())


# --------------------------------------------------------------------------------------------------
# Q6_K


def _encode_q6_k(xb: torch.Tensor) -> torch.Tensor:
    N = xb.shape[0]
    x = xb.reshape(N * 16, 16).t().contiguous()  # (16, M) values × sub-blocks, M = 16N
    scales, L = make_qx_quants(x, 32)
    scales = scales.reshape(N, 16)
    idx = scales.abs().argmax(1, keepdim=True)  # first scale of largest magnitude
    max_scale = scales.gather(1, idx)[:, 0]  # (N,)
    zero = max_scale.abs() < f32(GROUP_MAX_EPS)  # such a super-block is written as all zero bytes
    iscale = f32(-128.0) / max_scale
    d16 = (f32(1.0) / iscale).half()
    sc = nearest_int(iscale[:, None] * scales).clamp_(max=127).to(torch.int8)  # (N, 16)
    d = (d16.float()[:, None] * sc.float()).reshape(-1)  # (M,)
    requant = nearest_int(x / d).clamp_(-32, 31) + 32
    # (N, half h, quarter, l)
    L = torch.where(d != 0, requant, L).t().reshape(N, 2, 4, 32).to(torch.uint8)
    low, high = L & 0xF, L >> 4
    # per 128-value half h: ql[64h + l] = L[l] | L[l+64] << 4,
    # ql[64h + 32 + l] = L[l+32] | L[l+96] << 4,
    # qh[32h + l] = high bits of L[l], L[l+32], L[l+64], L[l+96] at bit 0, 2, 4, 6
    ql = torch.cat([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)],
                   2).reshape(N, 128)
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4)
          | (high[:, :, 3] << 6)).reshape(N, 64)
    out = torch.cat([ql, qh, sc.view(torch.uint8), d16[:, None].view(torch.uint8)], 1)  # (N, 210)
    return torch.where(zero[:, None], 0, out).to(torch.uint8)


def quantize_q6_k(xb: torch.Tensor) -> torch.Tensor:
    """(N, 256) float32 -> (N, 210) uint8, as `quantize_row_q6_K_ref`."""
    return _chunked(_encode_q6_k, xb)


def dequantize_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    """(N, 210) uint8 -> (N, 256) float32, as `dequantize_row_q6_K`: (d·sc_j)·(q - 32)."""
    ql = blocks[:, :128].reshape(-1, 2, 2, 32)  # (N, half, first/second 32 bytes, l)
    qh = blocks[:, 128:192].reshape(-1, 2, 1, 32)
    sc = blocks[:, 192:208].contiguous().view(torch.int8).float().reshape(-1, 16, 1)
    d = blocks[:, 208:210].contiguous().view(torch.float16).float()[:, :, None]  # (N, 1, 1)
    # (N, half, quarter 0..3, l): quarters 0,1 low nibbles, 2,3 high
    low = torch.cat([ql & 0xF, ql >> 4], 2)
    high = (qh >> (2 * torch.arange(4, dtype=torch.uint8))[None, None, :, None]) & 3
    q = (low | (high << 4)).reshape(-1, 16, 16).float() - 32  # (N, sub-block, 16)
    return ((d * sc) * q).reshape(-1, QK_K)
