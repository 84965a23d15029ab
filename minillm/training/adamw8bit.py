"""AdamW8bit: AdamW whose two moments are stored in 8 bits, blockwise, as bitsandbytes' AdamW8bit.

8-bit Optimizers via Block-wise Quantization (Dettmers et al. 2021,
https://arxiv.org/abs/2110.02861). AdamW keeps two float32 moments per trained parameter, 8 bytes;
here each moment is stored as one byte per value plus one float32 absmax per block of 256 values,
2 + 8/256 = 2.03 bytes, and is dequantized to float32 only for the step itself:

    for each parameter p with gradient g, at step t:
        m = dequantize(m_codes, m_absmax, signed map)      v = ... (unsigned map)    float32
        m = β1·m + (1 - β1)·g          v = β2·v + (1 - β2)·g²
        p = p·(1 - lr·wd) - lr/(1 - β1^t) · m / (sqrt(v) / sqrt(1 - β2^t) + eps)
        m_codes, m_absmax = quantize(m)                    v likewise

What you will learn here:
  * blockwise quantization: a block of 256 values shares one absmax, so an outlier moves the
    scale of 255 neighbours only, not of the whole tensor (the paper's answer to the outliers that
    break a single scale, as LLM.int8's per-row scales are to its weights);
  * the dynamic map (minillm/finetune/double_quant.py): a float-like 8-bit code whose exponent
    spans 7 decades, so the tiny moments of rarely-updated weights keep their precision; signed for
    m, unsigned for v >= 0 (one more bit of resolution where the sign bit would be);
  * why small tensors stay in float32 (bitsandbytes' min_8bit_size, 4096): norms and biases hold
    few values, so 8 bits there save nothing worth the error.

The quantizer, bit for bit bitsandbytes' PyTorch `quantize_blockwise` (its "default" backend):

    absmax[b] = max |x| over block b of 256 (flat index; the last block may be partial)
    s         = clamp(x * (1 / absmax[b]), -1, 1)      (x / absmax in the last, partial block;
                                                        absmax clamped to >= 1e-38 first, and
                                                        stored clamped in that last block)
    q         = #{ j : s > mid_j },  mid_j = (code[j] + code[j+1]) / 2   (nearest, ties down)
    x_hat     = code[q] * absmax[b]

and the step is the same sequence of PyTorch operations as bitsandbytes' CPU update, so with that
quantizer ours matches bitsandbytes bit for bit (tests/test_adamw8bit.py; bench/peer_int8_check.py
makes the golden). bitsandbytes' own CPU library quantizes with a lookup search that is not
exactly nearest: against it, about 1 value of v in 100 and 1 of m in 400 gets another code,
within one step of the map.

Failure modes: NaN or inf in a gradient poisons its block's absmax, and the block's codes with it
(the training loop stops on a non-finite loss or gradient norm before stepping). State dicts hold
uint8 codes and float32 absmax; loading one keeps them so, whatever the parameters' dtype.
"""

from __future__ import annotations

import math

import torch

from minillm.finetune.double_quant import create_dynamic_map

BLOCKSIZE = 256  # values per absmax, as bitsandbytes' blockwise optimizers
MIN_8BIT_SIZE = 4096  # smaller tensors keep float32 moments (bitsandbytes' min_8bit_size)
ABSMAX_FLOOR = 1e-38  # absmax is clamped to this before taking the reciprocal

_CODES: dict[tuple[bool, torch.device], torch.Tensor] = {}  # (signed, device) -> the map there


def dynamic_map(signed: bool, device) -> torch.Tensor:
    """The signed (m) or unsigned (v) dynamic map (256,) float32 on `device`, made once."""
    key = (signed, torch.device(device))
    if key not in _CODES:
        _CODES[key] = create_dynamic_map(signed).to(key[1])
    return _CODES[key]


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int = BLOCKSIZE):
    """x (any shape) -> (q uint8 (x.shape), absmax float32 (ceil(numel/blocksize),)): the nearest
    entry of `code` to each x / absmax of its block, ties to the lower entry (module docstring)."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)  # (n_full, blocksize)
    absmax = blocks.abs().amax(dim=1)  # (n_full,)
    scaled = (blocks * (1.0 / absmax.clamp(min=ABSMAX_FLOOR))[:, None]).clamp(-1, 1).view(-1)
    if full < n:  # the last, partial block divides, and stores its clamped absmax
        last = flat[full:].abs().amax().clamp(min=ABSMAX_FLOOR)
        absmax = torch.cat([absmax, last[None]])
        scaled = torch.cat([scaled, (flat[full:] / last).clamp(-1, 1)])
    midpoints = (code[:-1] + code[1:]) / 2
    q = torch.bucketize(scaled, midpoints).to(torch.uint8)  # #{mid_j < s}: ties go down
    return q.view(x.shape), absmax


def dequantize_blockwise(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                         blocksize: int = BLOCKSIZE) -> torch.Tensor:
    """code[q] * absmax[block], float32, q's shape."""
    flat = code[q.reshape(-1).long()]  # (n,)
    block = torch.arange(flat.numel(), device=q.device) // blocksize
    return (flat * absmax[block]).view(q.shape)


