"""LoRA: low-rank adapters as a module swap over a frozen linear layer, saved in PEFT's format.

LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685) freezes a pretrained weight W0 (out, in) and learns
a low-rank update ΔW = B A, with A (r, in), B (out, r) and r ≪ min(in, out):

    y = W0 x + (α / r) · B A dropout(x)                      x (..., in) → y (..., out)

Init (PEFT's `LoraLayer.reset_lora_parameters`, the same as nn.Linear's own default init):
    A ~ kaiming_uniform_(a=√5), i.e. U(-1/√in, 1/√in)        B = 0
so ΔW = 0 at step 0 and the adapted model starts as the base model exactly. The scale α/r keeps the
update's size roughly independent of r when r is changed (rsLoRA, https://arxiv.org/abs/2312.03732, uses
α/√r instead; `use_rslora=True`).

Merging: W = W0 + (α/r) B A folds the adapter into the weight, so inference costs nothing extra;
`unmerge` subtracts it again. In float32 merge → unmerge returns W0 up to rounding (~1e-7 relative); in
bf16 each add/subtract rounds to 8 mantissa bits, so unmerged weights differ from W0 and merged logits
differ from the adapter's at the bf16 level. An NF4 base (QLoRA, https://arxiv.org/abs/2305.14314) cannot
absorb ΔW without re-quantizing it away: `merge_lora` dequantizes it and returns a dense nn.Linear.

The base may be any module mapping (..., in) → (..., out) that exposes `in_features`/`out_features`: an
nn.Linear, or minillm.finetune.nf4_linear.NF4Linear (whose `dequantize()` gives the dense weight).

DoRA (Liu et al. 2024, https://arxiv.org/abs/2402.09353) splits the adapted weight into a direction and
a learned length per output row: with V = W0 + (α/r)·BA (out, in) and a magnitude vector m (out,),

    W' = m ⊙ V / ‖V‖_row                                     ‖V‖_row: the L2 norm of each row of V (out,)
    y  = W' x + b = (m / ‖V‖) ⊙ (W0 x + (α/r) B A x) + b

m starts as ‖W0‖_row, so W' = W0 at step 0. As PEFT does (and the paper's §4.3 suggests), ‖V‖ is treated
as a constant in backward (computed from a detached ΔW): gradients reach m, A and B through the two
matmuls only, and no (out, in) gradient is ever formed. `DoRALinear` below; an NF4 base uses the norm of
its dequantized weight.

Adapter files are PEFT's; they are read and written in minillm/finetune/peft_io.py.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from minillm.model import Linear

# all seven projections of a block, as QLoRA recommends: the one default of train configs and the estimator
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHORT_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
               "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def _device_of(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def dense_weight(base: nn.Module) -> torch.Tensor:
    """The (out, in) float32 weight of a linear-like base: nn.Linear.weight or NF4Linear.dequantize()."""
    if isinstance(base, nn.Linear):
        return base.weight.detach().float()
    if hasattr(base, "dequantize"):
        return base.dequantize(torch.float32)
    raise TypeError(f"{type(base).__name__} has neither .weight (nn.Linear) nor .dequantize() (NF4Linear)")


def _frozen_linear(w: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    """A requires_grad=False model.Linear (an nn.Linear with the batch-1 decode path) holding the (out, in)
    weight w (and bias) in dtype."""
    out = Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=dtype)
    with torch.no_grad():
        out.weight.copy_(w.to(dtype))
        if bias is not None:
            out.bias.copy_(bias.detach().to(dtype))
    return out.requires_grad_(False)


class LoRALinear(nn.Module):
    """y = base(x) + (α/r) · lora_B(lora_A(dropout(x))); base frozen, only lora_A / lora_B train.

    The adapter runs in `lora_dtype` (float32 by default, as PEFT's autocast_adapter_dtype): x is cast to
    it and the update is cast back to the base's output dtype before the add.
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
        device = _device_of(base)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=lora_dtype)  # (r, in)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=lora_dtype)  # (out, r)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False  # True while ΔW sits inside base.weight (forward must not add it again)
        self.disabled = False  # True inside `lora_disabled(model)`: forward is the base alone
        base.requires_grad_(False)
        self.reset_lora_parameters()

    def reset_lora_parameters(self):
        # PEFT, tuners/lora/layer.py: nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5)); nn.init.zeros_(lora_B)
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
            raise TypeError(f"cannot merge into a {type(self.base).__name__} in place (re-quantizing "
                            "would lose ΔW); use merge_lora(model), which returns a dense nn.Linear")

    def merge(self):
        """W0 += ΔW in place (nn.Linear base only), so forward is one matmul; `unmerge` undoes it."""
        if self.merged:
            return
        self._require_dense_base()
        w = self.base.weight
        w.data = (w.data.float() + self.delta_weight().to(w.device)).to(w.dtype)
        self.merged = True

    def unmerge(self):
        """W0 -= ΔW: the inverse of `merge` (exact in float32 up to rounding, see the module docstring)."""
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
        """A plain nn.Linear computing base + ΔW (dtype: the base weight's, or NF4's compute_dtype)."""
        base = self.base
        dtype = base.weight.dtype if isinstance(base, nn.Linear) else base.compute_dtype
        bias = getattr(base, "bias", None)
        w = dense_weight(base) if self.merged else self.merged_weight()  # (out, in) float32
        return _frozen_linear(w, bias, dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"


class DoRALinear(LoRALinear):
    """y = (m / ‖W0 + ΔW‖_row) ⊙ (W0 x + ΔW x) + b, ΔW = (α/r)·BA; trains m (out,), A and B.

    Computed as PEFT's DoRA layer does, as a correction added to the base output y0 = W0 x + b:

        s = m / ‖W0 + ΔW.detach()‖_row                              (out,), float32
        y = y0 + (s - 1) ⊙ W0 x̃ + s ⊙ (α/r) B A x̃

    where x̃ = x in eval mode (then W0 x̃ is y0 - b: no second matmul), and x̃ = dropout(x) in training
    with dropout > 0 (then W0 x̃ is recomputed: PEFT applies the dropout to both terms of the update).
    Each forward reads the whole base weight for the norm (an NF4 base is dequantized for it), so DoRA
    costs one extra pass over W0 per layer and step compared with LoRA.

    Merging folds the row scale into the weight: W0 ← s ⊙ (W0 + ΔW), with s taken from the unmerged
    weight and kept for `unmerge`, which computes W0 = W / s - ΔW (float32: allclose, not bit-exact).
    """

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 use_rslora: bool = False, lora_dtype: torch.dtype = torch.float32):
        super().__init__(base, r, alpha, dropout, use_rslora, lora_dtype)
        # PEFT's DoraLinearLayer.update_layer: m = ‖W0 + ΔW‖_row, = ‖W0‖_row since B = 0
        self.lora_magnitude_vector = nn.Parameter(self.weight_norm().to(lora_dtype))  # (out,)
        self._merge_scale = None  # s at merge time (out,), for unmerge

    def weight_norm(self) -> torch.Tensor:
        """‖W0 + ΔW‖ per output row (out,), float32, outside the autograd graph (the paper's §4.3)."""
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
        """W0 = W / s - ΔW with the s of `merge` (the norm of the merged weight would be ‖m‖, not ‖V‖)."""
        if not self.merged:
            return
        w = self.base.weight
        w.data = (w.data.float() / self._merge_scale[:, None] - self.delta_weight().to(w.device)).to(w.dtype)
        self._merge_scale, self.merged = None, False

    def merged_weight(self) -> torch.Tensor:
        """s ⊙ (W0 + ΔW) (out, in) float32 (dequantized first for an NF4 base)."""
        with torch.no_grad():
            s = self.row_scale().float()  # (out,)
        return s[:, None] * super().merged_weight()

    def extra_repr(self) -> str:
        return "dora, " + super().extra_repr()


