"""PEFT adapter directories: LoRA / DoRA adapters and fully trained modules, saved and loaded in
PEFT's layout (`PeftModel.save_pretrained`), so PEFT loads ours and we load PEFT's.

    adapter_model.safetensors   (PEFT strips the adapter name "default" from its in-memory keys)
        base_model.model.<HF module path>.lora_A.weight             (r, in)
        base_model.model.<HF module path>.lora_B.weight             (out, r)
        base_model.model.<HF module path>.lora_magnitude_vector     (out,)   DoRA's m, no ".weight"
        base_model.model.<HF parameter path>                        modules_to_save, whole, e.g.
            base_model.model.model.embed_tokens.weight (V, C)
            and base_model.model.lm_head.weight (V, C)
    adapter_config.json         peft_type "LORA", r, lora_alpha, target_modules, use_rslora,
                                use_dora, modules_to_save, … (`adapter_config` below)
    base_quantization.json      minillm's own record of the quantized base an adapter was trained
                                on: NF4 for QLoRA ({"quant_method": "nf4", "blocksize": 64,
                                "double_quant": true}) or LLM.int8 for lora8 ({"quant_method":
                                "int8", "threshold": 6.0}), so export merges into the very same
                                rounded weights; PEFT ignores the file
    tokenizer.model             when the vocabulary was extended (new pieces), as PEFT users save
                                theirs

A module trained in full (PEFT's `modules_to_save`) whose row count differs from the base's is an
embedding or lm_head of a vocabulary with new tokens: loading resizes the base to it first, as a
PEFT user calls `resize_token_embeddings` before `PeftModel.from_pretrained`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn

from minillm.finetune.adapters import SHORT_NAMES, lora_modules
from minillm.finetune.dora import DoRALinear
from minillm.finetune.int8_linear import Int8Linear, int8_hook
from minillm.finetune.lora import LoRALinear
from minillm.finetune.new_tokens import resize_vocab
from minillm.finetune.nf4_linear import NF4Linear, nf4_hook
from minillm.formats.weights import check_finite, iter_shard
from minillm.names import hf_to_ours, ours_to_hf
from minillm.util.fileio import atomic_write_bytes, read_json_object

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
BASE_QUANTIZATION = "base_quantization.json"
PEFT_PREFIX = "base_model.model."
MAGNITUDE = "lora_magnitude_vector"


def _peft_key(module_name: str, which: str) -> str:
    """("layers.0.self_attn.q_proj", "A") →
    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"; which "m" gives DoRA's
    "….q_proj.lora_magnitude_vector" (HF module path, PEFT prefix)."""
    path = PEFT_PREFIX + ours_to_hf(module_name + ".weight").removesuffix(".weight")
    return f"{path}.{MAGNITUDE}" if which == "m" else f"{path}.lora_{which}.weight"


def adapter_config(modules: dict[str, LoRALinear], base_model_name_or_path: str | None,
                   modules_to_save=()) -> dict:
    """PEFT's LoraConfig fields for these modules (all must share r, alpha, dropout, rsLoRA and
    DoRA)."""
    first = next(iter(modules.values()))
    settings = lambda m: [m.r, m.alpha, m.dropout_p, m.use_rslora, isinstance(m, DoRALinear)]
    for name, m in modules.items():
        if settings(m) != settings(first):
            raise ValueError(f"save_adapter: {name!r} has [r, alpha, dropout, rslora, dora] = "
                             f"{settings(m)}; expected the same as the first adapter "
                             f"({settings(first)}): PEFT's per-module patterns are not written")
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
        "modules_to_save": list(modules_to_save) or None,
        "use_rslora": first.use_rslora,
        "use_dora": isinstance(first, DoRALinear),
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def _settings(base: nn.Module) -> tuple | None:
    """The record of one quantized base layer as a hashable tuple, None for a dense one."""
    if isinstance(base, NF4Linear):
        return ("nf4", ("blocksize", base.blocksize), ("double_quant", base.double_quant))
    if isinstance(base, Int8Linear):
        return ("int8", ("threshold", base.threshold))
    return None


def _quantization_record(modules: dict[str, LoRALinear]) -> dict | None:
    """{"quant_method": "nf4", "blocksize", "double_quant"} or {"quant_method": "int8",
    "threshold"} of the adapters' quantized bases, None if dense."""
    found = {_settings(m.base) for m in modules.values()} - {None}
    if not found:
        return None
    if len(found) > 1:
        raise ValueError(f"save_adapter: the quantized base layers mix settings {sorted(found)}")
    method, *fields = found.pop()
    return {"quant_method": method, **dict(fields)}


