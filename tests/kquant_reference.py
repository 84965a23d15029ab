"""Slow, obvious transcriptions of ggml's K-quant reference quantizers (ggml/src/ggml-quants.c), one
block at a time, for the tests to hold minillm/formats/kquants.py against.

Each function follows the C line by line. Every float is a numpy float32 scalar, so each
operation rounds to float32 as the C code does (no fused multiply-add, like an x86-64 build
of ggml-base); integers are Python ints, and `u8` / `i8` are the C casts to uint8_t / int8_t.
`x` is a list of 256 float32 values.
"""

import struct

import numpy as np
import torch

F = np.float32
GROUP_MAX_EPS = F(1e-15)


def u8(v: int) -> int:
    return v & 0xFF


def i8(v: int) -> int:
    return (v + 128) % 256 - 128


def nearest_int(fval) -> int:
    val = F(fval) + F(12582912.0)
    i = struct.unpack("<i", struct.pack("<f", val))[0]
    return (i & 0x007FFFFF) - 0x00400000


def fp16(v) -> bytes:
    return struct.pack("<e", F(v))  # round to nearest even, as GGML_FP32_TO_FP16


def fp16_to_f32(b: bytes):
    return F(struct.unpack("<e", b)[0])


def make_qkx2_quants(n, nmax, x, weights, rmin, rdelta, nstep):
    """use_mad = false. Returns (scale, the_min, L)."""
    L = [0] * n
    mn = x[0]
    mx = x[0]
    sum_w = weights[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        w = weights[i]
        sum_w += w
        sum_x += w * x[i]
    if mn > 0:
        mn = F(0)
    if mx == mn:
        return F(0), -mn, [0] * n
    iscale = F(nmax) / (mx - mn)
    scale = F(1) / iscale
    best_error = F(0)
    for i in range(n):
        l = nearest_int(iscale * (x[i] - mn))
        L[i] = max(0, min(nmax, l))
        diff = scale * F(L[i]) + mn - x[i]
        diff = diff * diff
        best_error += weights[i] * diff
    for step in range(nstep + 1):
        iscale = (F(rmin) + F(rdelta) * F(step) + F(nmax)) / (mx - mn)
        sum_l = sum_l2 = sum_xl = F(0)
        laux = [0] * n
        for i in range(n):
            l = nearest_int(iscale * (x[i] - mn))
            l = max(0, min(nmax, l))
            laux[i] = l
            w = weights[i]
            sum_l += w * F(l)
            sum_l2 += w * F(l) * F(l)
            sum_xl += w * F(l) * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > 0:
                this_min = F(0)
                this_scale = sum_xl / sum_l2
            cur_error = F(0)
            for i in range(n):
                diff = this_scale * F(laux[i]) + this_min - x[i]
                diff = diff * diff
                cur_error += weights[i] * diff
            if cur_error < best_error:
                L = laux
                best_error = cur_error
                scale = this_scale
                mn = this_min
    return scale, -mn, L


def make_qx_quants(n, nmax, x):
    """rmse_type = 1, qw = NULL. Returns (scale, L)."""
    mx = F(0)
    amax = F(0)
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    if amax < GROUP_MAX_EPS:
        return F(0), [0] * n
    iscale = F(-nmax) / mx
    L = [0] * n
    sumlx = suml2 = F(0)
    for i in range(n):
        l = nearest_int(iscale * x[i])
        l = max(-nmax, min(nmax - 1, l))
        L[i] = l + nmax
        w = x[i] * x[i]
        sumlx += w * x[i] * F(l)
        suml2 += w * F(l) * F(l)
    scale = sumlx / suml2 if suml2 else F(0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(F(nmax) + F(0.1) * F(step)) / mx
        sumlx = suml2 = F(0)
        for i in range(n):
            l = nearest_int(iscale * x[i])
            l = max(-nmax, min(nmax - 1, l))
            w = x[i] * x[i]
            sumlx += w * x[i] * F(l)
            suml2 += w * F(l) * F(l)
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            for i in range(n):
                l = nearest_int(iscale * x[i])
                L[i] = nmax + max(-nmax, min(nmax - 1, l))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale, L


def get_scale_min_k4(j, q):
    if j < 4:
        return q[j] & 63, q[j + 4] & 63
    return (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)


def _q45_k_common(x, nmax, rmin, nstep):
    """The shared part of quantize_row_q4_K_ref / q5_K_ref: returns (d+dmin
    bytes, scales[12], L[256])."""
    L = [0] * 256
    scales, mins = [F(0)] * 8, [F(0)] * 8
    max_scale = max_min = F(0)
    for j in range(8):
        xs = x[32 * j : 32 * j + 32]
        sum_x2 = F(0)
        for v in xs:
            sum_x2 += v * v
        av_x = F(np.sqrt(sum_x2 / F(32)))
        weights = [av_x + abs(v) for v in xs]
        scales[j], mins[j], L[32 * j : 32 * j + 32] = make_qkx2_quants(32, nmax, xs, weights, rmin,
                                                                       0.1, nstep)
        if scales[j] > max_scale:
            max_scale = scales[j]
        if mins[j] > max_min:
            max_min = mins[j]
    inv_scale = F(63) / max_scale if max_scale > 0 else F(0)
    inv_min = F(63) / max_min if max_min > 0 else F(0)
    sc = [0] * 12
    for j in range(8):
        ls = min(63, u8(nearest_int(inv_scale * scales[j])))
        lm = min(63, u8(nearest_int(inv_min * mins[j])))
        if j < 4:
            sc[j] = ls
            sc[j + 4] = lm
        else:
            sc[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
            sc[j - 4] |= (ls >> 4) << 6
            sc[j] |= (lm >> 4) << 6
    head = fp16(max_scale / F(63)) + fp16(max_min / F(63))
    d_all, dmin_all = fp16_to_f32(head[:2]), fp16_to_f32(head[2:])
    for j in range(8):
        s, m = get_scale_min_k4(j, sc)
        d = d_all * F(s)
        if not d:
            continue
        dm = dmin_all * F(m)
        for ii in range(32):
            l = nearest_int((x[32 * j + ii] + dm) / d)
            L[32 * j + ii] = max(0, min(nmax, l))
    return head, bytes(sc), L


def q4_k_block(x) -> bytes:
    head, sc, L = _q45_k_common(x, 15, -1.0, 20)
    qs = []
    for j in range(0, 256, 64):
        qs += [L[j + l] | (L[j + l + 32] << 4) for l in range(32)]
    return head + sc + bytes(qs)


def q5_k_block(x) -> bytes:
    head, sc, L = _q45_k_common(x, 31, -0.5, 15)
    qh, ql = [0] * 32, []
    m1, m2 = 1, 2
    for n in range(0, 256, 64):
        for j in range(32):
            l1 = L[n + j]
            if l1 > 15:
                l1 -= 16
                qh[j] |= m1
            l2 = L[n + j + 32]
            if l2 > 15:
                l2 -= 16
                qh[j] |= m2
            ql.append(l1 | (l2 << 4))
        m1 <<= 2
        m2 <<= 2
    return head + sc + bytes(qh) + bytes(ql)


def q6_k_block(x) -> bytes:
    L = [0] * 256
    scales = [F(0)] * 16
    max_scale = max_abs_scale = F(0)
    for ib in range(16):
        scales[ib], L[16 * ib : 16 * ib + 16] = make_qx_quants(16, 32, x[16 * ib : 16 * ib + 16])
        if abs(scales[ib]) > max_abs_scale:
            max_abs_scale = abs(scales[ib])
            max_scale = scales[ib]
    if max_abs_scale < GROUP_MAX_EPS:
        return bytes(210)
    iscale = F(-128) / max_scale
    d16 = fp16(F(1) / iscale)
    sc = [i8(min(127, nearest_int(iscale * scales[ib]))) for ib in range(16)]
    for j in range(16):
        d = fp16_to_f32(d16) * F(sc[j])
        if not d:
            continue
        for ii in range(16):
            l = nearest_int(x[16 * j + ii] / d)
            L[16 * j + ii] = max(-32, min(31, l)) + 32
    ql, qh = [0] * 128, [0] * 64
    for h, j in enumerate(range(0, 256, 128)):
        for l in range(32):
            q1, q2, q3, q4 = (L[j + l + 32 * k] & 0xF for k in range(4))
            ql[64 * h + l] = q1 | (q3 << 4)
            ql[64 * h + l + 32] = q2 | (q4 << 4)
            qh[32 * h + l] = sum((L[j + l + 32 * k] >> 4) << (2 * k) for k in range(4))
    return bytes(ql) + bytes(qh) + bytes(s & 0xFF for s in sc) + d16


def awkward_blocks() -> torch.Tensor:
    """(12, 256) super-blocks where a plausible-but-wrong implementation differs from ggml."""
    g = torch.Generator().manual_seed(7)
    rows = [torch.randn(256, generator=g) * s for s in (1e-3, 1.0, 50.0)]
    rows.append(torch.zeros(256))  # every scale 0: d = dmin = 0, Q6_K all-zero bytes
    # constant: flat sub-blocks with a positive min clipped to 0
    rows.append(torch.full((256,), 0.37))
    rows.append(-torch.rand(256, generator=g))  # negative only: min < 0, max < 0
    rows.append(torch.rand(256, generator=g) * 1e-20)  # tiny: fp16 d and dmin underflow to 0
    r = torch.randn(256, generator=g)
    r[5] = 40.0  # one outlier dominates its super-block's scales
    rows.append(r)
    r = torch.randn(256, generator=g)
    r[:32] = 0.0  # a zero sub-block beside others
    r[64:80] = 1.5  # a constant 16-value sub-block (Q6_K)
    rows.append(r)
    r = torch.randn(256, generator=g) * 1e-6  # fp16 subnormal d
    rows.append(r)
    r = torch.randn(256, generator=g)
    r[::2] = 0.0  # half zeros: ties in max |x| and many exact zero codes
    rows.append(r)
    # coarse grid: exact halves on the fit
    rows.append(torch.round(torch.randn(256, generator=g) * 4) / 4)
    return torch.stack(rows)
