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
nn.Linear, or minillm.nf4.NF4Linear (whose `dequantize()` gives the dense weight).

Adapter files are PEFT's (`PeftModel.save_pretrained`), so they load in PEFT and PEFT's load here:
    adapter_model.safetensors   base_model.model.<HF module path>.lora_A.weight   (r, in)
                                base_model.model.<HF module path>.lora_B.weight   (out, r)
                                e.g. base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
                                (PEFT strips the adapter name "default" from its in-memory keys)
    adapter_config.json         peft_type "LORA", r, lora_alpha, target_modules, … (ADAPTER_CONFIG below)
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch
import torch.nn as nn

from minillm.checkpoint import atomic_write_bytes
from minillm.config import read_json_object
from minillm.names import hf_to_ours, ours_to_hf

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
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

    def merge(self):
        """W0 += ΔW in place (nn.Linear base only), so forward is one matmul; `unmerge` undoes it."""
        if self.merged:
            return
        if not isinstance(self.base, nn.Linear):
            raise TypeError(f"cannot merge into a {type(self.base).__name__} in place (re-quantizing "
                            "would lose ΔW); use merge_lora(model), which returns a dense nn.Linear")
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

    def to_dense_linear(self) -> nn.Linear:
        """A plain nn.Linear computing base + ΔW (dtype: the base weight's, or NF4's compute_dtype)."""
        base = self.base
        dtype = base.weight.dtype if isinstance(base, nn.Linear) else base.compute_dtype
        bias = getattr(base, "bias", None)
        w = dense_weight(base)
        if not self.merged:
            w = w + self.delta_weight().to(w.device)
        out = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=w.device,
                        dtype=dtype)
        with torch.no_grad():
            out.weight.copy_(w.to(dtype))
            if bias is not None:
                out.bias.copy_(bias.detach().to(dtype))
        out.requires_grad_(False)
        return out

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"


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
               dropout: float = 0.05, use_rslora: bool = False) -> list[str]:
    """Wrap every linear-like module whose last name is in `targets` (HF names or q,k,v,o,gate,up,down)
    in a LoRALinear; returns the wrapped module names, e.g. "layers.0.self_attn.q_proj".

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
        lora = LoRALinear(base, r, alpha, dropout, use_rslora).train(base.training)  # keep eval() mode
        _set_module(model, name, lora)
    return wrapped


def mark_only_lora_trainable(model: nn.Module) -> None:
    """requires_grad = True for lora_A / lora_B weights, False for every other parameter."""
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_A." in name or ".lora_B." in name)


def parameter_summary(model: nn.Module) -> str:
    """One line, as PEFT's print_trainable_parameters:
    "trainable params: … || all params: … || trainable%: …" (an NF4 base counts its in·out weights)."""
    from minillm.flops import model_params  # flops.py counts every parameter; it imports DEFAULT_TARGETS

    total, trainable = model_params(model)
    pct = 100 * trainable / total
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}"


def merge_lora(model: nn.Module) -> list[str]:
    """Replace every LoRALinear by a plain nn.Linear holding W0 + ΔW (dequantized first for an NF4 base);
    the model is then a plain Llama again (save it with checkpoint.save_model). Returns the merged names."""
    names = list(lora_modules(model))
    for name in names:
        _set_module(model, name, model.get_submodule(name).to_dense_linear())
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


# -----------------------------------------------------------------------------------------------------
# PEFT adapter files


def _peft_key(module_name: str, which: str) -> str:
    """("layers.0.self_attn.q_proj", "A") →
    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" (HF module path, PEFT prefix)."""
    return PEFT_PREFIX + ours_to_hf(module_name + ".weight").removesuffix(".weight") + f".lora_{which}.weight"


def adapter_config(modules: dict[str, LoRALinear], base_model_name_or_path: str | None) -> dict:
    """PEFT's LoraConfig fields for these modules (all must share r, alpha, dropout and rsLoRA)."""
    first = next(iter(modules.values()))
    for name, m in modules.items():
        if [m.r, m.alpha, m.dropout_p, m.use_rslora] != [first.r, first.alpha, first.dropout_p,
                                                          first.use_rslora]:
            raise ValueError(f"save_adapter: {name!r} has r={m.r}, alpha={m.alpha}, dropout={m.dropout_p}; "
                             f"expected the same as the first adapter (r={first.r}, alpha={first.alpha}, "
                             f"dropout={first.dropout_p}): PEFT's per-module patterns are not written")
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "r": first.r,
        "lora_alpha": first.alpha,
        "lora_dropout": first.dropout_p,
        "target_modules": sorted({n.rpartition(".")[2] for n in modules}),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_rslora": first.use_rslora,
        "use_dora": False,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def save_adapter(model: nn.Module, dirpath, base_model_name_or_path: str | None = None) -> Path:
    """Write adapter_model.safetensors + adapter_config.json (PEFT's layout), each atomically."""
    from safetensors.torch import save

    modules = lora_modules(model)
    if not modules:
        raise ValueError("save_adapter: the model has no LoRALinear modules (call apply_lora first)")
    dirpath = Path(dirpath)
    dirpath.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, m in modules.items():
        state[_peft_key(name, "A")] = m.lora_A.weight.detach().contiguous().cpu()  # (r, in)
        state[_peft_key(name, "B")] = m.lora_B.weight.detach().contiguous().cpu()  # (out, r)
    config = adapter_config(modules, base_model_name_or_path)
    atomic_write_bytes(dirpath / ADAPTER_WEIGHTS, save(state, metadata={"format": "pt"}))
    atomic_write_bytes(dirpath / ADAPTER_CONFIG, (json.dumps(config, indent=2) + "\n").encode())
    return dirpath