# -----------------------------------------------------------------------------------------------------
# module swaps


def _normalize_targets(targets) -> list[str]:
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    return [SHORT_NAMES.get(t, t) for t in targets]


def _set_module(model: nn.Module, name: str, module: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model: nn.Module, targets=DEFAULT_TARGETS, r: int = 8, alpha: float = 16,
               dropout: float = 0.05, use_rslora: bool = False, use_dora: bool = False) -> list[str]:
    """Wrap every linear-like module whose last name is in `targets` (HF names or q,k,v,o,gate,up,down)
    in a LoRALinear (a DoRALinear with `use_dora`); returns the wrapped module names, e.g.
    "layers.0.self_attn.q_proj".

    lm_head and embeddings are touched only if named ("lm_head"). A target that matches no module is an
    error (a typo would otherwise train nothing). Call `mark_only_lora_trainable` afterwards.
    """
    targets = _normalize_targets(targets)
    found: dict[str, list[str]] = {t: [] for t in targets}
    wrapped = []  # in the model's module order
    for name, module in list(model.named_modules()):
        leaf = name.rpartition(".")[2]
        if leaf not in found:
            continue
        if isinstance(module, LoRALinear):
            raise ValueError(f"apply_lora: {name!r} already has a LoRA adapter")
        if not (hasattr(module, "in_features") and hasattr(module, "out_features")):
            raise TypeError(f"apply_lora: target {name!r} is a {type(module).__name__}, not a linear layer")
        found[leaf].append(name)
        wrapped.append(name)
    missing = [t for t, names in found.items() if not names]
    if missing:
        raise ValueError(f"apply_lora: target module(s) {missing} match no module of {type(model).__name__}; "
                         f"expected names like {list(DEFAULT_TARGETS)} or {list(SHORT_NAMES)}")
    for name in wrapped:
        base = model.get_submodule(name)
        kind = DoRALinear if use_dora else LoRALinear
        lora = kind(base, r, alpha, dropout, use_rslora).train(base.training)  # keep eval() mode
        _set_module(model, name, lora)
    return wrapped


