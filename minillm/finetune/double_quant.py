"""Double quantization of NF4 scales: the float32 absmax of every 64-weight block, stored in 8 bits.

QLoRA (https://arxiv.org/abs/2305.14314, section 3) quantizes the quantization constants a second
time: one float32 per 64 weights costs 0.5 bit per parameter; 8 bits per block plus one float32 per
256 blocks costs 8/64 + 32/(64*256) = 0.127 bit. NF4 with double quantization is 4.127 bits per
parameter.

What you will learn here:
  * bitsandbytes' signed "dynamic" 8-bit map (Dettmers 2015, https://arxiv.org/abs/1511.04561): a
    floating-point-like code whose 7 decades 1e-6 .. 1 each hold twice the values of the one below;
  * blockwise 8-bit quantization with that map, done the way bitsandbytes' CUDA kernel does it: a
    binary search down the sorted 256-entry table, then a midpoint test against the neighbour.

The scheme, bit for bit as bitsandbytes' `quantize_4bit(..., compress_statistics=True)`:

    offset     = mean(absmax)                                  (float32 scalar)
    c          = absmax - offset, cut into blocks of 256
    scale[b]   = max |c_i| over block b                        (float32)
    q_i        = dynamic_quantize(c_i * (1 / scale[b]))        (uint8 index into DYNAMIC_CODE)
    absmax_hat = DYNAMIC_CODE[q_i] * scale[i // 256] + offset  (float32: one multiply, then one add)

The roundtrip error on absmax is at most half a code step times the block scale: the code is densest
near 0 (steps of ~1e-6 relative) and coarsest near +-1 (steps of 1/64 ~ 0.014 relative), so
|absmax_hat - absmax| <= 0.0071 * scale[b] (plus float32 rounding).

Why this file is plain PyTorch and lives in minillm/, not kernels/: absmax has numel/64 entries
(16 K for a 4096x4096 weight); the search is 8 vectorized `torch.where` steps over that, runs once
at load time, and dequantizing 16 K scales per forward is one gather, one multiply and one add. A
Triton kernel would add code to read without making anything faster that matters.

Failure modes: a block whose centred values are all zero has scale 0; c * (1/0) is NaN, which the
search (like bitsandbytes' `x > val` comparisons) sends to code 0, and dequantization still returns
0 * code + offset = offset, the exact value. `offset` is a float32 mean whose summation order
depends on the device (PyTorch's CPU and CUDA reductions differ), so codes can differ in the last
ulp across devices, as they do for bitsandbytes itself.
"""

import torch

DQ_BLOCKSIZE = 256  # bitsandbytes' block size for the nested quantization


def create_dynamic_map(signed: bool = True) -> torch.Tensor:
    """The 256-entry dynamic map (float32, sorted ascending), as bitsandbytes'
    `create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)` builds it.

    signed: for decade i = 0..6 the positive values are 10**(i-6) * the midpoints of
    linspace(0.1, 1, 2**i + 1) (1, 2, 4, ..., 64 values), mirrored to negatives; then 0 and 1.0:
    2 * 127 + 2 = 256 entries. Index 127 is 0, 128 the smallest positive 10**-6 * 0.55, 255 is 1.0,
    0 is -(1 + 0.9859375) / 2.
    unsigned (for values >= 0, e.g. Adam's second moment): no sign bit, so each decade has twice
    the values, the midpoints of linspace(0.1, 1, 2**(i+1) + 1) (2, 4, ..., 128 values), then 0 and
    1.0: 254 + 2 = 256 entries; index 0 is 0, 255 is 1.0.
    The float32 arithmetic is the same sequence of PyTorch ops, so every entry matches to the bit.
    """
    values = []
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2 ** (i if signed else i + 1) + 1)  # float32
        means = (edges[:-1] + edges[1:]) / 2.0
        values += ((10 ** (i - 6)) * means).tolist()
        if signed:
            values += (-(10 ** (i - 6)) * means).tolist()
    values += [0.0, 1.0]
    assert len(values) == 256
    return torch.tensor(sorted(values), dtype=torch.float32)