def _read_adapter_config(path: Path) -> dict:
    cfg = read_json_object(path, "adapter config")
    required_values = {"peft_type": ("LORA",), "bias": ("none",), "fan_in_fan_out": (False,),
                       "use_dora": (False, None), "modules_to_save": (None, []),
                       "rank_pattern": ({}, None), "alpha_pattern": ({}, None)}
    for key, allowed in required_values.items():
        if key in cfg and cfg[key] not in allowed:
            raise ValueError(f"{path}: {key} = {cfg[key]!r} is not supported; "
                             f"expected one of {list(allowed)}")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or isinstance(cfg.get(key), bool):
            raise ValueError(f"{path}: {key} must be a number, found {cfg.get(key)!r}")
    return cfg


def _read_adapter_weights(dirpath: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    st, bin_ = dirpath / ADAPTER_WEIGHTS, dirpath / "adapter_model.bin"
    if st.is_file():
        from safetensors.torch import load_file

        try:
            return st, load_file(str(st))
        except Exception as e:  # safetensors raises its own SafetensorError for bad headers
            raise ValueError(f"{st}: not a valid safetensors file ({e})") from None
    if bin_.is_file():  # older PEFT versions
        return bin_, torch.load(bin_, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{dirpath}: no {ADAPTER_WEIGHTS} (or adapter_model.bin)")


def load_adapter(model: nn.Module, dirpath) -> list[str]:
    """Apply a PEFT LoRA adapter directory onto `model` (wrapping the named modules, or filling adapters
    already applied with the same rank). Every key is checked: an unknown key, a module this model lacks,
    a missing A/B half or a shape that does not fit (an adapter for another base) raises an error naming
    the file and the key. Returns the module names that received an adapter."""
    dirpath = Path(dirpath)
    cfg = _read_adapter_config(dirpath / ADAPTER_CONFIG)
    path, state = _read_adapter_weights(dirpath)
    r, alpha = int(cfg["r"]), cfg["lora_alpha"]
    dropout, rslora = float(cfg.get("lora_dropout") or 0.0), bool(cfg.get("use_rslora") or False)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        body = key.removeprefix(PEFT_PREFIX)
        which = body[-len("lora_A.weight"):]
        if not key.startswith(PEFT_PREFIX) or which not in ("lora_A.weight", "lora_B.weight"):
            raise ValueError(f"{path}: unexpected key {key!r}; expected "
                             f"'{PEFT_PREFIX}<module>.lora_A.weight' or '.lora_B.weight'")
        module_name = hf_to_ours(body[: -len(".lora_A.weight")])
        pairs.setdefault(module_name, {})[which[5]] = t
    for name, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            half = "B" if "A" in ab else "A"
            raise ValueError(f"{path}: {_peft_key(name, half)!r} is missing (its other half is present)")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{path}: key {_peft_key(name, 'A')!r} names module {name!r}, which this model "
                             "does not have (an adapter for another architecture?)") from None
        base = module.base if isinstance(module, LoRALinear) else module
        expected = {"A": (r, base.in_features), "B": (base.out_features, r)}
        for which, t in ab.items():
            if tuple(t.shape) != expected[which]:
                raise ValueError(f"{path}: {_peft_key(name, which)!r} has shape {tuple(t.shape)}, expected "
                                 f"{expected[which]} for r={r} and this base model "
                                 "(an adapter for another base?)")
    loaded = [n for n, _ in model.named_modules() if n in pairs]  # in the model's module order
    for name in loaded:
        module = model.get_submodule(name)
        if not isinstance(module, LoRALinear):
            module = LoRALinear(module, r, alpha, dropout, rslora).train(module.training)
            _set_module(model, name, module)
        elif module.r != r:
            raise ValueError(f"{path}: adapter rank r={r} but {name!r} already has a rank-{module.r} adapter")
        module.alpha, module.use_rslora = alpha, rslora
        module.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        with torch.no_grad():
            module.lora_A.weight.copy_(pairs[name]["A"])
            module.lora_B.weight.copy_(pairs[name]["B"])
    return loaded
