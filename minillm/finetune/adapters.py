"""Putting adapters on a model and taking them off: the module swaps of LoRA and DoRA (lora.py,
dora.py) over a frozen model, which parameters train, merging the adapters in, and running without
them.

    apply_lora(model, targets, r, alpha, use_dora=...)
        wrap the target projections (in place)
    mark_only_lora_trainable(model, modules_to_save)
        requires_grad on the adapters (+ those modules)
    merge_lora(model)
        W0 + ΔW into plain nn.Linear layers, for export
    with lora_disabled(model): ...
        the base alone, e.g. a reference model for free
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from minillm.finetune.dora import DoRALinear
from minillm.finetune.lora import LoRALinear, frozen_linear

# all seven projections of a block, as QLoRA recommends: the one default of train configs and the
# estimator
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHORT_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
               "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def _normalize_targets(targets) -> list[str]:
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    return [SHORT_NAMES.get(t, t) for t in targets]


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model: nn.Module, targets=DEFAULT_TARGETS, r: int = 8, alpha: float = 16,
               dropout: float = 0.0, use_rslora: bool = False, use_dora: bool = False) -> list[str]:
    """Wrap every linear-like module whose last name is in `targets` (HF names or
    q,k,v,o,gate,up,down) in a LoRALinear (a DoRALinear with `use_dora`); returns the wrapped module
    names, e.g. "layers.0.self_attn.q_proj".

    lm_head and embeddings are touched only if named ("lm_head"). A target that matches no module is
    an error (a typo would otherwise train nothing). Call `mark_only_lora_trainable` afterwards.
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
            raise TypeError(f"apply_lora: target {name!r} is a {type(module).__name__}, "
                            f"not a linear layer")
        found[leaf].append(name)
        wrapped.append(name)
    missing = [t for t, names in found.items() if not names]
    if missing:
        raise ValueError(f"apply_lora: target module(s) {missing} match no module of "
                         f"{type(model).__name__}; expected names like {list(DEFAULT_TARGETS)} "
                         f"or {list(SHORT_NAMES)}")
    for name in wrapped:
        base = model.get_submodule(name)
        kind = DoRALinear if use_dora else LoRALinear
        lora = kind(base, r, alpha, dropout, use_rslora).train(base.training)  # keep eval() mode
        model.set_submodule(name, lora)
    return wrapped


def _train_in_float32(module: nn.Module) -> None:
    """Hold a bf16 / fp16 module's weight in float32 (AdamW steps smaller than bf16's resolution
    would be lost) while the model around it keeps its dtype: an embedding casts its output back, a
    linear layer casts its input up (so the forward also runs outside autocast, e.g. when
    sampling)."""
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
    `modules_to_save` (PEFT's name for modules trained in full, e.g. ["embed_tokens", "lm_head"],
    which are made float32 here, as the adapters are); False for every other parameter."""
    for name in modules_to_save:
        module = getattr(model, name, None)
        if not isinstance(module, (nn.Embedding, nn.Linear)):
            raise ValueError(f"modules_to_save: {name!r} is not an embedding or dense linear "
                             f"module of {type(model).__name__}; "
                             f"expected names like ['embed_tokens', 'lm_head']")
        _train_in_float32(module)
    for name, p in model.named_parameters():
        in_saved = name.partition(".")[0] in modules_to_save
        p.requires_grad_(in_saved or ".lora_A." in name or ".lora_B." in name
                         or name.endswith(".lora_magnitude_vector"))


def merge_lora(model: nn.Module) -> list[str]:
    """Replace every LoRALinear by a plain nn.Linear holding W0 + ΔW (dequantized first for an NF4
    base), and every NF4 layer that carries no adapter (QLoRA with a few targets) by its dequantized
    weight (in its compute_dtype): the model is then a plain Llama again (save it with
    checkpoint.save_model). Returns the merged adapter names."""
    names = list(lora_modules(model))
    for name in names:
        model.set_submodule(name, model.get_submodule(name).to_dense_linear())
    for name, m in list(model.named_modules()):
        if hasattr(m, "dequantize") and not isinstance(m, nn.Linear):
            model.set_submodule(name, frozen_linear(m.dequantize(torch.float32), m.bias,
                                                    m.compute_dtype))
    return names


@contextlib.contextmanager
def lora_disabled(model: nn.Module):
    """Run the base model without its adapters (e.g. base-vs-tuned reports without a second
    copy)."""
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