_DYNAMIC_CODE = create_dynamic_map()
_DYNAMIC_CODE_ON: dict[torch.device, torch.Tensor] = {}  # device -> the map there, copied once


def dynamic_code(device=None) -> torch.Tensor:
    """The signed dynamic map on `device`, (256,) float32; treat it as read-only. Copied to each
    device once: NF4Linear dequantizes its scales with it on every forward, where a host-to-device
    copy per call would stall the GPU (and break CUDA graph capture)."""
    device = torch.device(device if device is not None else "cpu")
    if device not in _DYNAMIC_CODE_ON:
        _DYNAMIC_CODE_ON[device] = _DYNAMIC_CODE.to(device)
    return _DYNAMIC_CODE_ON[device]


def quantize_dynamic(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the code value nearest to each x (float32, in [-1, 1]), found as bitsandbytes'
    `dQuantize` finds it: a 7-step binary search from the middle of the table that leaves `pivot` on
    one side of x, then a midpoint test against the neighbour it came from. Ties keep `pivot`.
    """
    pivot = torch.full_like(x, 127, dtype=torch.long)
    lower_pivot = torch.zeros_like(pivot)
    upper_pivot = torch.full_like(pivot, 255)
    lower = torch.full_like(x, -1.0)
    upper = torch.full_like(x, 1.0)
    val = code[pivot]
    for step in (64, 32, 16, 8, 4, 2, 1):
        right = x > val
        lower_pivot = torch.where(right, pivot, lower_pivot)
        lower = torch.where(right, val, lower)
        upper_pivot = torch.where(right, upper_pivot, pivot)
        upper = torch.where(right, upper, val)
        pivot = torch.where(right, pivot + step, pivot - step)
        val = code[pivot]
    upper = torch.where(upper_pivot == 255, code[255], upper)
    lower = torch.where(lower_pivot == 0, code[0], lower)
    right = x > val
    take_upper = right & (x > (upper + val) * 0.5)
    take_lower = ~right & (x < (lower + val) * 0.5)
    q = torch.where(take_upper, upper_pivot, torch.where(take_lower, lower_pivot, pivot))
    return q.to(torch.uint8)


def double_quantize(absmax: torch.Tensor, blocksize: int = DQ_BLOCKSIZE):
    """Quantize NF4 block scales (float32, (n_blocks,)) to 8 bits.

    Returns (qabsmax uint8 (n_blocks,), scales float32 (ceil(n_blocks/blocksize),),
    offset float32 ()).
    """
    if absmax.dtype != torch.float32 or absmax.dim() != 1 or absmax.numel() == 0:
        raise ValueError(f"absmax must be a non-empty 1-D float32 tensor, "
                         f"got {absmax.dtype} {tuple(absmax.shape)}")
    n = absmax.numel()
    n_blocks = -(-n // blocksize)
    offset = absmax.mean()
    c = torch.nn.functional.pad(absmax - offset,
                                (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)
    scales = c.abs().amax(dim=1)  # (n_blocks,)
    scaled = c * torch.reciprocal(scales)[:, None]  # bitsandbytes multiplies by a reciprocal here
    q = quantize_dynamic(scaled.view(-1)[:n], dynamic_code(absmax.device))
    return q, scales, offset


def double_dequantize(
    qabsmax: torch.Tensor, scales: torch.Tensor, offset: torch.Tensor, blocksize: int = DQ_BLOCKSIZE
) -> torch.Tensor:
    """absmax_i = DYNAMIC_CODE[q_i] * scales[i // blocksize] + offset, in float32, (n_blocks,)."""
    n = qabsmax.numel()
    if qabsmax.dtype != torch.uint8 or scales.numel() != -(-n // blocksize):
        raise ValueError(
            f"qabsmax must be uint8 and scales hold ceil({n}/{blocksize}) entries, "
            f"got {qabsmax.dtype} and {scales.numel()}"
        )
    block = torch.arange(n, device=qabsmax.device) // blocksize
    return dynamic_code(qabsmax.device)[qabsmax.long()] * scales.float()[block] + offset.float()