def _train_in_float32(module: nn.Module) -> None:
    """Hold a bf16 / fp16 module's weight in float32 (AdamW steps smaller than bf16's resolution would be
    lost) while the model around it keeps its dtype: an embedding casts its output back, a linear layer
    casts its input up (so the forward also runs outside autocast, e.g. when sampling)."""
    dtype = module.weight.dtype
    if dtype == torch.float32:
        return
    module.float()
    if isinstance(module, nn.Embedding):
        module.register_forward_hook(lambda m, args, out: out.to(dtype))
    else:
        module.register_forward_pre_hook(lambda m, args: (args[0].float(), *args[1:]))


def mark_only_lora_trainable(model: nn.Module, modules_to_save=()) -> None:
    """requires_grad = True for lora_A / lora_B weights, DoRA magnitudes and every parameter of the
    `modules_to_save` (PEFT's name for modules trained in full, e.g. ["embed_tokens", "lm_head"], which
    are made float32 here, as the adapters are); False for every other parameter."""
    for name in modules_to_save:
        module = getattr(model, name, None)
        if not isinstance(module, (nn.Embedding, nn.Linear)):
            raise ValueError(f"modules_to_save: {name!r} is not an embedding or dense linear module of "
                             f"{type(model).__name__}; expected names like ['embed_tokens', 'lm_head']")
        _train_in_float32(module)
    for name, p in model.named_parameters():
        in_saved = name.partition(".")[0] in modules_to_save
        p.requires_grad_(in_saved or ".lora_A." in name or ".lora_B." in name
                         or name.endswith(".lora_magnitude_vector"))


def parameter_summary(model: nn.Module) -> str:
    """One line, as PEFT's print_trainable_parameters:
    "trainable params: … || all params: … || trainable%: …" (an NF4 base counts its in·out weights)."""
    from minillm.train.flops import model_params  # flops.py counts every parameter; it imports DEFAULT_TARGETS

    total, trainable = model_params(model)
    pct = 100 * trainable / total
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}"


def merge_lora(model: nn.Module) -> list[str]:
    """Replace every LoRALinear by a plain nn.Linear holding W0 + ΔW (dequantized first for an NF4 base),
    and every NF4 layer that carries no adapter (QLoRA with a few targets) by its dequantized weight (in
    its compute_dtype): the model is then a plain Llama again (save it with checkpoint.save_model).
    Returns the merged adapter names."""
    names = list(lora_modules(model))
    for name in names:
        _set_module(model, name, model.get_submodule(name).to_dense_linear())
    for name, m in list(model.named_modules()):
        if hasattr(m, "dequantize") and not isinstance(m, nn.Linear):
            _set_module(model, name, _frozen_linear(m.dequantize(torch.float32), m.bias, m.compute_dtype))
    return names


@contextlib.contextmanager
def lora_disabled(model: nn.Module):
    """Run the base model without its adapters (e.g. base-vs-tuned reports without a second copy)."""
    modules = list(lora_modules(model).values())
    was_merged = [m.merged for m in modules]
    for m in modules:
        m.unmerge()
        m.disabled = True
    try:
        yield model
    finally:
        for m, merged in zip(modules, was_merged, strict=True):
            m.disabled = False
            if merged:
                m.merge()