def save_adapter(model: nn.Module, dirpath, base_model_name_or_path: str | None = None,
                 modules_to_save=(), tokenizer_path=None) -> Path:
    """Write adapter_model.safetensors + adapter_config.json (PEFT's layout), base_quantization.json
    for an NF4 or int8 base, and a copy of `tokenizer_path` (a vocabulary with new pieces), each
    atomically.
    `modules_to_save` (e.g. ["embed_tokens", "lm_head"]) are written whole."""
    from safetensors.torch import save

    modules = lora_modules(model)
    if not modules:
        raise ValueError("save_adapter: the model has no LoRALinear modules "
                         "(call apply_lora first)")
    dirpath = Path(dirpath)
    dirpath.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, m in modules.items():
        state[_peft_key(name, "A")] = m.lora_A.weight.detach().contiguous().cpu()  # (r, in)
        state[_peft_key(name, "B")] = m.lora_B.weight.detach().contiguous().cpu()  # (out, r)
        if isinstance(m, DoRALinear):
            # (out,)
            state[_peft_key(name, "m")] = m.lora_magnitude_vector.detach().contiguous().cpu()
    for name in modules_to_save:
        for key, p in model.get_submodule(name).named_parameters(prefix=name):
            # a copy each: with tied embeddings embed_tokens and lm_head are one tensor, which
            # safetensors refuses to store twice (PEFT, too, keeps one trained copy per module)
            state[PEFT_PREFIX + ours_to_hf(key)] = p.detach().cpu().clone()  # e.g. (V, C)
    config = adapter_config(modules, base_model_name_or_path, modules_to_save)
    atomic_write_bytes(dirpath / ADAPTER_WEIGHTS, save(state, metadata={"format": "pt"}))
    atomic_write_bytes(dirpath / ADAPTER_CONFIG, (json.dumps(config, indent=2) + "\n").encode())
    record = _quantization_record(modules)
    if record is not None:
        atomic_write_bytes(dirpath / BASE_QUANTIZATION,
                           (json.dumps(record, indent=2) + "\n").encode())
    if (tokenizer_path is not None
            and Path(tokenizer_path).resolve() != (dirpath / "tokenizer.model").resolve()):
        atomic_write_bytes(dirpath / "tokenizer.model", Path(tokenizer_path).read_bytes())
    return dirpath


def _valid_record(cfg: dict) -> bool:
    if cfg.get("quant_method") == "nf4":
        blocksize = cfg.get("blocksize")
        return (set(cfg) == {"quant_method", "blocksize", "double_quant"}
                and type(blocksize) is int and 16 <= blocksize <= 4096
                and blocksize & (blocksize - 1) == 0 and type(cfg["double_quant"]) is bool)
    if cfg.get("quant_method") == "int8":
        t = cfg.get("threshold")
        return (set(cfg) == {"quant_method", "threshold"} and type(t) in (int, float)
                and 0 <= t < float("inf"))
    return False


def read_base_quantization(dirpath) -> dict | None:
    """The quantized base an adapter directory recorded: {"quant_method": "nf4", "blocksize",
    "double_quant"} (QLoRA) or {"quant_method": "int8", "threshold"} (lora8); None when the adapter
    was trained on a dense base. A record of another shape is an error naming the file."""
    path = Path(dirpath) / BASE_QUANTIZATION
    if not path.is_file():
        return None
    cfg = read_json_object(path, "base quantization record")
    if not _valid_record(cfg):
        raise ValueError(f"{path}: expected {{\"quant_method\": \"nf4\", \"blocksize\": <a "
                         f"power of two in [16, 4096]>, \"double_quant\": <bool>}} or "
                         f"{{\"quant_method\": \"int8\", \"threshold\": <number >= 0>}}, "
                         f"found {cfg}")
    return cfg


def quantized_base_hook(record: dict | None, compute_dtype=torch.float32, device="cpu"):
    """The load_pretrained linear_hook that rebuilds the base a `read_base_quantization` record
    describes (nf4_hook or int8_hook), None for a dense base."""
    if record is None:
        return None
    if record["quant_method"] == "nf4":
        return nf4_hook(record["blocksize"], record["double_quant"], compute_dtype, device)
    return int8_hook(record["threshold"], compute_dtype, device)


def _number(path: Path, cfg: dict, key: str, ok, expected: str, default=None):
    """cfg[key] as training would accept it (finetune's rules), or one error naming file and key."""
    value = cfg.get(key, default)
    real = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (real and math.isfinite(value) and ok(value)):
        raise ValueError(f"{path}: {key} must be {expected}, found {value!r}")
    return value


