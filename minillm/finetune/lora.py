"""LoRA: a low-rank adapter over a frozen linear layer (the module; the swaps that put it on a model
are in adapters.py, its files in peft_io.py).

LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685) freezes a pretrained weight W0 (out, in) and
learns a low-rank update ΔW = B A, with A (r, in), B (out, r) and r ≪ min(in, out):

    y = W0 x + (α / r) · B A dropout(x)                      x (..., in) → y (..., out)

Init (PEFT's `LoraLayer.reset_lora_parameters`, the same as nn.Linear's own default init):
    A ~ kaiming_uniform_(a=√5), i.e. U(-1/√in, 1/√in)        B = 0
so ΔW = 0 at step 0 and the adapted model starts as the base model exactly. The scale α/r keeps the
update's size roughly independent of r when r is changed (rsLoRA, https://arxiv.org/abs/2312.03732,
uses α/√r instead; `use_rslora=True`).

Merging: W = W0 + (α/r) B A folds the adapter into the weight, so inference costs nothing extra;
`unmerge` subtracts it again. In float32 merge → unmerge returns W0 up to rounding (~1e-7 relative);
in bf16 each add/subtract rounds to 8 mantissa bits, so unmerged weights differ from W0 and merged
logits differ from the adapter's at the bf16 level. An NF4 base (QLoRA,
https://arxiv.org/abs/2305.14314) cannot absorb ΔW without re-quantizing it away: `merge_lora`
dequantizes it and returns a dense nn.Linear.

The base may be any module mapping (..., in) → (..., out) that exposes `in_features`/`out_features`:
an nn.Linear, or minillm.finetune.nf4_linear.NF4Linear (whose `dequantize()` gives the dense
weight).

DoRA, a learned length per output row over this direction, is dora.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def device_of(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def dense_weight(base: nn.Module) -> torch.Tensor:
    """The (out, in) float32 weight of a linear-like base: nn.Linear.weight or
    NF4Linear.dequantize()."""
    if isinstance(base, nn.Linear):
        return base.weight.detach().float()
    if hasattr(base, "dequantize"):
        return base.dequantize(torch.float32)
    raise TypeError(f"{type(base).__name__} has neither .weight (nn.Linear) "
                    f"nor .dequantize() (NF4Linear)")


def frozen_linear(w: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    """A requires_grad=False nn.Linear holding the (out, in) weight w (and bias) in dtype."""
    out = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=dtype)
    with torch.no_grad():
        out.weight.copy_(w.to(dtype))
        if bias is not None:
            out.bias.copy_(bias.detach().to(dtype))
    return out.requires_grad_(False)


class LoRALinear(nn.Module):
    """y = base(x) + (α/r) · lora_B(lora_A(dropout(x))); base frozen, only lora_A / lora_B train.

    The adapter runs in `lora_dtype` (float32 by default, as PEFT's autocast_adapter_dtype): x is
    cast to it and the update is cast back to the base's output dtype before the add.
    """

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 use_rslora: bool = False, lora_dtype: torch.dtype = torch.float32):
        super().__init__()
        if not (hasattr(base, "in_features") and hasattr(base, "out_features")):
            raise TypeError(f"LoRALinear needs a linear-like base with in_features/out_features, "
                            f"found {type(base).__name__}")
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"LoRA rank r must be a positive int, found {r!r}")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.dropout_p, self.use_rslora = r, alpha, dropout, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        device = device_of(base)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device,
                                dtype=lora_dtype)  # (r, in)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device,
                                dtype=lora_dtype)  # (out, r)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False  # True while ΔW sits inside base.weight (forward must not add it again)
        self.disabled = False  # True inside `lora_disabled(model)`: forward is the base alone
        base.requires_grad_(False)
        self.reset_lora_parameters()

    def reset_lora_parameters(self):
        # PEFT, tuners/lora/layer.py: nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5));
        # nn.init.zeros_(lora_B)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = (α/r) · B A, (out, r) @ (r, in) → (out, in), in float32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., out)
        if self.merged or self.disabled:
            return y
        h = self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype)))  # (..., r)
        return y + (self.lora_B(h) * self.scaling).to(y.dtype)  # (..., out)

    def _require_dense_base(self):
        if not isinstance(self.base, nn.Linear):
            raise TypeError(f"cannot merge into a {type(self.base).__name__} in place "
                            "(re-quantizing would lose ΔW); use merge_lora(model), which returns "
                            "a dense nn.Linear")

    def merge(self):
        """W0 += ΔW in place (nn.Linear base only), so forward is one matmul; `unmerge` undoes
        it."""
        if self.merged:
            return
        self._require_dense_base()
        w = self.base.weight
        w.data = (w.data.float() + self.delta_weight().to(w.device)).to(w.dtype)
        self.merged = True

    def unmerge(self):
        """W0 -= ΔW: the inverse of `merge` (exact in float32 up to rounding, see the module
        docstring)."""
        if not self.merged:
            return
        w = self.base.weight
        w.data = (w.data.float() - self.delta_weight().to(w.device)).to(w.dtype)
        self.merged = False

    def merged_weight(self) -> torch.Tensor:
        """W0 + ΔW (out, in) float32: the weight this layer computes with (the bias aside)."""
        w = dense_weight(self.base)
        return w + self.delta_weight().to(w.device)

    def to_dense_linear(self) -> nn.Linear:
        """A plain nn.Linear computing base + ΔW (dtype: the base weight's, or NF4's
        compute_dtype)."""
        base = self.base
        dtype = base.weight.dtype if isinstance(base, nn.Linear) else base.compute_dtype
        bias = getattr(base, "bias", None)
        w = dense_weight(base) if self.merged else self.merged_weight()  # (out, in) float32
        return frozen_linear(w, bias, dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"