class AdamW8bit(torch.optim.Optimizer):
    """torch.optim.AdamW's update (decoupled weight decay, bias correction) with both moments held
    in 8 bits for parameters of at least `min_8bit_size` values; bitsandbytes.optim.AdamW8bit's
    defaults (lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 1e-2).

    State per parameter: "step" (int); 8-bit: "m_codes", "v_codes" (uint8, the parameter's shape),
    "m_absmax", "v_absmax" (float32, one per 256 values); small: "m", "v" (float32). A param group
    with "eight_bit": False keeps float32 moments for all its tensors: the embedding's, as
    transformers' Trainer registers bitsandbytes' 32-bit override for every nn.Embedding (see
    `configure_optimizer` in training/loop.py: rows of rare tokens get rare, tiny gradients, whose
    v underflows its block's 8-bit code to 0 while m does not, and m / (0 + eps) is a huge step).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2,
                 min_8bit_size: int = MIN_8BIT_SIZE):
        if not lr >= 0:
            raise ValueError(f"AdamW8bit: lr must be >= 0, got {lr}")
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"AdamW8bit: betas must be in [0, 1), got {betas}")
        if not eps > 0 or not weight_decay >= 0:
            raise ValueError(f"AdamW8bit: eps must be > 0 and weight_decay >= 0, "
                             f"got {eps} and {weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.min_8bit_size = min_8bit_size

    def _init_state(self, p: torch.Tensor, eight_bit: bool) -> dict:
        state = self.state[p]
        state["step"] = 0
        if eight_bit and p.numel() >= self.min_8bit_size:
            n_blocks = -(-p.numel() // BLOCKSIZE)
            for name in ("m", "v"):  # absmax 0: both moments dequantize to 0, whatever the codes
                state[f"{name}_codes"] = torch.zeros_like(p, dtype=torch.uint8)
                state[f"{name}_absmax"] = torch.zeros(n_blocks, dtype=torch.float32,
                                                      device=p.device)
        else:
            state["m"] = torch.zeros_like(p, dtype=torch.float32)
            state["v"] = torch.zeros_like(p, dtype=torch.float32)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p] or self._init_state(p, group.get("eight_bit", True))
                state["step"] += 1
                eight_bit = "m_codes" in state
                signed, unsigned = dynamic_map(True, p.device), dynamic_map(False, p.device)
                if eight_bit:
                    m = dequantize_blockwise(state["m_codes"], state["m_absmax"], signed)
                    v = dequantize_blockwise(state["v_codes"], state["v_absmax"], unsigned)
                else:
                    m, v = state["m"], state["v"]
                grad = p.grad.float()
                p32 = p.float()  # p itself when it is float32
                # the update, in bitsandbytes' order of operations
                m.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                correction1 = 1.0 - beta1 ** state["step"]
                correction2 = math.sqrt(1.0 - beta2 ** state["step"])
                denom = (v.sqrt() / correction2).add_(eps)
                if wd > 0.0:
                    p32.mul_(1.0 - lr * wd)
                p32.addcdiv_(m, denom, value=-lr / correction1)
                if p32 is not p:
                    p.copy_(p32)
                if eight_bit:
                    state["m_codes"], state["m_absmax"] = quantize_blockwise(m, signed)
                    state["v_codes"], state["v_absmax"] = quantize_blockwise(v, unsigned)
        return loss

    STATE_DTYPES = {"m_codes": torch.uint8, "v_codes": torch.uint8, "m_absmax": torch.float32,
                    "v_absmax": torch.float32, "m": torch.float32, "v": torch.float32}

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loader casts every state tensor to its parameter's dtype (uint8 codes to float
        too); they are cast back to the dtypes they were saved in (exact: codes are small
        integers)."""
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for key, dtype in self.STATE_DTYPES.items():
                if key in state:
                    state[key] = state[key].to(dtype)

    def state_bytes(self) -> int:
        """Bytes of optimizer state held now (codes, absmax and float32 moments)."""
        return sum(t.numel() * t.element_size() for state in self.state.values()
                   for t in state.values() if isinstance(t, torch.Tensor))