def _read_adapter_config(path: Path) -> dict:
    cfg = read_json_object(path, "adapter config")
    required_values = {"peft_type": ("LORA",), "bias": ("none",), "fan_in_fan_out": (False,),
                       "use_dora": (False, True, None), "rank_pattern": ({}, None),
                       "alpha_pattern": ({}, None), "use_rslora": (False, True, None)}
    for key, allowed in required_values.items():
        if key in cfg and cfg[key] not in allowed:
            raise ValueError(f"{path}: {key} = {cfg[key]!r} is not supported; "
                             f"expected one of {list(allowed)}")
    if type(cfg.get("r")) is not int or cfg["r"] < 1:  # 8.5 or 1e400 is not a rank
        raise ValueError(f"{path}: r must be an integer >= 1, found {cfg.get('r')!r}")
    _number(path, cfg, "lora_alpha", lambda v: v > 0, "a finite number > 0 (the scale is "
            "lora_alpha / r)")
    _number(path, cfg, "lora_dropout", lambda v: 0 <= v < 1, "a number in [0, 1)", default=0.0)
    for key, allowed in (("target_modules", set(SHORT_NAMES.values()) | {"lm_head"}),
                         ("modules_to_save", {"embed_tokens", "lm_head"})):
        names = cfg.get(key) or []
        if isinstance(names, str):
            raise ValueError(f"{path}: {key} = {names!r} is a regular expression, which minillm "
                             f"does not match; list the module names, e.g. {sorted(allowed)}")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{path}: {key} must be a list of module names, found {names!r}")
        unknown = sorted(set(names) - allowed)
        if unknown:
            raise ValueError(f"{path}: {key} names {unknown}, which no Llama module is; "
                             f"expected names from {sorted(allowed)}")
    return cfg


def _read_adapter_weights(dirpath: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """The adapter's tensors (safetensors, or an older PEFT's adapter_model.bin, read as weights
    only), each checked finite."""
    st, bin_ = dirpath / ADAPTER_WEIGHTS, dirpath / "adapter_model.bin"
    if st.is_file():
        path, state = st, dict(iter_shard(st))
    elif bin_.is_file():  # older PEFT versions
        path, state = bin_, dict(iter_shard(bin_))
    else:
        raise FileNotFoundError(f"{dirpath}: no {ADAPTER_WEIGHTS} (or adapter_model.bin)")
    for key, t in state.items():
        check_finite(t, str(path), key)
    return path, state


def _saved_module_key(key: str, saved_modules: list[str]) -> tuple[str, str] | None:
    """("lm_head.weight" | "lm_head.modules_to_save.weight" | "lm_head.original_module.weight") →
    ("lm_head.weight", "" | "modules_to_save" | "original_module") when lm_head is in saved_modules.
    peft writes the two wrapper forms beside the plain one when the vocabulary was resized."""
    module, _, param = key.rpartition(".")
    owner, _, wrapper = module.rpartition(".")
    if module in saved_modules:
        return key, ""
    if owner in saved_modules and wrapper in ("modules_to_save", "original_module"):
        return f"{owner}.{param}", wrapper
    return None


def _split_keys(path: Path, state: dict, saved_modules: list[str], dora: bool):
    """{module: {"A"|"B"|"m": tensor}} for the adapters and {our parameter key: tensor} for the
    modules trained in full; any other key is an error naming the file."""
    adapters: dict[str, dict[str, torch.Tensor]] = {}
    whole: dict[str, torch.Tensor] = {}
    suffixes = ({".lora_A.weight": "A", ".lora_B.weight": "B"}
                | ({f".{MAGNITUDE}": "m"} if dora else {}))
    for key, t in state.items():
        body = key.removeprefix(PEFT_PREFIX)
        suffix = next((s for s in suffixes if body.endswith(s)), None)
        if key.startswith(PEFT_PREFIX) and suffix is not None:
            adapters.setdefault(hf_to_ours(body.removesuffix(suffix)), {})[suffixes[suffix]] = t
        elif key.startswith(PEFT_PREFIX) and _saved_module_key(hf_to_ours(body), saved_modules):
            ours, wrapper = _saved_module_key(hf_to_ours(body), saved_modules)
            if wrapper == "original_module":
                continue  # the base's own rows (peft adds them when the vocabulary was resized)
            if ours in whole and not torch.equal(whole[ours], t):
                raise ValueError(f"{path}: {key!r} differs from the other copy of {ours!r} "
                                 f"in the file")
            whole[ours] = t
        else:
            expected = ", ".join(f"'{PEFT_PREFIX}<module>{s}'" for s in suffixes)
            or_saved = (" or a parameter of modules_to_save " + str(saved_modules)
                        if saved_modules else "")
            raise ValueError(f"{path}: unexpected key {key!r}; expected {expected}{or_saved}")
    return adapters, whole


def _check_adapters(path: Path, model: nn.Module, adapters: dict, r: int, dora: bool):
    """Every module exists and every tensor has the shape this base and rank imply."""
    for name, parts in adapters.items():
        needed = {"A", "B", "m"} if dora else {"A", "B"}
        if needed - set(parts):
            half = sorted(needed - set(parts))[0]
            raise ValueError(f"{path}: {_peft_key(name, half)!r} is missing "
                             f"(the rest of its adapter is present)")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{path}: key {_peft_key(name, 'A')!r} names module {name!r}, "
                             "which this model does not have "
                             "(an adapter for another architecture?)") from None
        base = module.base if isinstance(module, LoRALinear) else module
        expected = {"A": (r, base.in_features), "B": (base.out_features, r),
                    "m": (base.out_features,)}
        for which, t in parts.items():
            if tuple(t.shape) != expected[which]:
                raise ValueError(f"{path}: {_peft_key(name, which)!r} has shape {tuple(t.shape)}, "
                                 f"expected {expected[which]} for r={r} and this base model "
                                 "(an adapter for another base?)")


