"""DoRA: weight-decomposed low-rank adaptation, a LoRA whose merged weight keeps a learned length
per output row (Liu et al. 2024, https://arxiv.org/abs/2402.09353).

It splits the adapted weight into a direction and
a learned length per output row: with V = W0 + (α/r)·BA (out, in) and a magnitude vector m (out,),

    W' = m ⊙ V / ‖V‖_row                                ‖V‖_row: the L2 norm of each row of V (out,)
    y  = W' x + b = (m / ‖V‖) ⊙ (W0 x + (α/r) B A x) + b

m starts as ‖W0‖_row, so W' = W0 at step 0. As PEFT does (and the paper's §4.3 suggests), ‖V‖ is
treated as a constant in backward (computed from a detached ΔW): gradients reach m, A and B through
the two matmuls only, and no (out, in) gradient is ever formed. `DoRALinear` below; an NF4 base uses
the norm of its dequantized weight.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from minillm.finetune.lora import LoRALinear, dense_weight


class DoRALinear(LoRALinear):
    """y = (m / ‖W0 + ΔW‖_row) ⊙ (W0 x + ΔW x) + b, ΔW = (α/r)·BA; trains m (out,), A and B.

    Computed as PEFT's DoRA layer does, as a correction added to the base output y0 = W0 x + b:

        s = m / ‖W0 + ΔW.detach()‖_row                              (out,), float32
        y = y0 + (s - 1) ⊙ W0 x̃ + s ⊙ (α/r) B A x̃

    where x̃ = x in eval mode (then W0 x̃ is y0 - b: no second matmul), and x̃ = dropout(x) in
    training with dropout > 0 (then W0 x̃ is recomputed: PEFT applies the dropout to both terms of
    the update). Each forward reads the whole base weight for the norm (an NF4 base is dequantized
    for it), so DoRA costs one extra pass over W0 per layer and step compared with LoRA.

    Merging folds the row scale into the weight: W0 ← s ⊙ (W0 + ΔW), with s taken from the unmerged
    weight and kept for `unmerge`, which computes W0 = W / s - ΔW (float32: allclose, not
    bit-exact).
    """

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 use_rslora: bool = False, lora_dtype: torch.dtype = torch.float32):
        super().__init__(base, r, alpha, dropout, use_rslora, lora_dtype)
        # PEFT's DoraLinearLayer.update_layer: m = ‖W0 + ΔW‖_row, = ‖W0‖_row since B = 0
        self.lora_magnitude_vector = nn.Parameter(self.weight_norm().to(lora_dtype))  # (out,)
        self._merge_scale = None  # s at merge time (out,), for unmerge

    def weight_norm(self) -> torch.Tensor:
        """‖W0 + ΔW‖ per output row (out,), float32, outside the autograd graph (the paper's
        §4.3)."""
        with torch.no_grad():
            w = dense_weight(self.base)  # (out, in)
            return torch.linalg.norm(w + self.delta_weight().to(w.device), dim=1)

    def row_scale(self) -> torch.Tensor:
        """s = m / ‖W0 + ΔW‖ (out,): differentiable in m only."""
        return self.lora_magnitude_vector / self.weight_norm().to(self.lora_magnitude_vector.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., out): W0 x + b
        if self.merged or self.disabled:
            return y
        x = x.to(self.lora_A.weight.dtype)
        s = self.row_scale()  # (out,)
        if self.training and self.dropout_p > 0:
            x = self.lora_dropout(x)
            w0x = F.linear(x, dense_weight(self.base).to(x.device))  # (..., out): W0 dropout(x)
        else:
            bias = getattr(self.base, "bias", None)
            w0x = y.to(x.dtype) if bias is None else y.to(x.dtype) - bias.to(x.dtype)  # (..., out)
        lora = self.lora_B(self.lora_A(x)) * self.scaling  # (..., out)
        return y + ((s - 1) * w0x + s * lora).to(y.dtype)

    def merge(self):
        """W0 ← s ⊙ (W0 + ΔW) in place (nn.Linear base only); s is kept for `unmerge`."""
        if self.merged:
            return
        self._require_dense_base()
        with torch.no_grad():
            s = self.row_scale().float()  # (out,)
        w = self.base.weight
        w.data = (s[:, None] * (w.data.float() + self.delta_weight().to(w.device))).to(w.dtype)
        self._merge_scale, self.merged = s, True

    def unmerge(self):
        """W0 = W / s - ΔW with the s of `merge` (the norm of the merged weight would be ‖m‖, not
        ‖V‖)."""
        if not self.merged:
            return
        w = self.base.weight
        w.data = (w.data.float() / self._merge_scale[:, None]
                  - self.delta_weight().to(w.device)).to(w.dtype)
        self._merge_scale, self.merged = None, False

    def merged_weight(self) -> torch.Tensor:
        """s ⊙ (W0 + ΔW) (out, in) float32 (dequantized first for an NF4 base)."""
        with torch.no_grad():
            s = self.row_scale().float()  # (out,)
        return s[:, None] * super().merged_weight()

    def extra_repr(self) -> str:
        return "dora, " + super().extra_repr()