def _load_whole_modules(path: Path, model: nn.Module, whole: dict[str, torch.Tensor]):
    """Copy the modules_to_save tensors in, resizing embed_tokens / lm_head first for new tokens."""
    rows = {t.shape[0] for k, t in whole.items() if k in ("embed_tokens.weight", "lm_head.weight")}
    if len(rows) > 1:
        raise ValueError(f"{path}: embed_tokens and lm_head have different row counts "
                         f"{sorted(rows)}")
    if rows and rows != {model.config.vocab_size}:
        # a vocabulary with new pieces: rows appended, then overwritten
        resize_vocab(model, rows.pop())
    params = dict(model.named_parameters())
    if model.config.tie_embeddings and "lm_head.weight" in whole:
        # tied: lm_head is the embedding; both copies in the file must agree (they trained as one)
        head = whole.pop("lm_head.weight")
        if "embed_tokens.weight" in whole and not torch.equal(head, whole["embed_tokens.weight"]):
            raise ValueError(f"{path}: lm_head and embed_tokens differ, but this base ties them "
                             f"(tie_word_embeddings): an adapter for an untied base?")
        whole.setdefault("embed_tokens.weight", head)
    for key, t in whole.items():
        if key not in params or params[key].shape != t.shape:
            found = tuple(params[key].shape) if key in params else "no such parameter"
            raise ValueError(f"{path}: {PEFT_PREFIX + ours_to_hf(key)!r} has shape "
                             f"{tuple(t.shape)}; this model's {key!r}: {found}")
        with torch.no_grad():
            params[key].copy_(t)


def load_adapter(model: nn.Module, dirpath) -> list[str]:
    """Apply a PEFT LoRA or DoRA adapter directory onto `model` (wrapping the named modules, or
    filling adapters already applied with the same rank and kind), and copy its modules_to_save in.
    Every key is checked: an unknown key, a module this model lacks, a missing A/B/magnitude part or
    a shape that does not fit (an adapter for another base) raises an error naming the file and the
    key. Returns the names of the modules that received an adapter, then those loaded whole."""
    dirpath = Path(dirpath)
    cfg = _read_adapter_config(dirpath / ADAPTER_CONFIG)
    path, state = _read_adapter_weights(dirpath)
    r, alpha, dora = int(cfg["r"]), cfg["lora_alpha"], bool(cfg.get("use_dora"))
    dropout, rslora = float(cfg.get("lora_dropout") or 0.0), bool(cfg.get("use_rslora") or False)
    saved_modules = cfg.get("modules_to_save") or []
    adapters, whole = _split_keys(path, state, saved_modules, dora)
    _check_adapters(path, model, adapters, r, dora)
    _load_whole_modules(path, model, whole)
    kind = DoRALinear if dora else LoRALinear
    loaded = [n for n, _ in model.named_modules() if n in adapters]  # in the model's module order
    for name in loaded:
        module = model.get_submodule(name)
        if not isinstance(module, LoRALinear):
            module = kind(module, r, alpha, dropout, rslora).train(module.training)
            model.set_submodule(name, module)
        elif module.r != r or type(module) is not kind:
            raise ValueError(f"{path}: a rank-{r} {kind.__name__} adapter, but {name!r} "
                             f"already has a rank-{module.r} {type(module).__name__}")
        module.alpha, module.use_rslora = alpha, rslora
        module.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        with torch.no_grad():
            module.lora_A.weight.copy_(adapters[name]["A"])
            module.lora_B.weight.copy_(adapters[name]["B"])
            if dora:
                module.lora_magnitude_vector.copy_(adapters[name]["m"])
            if not bool(torch.isfinite(module.delta_weight()).all()):  # e.g. lora_alpha = 1e308
                raise ValueError(f"{dirpath / ADAPTER_CONFIG}: lora_alpha = {alpha} with r = {r} "
                                 f"makes the update of {name!r} overflow to inf/NaN")
    return loaded + sorted({k.rpartition(".")[0] for k in whole})
