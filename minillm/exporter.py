"""Export: merge an adapter into its base and write the model as GGUF (llama.cpp), HF safetensors or Meta's
consolidated layout — the last steps of the tutorial path ("merge the adapter, convert to GGUF, quantize").

    base checkpoint ──load (stored dtype, memory-mapped)──▶ Llama
        [--adapter: LoRA onto it; --qlora: the base is first rounded through NF4, as QLoRA trained on it]
        ──merge W += (α/r)·B·A──▶ dense Llama ──▶ write_gguf / save_hf / save_meta

Nothing here holds a second full copy of the model: the base stays in the dtype it is stored in (no
rounding before quantizing, and a memory-mapped `.bin` is never copied), and the GGUF writer converts one
tensor at a time. Directory outputs are built in a temp folder beside the target and renamed into place
(fileio.atomic_directory, with the usual permissions); a failed export leaves no partial output behind.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from minillm.checkpoint import load_pretrained, load_tokenizer, save_hf
from minillm.device import DTYPES
from minillm.fileio import atomic_directory, atomic_write_bytes
from minillm.meta_format import save_meta
from minillm.model import Llama

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
TORCH_TYPES = ("auto", "f32", "f16", "bf16")  # hf/meta outtypes: auto keeps the stored dtype


@dataclass
class ExportConfig:
    checkpoint: str  # HF/OpenLLaMA directory, minillm checkpoint, Meta directory or .gguf
    out: str  # .gguf file (format gguf) or a directory (hf, meta)
    format: str = "gguf"  # gguf | hf | meta
    outtype: str | None = None  # gguf: f32 f16 (default) bf16 q8_0 q4_0; hf/meta: auto (as stored) f32 f16 bf16
    adapter: str | None = None  # a PEFT-format LoRA adapter directory to merge first
    qlora: bool = False  # the adapter was trained on an NF4 base: merge into the NF4-rounded weights
    tokenizer: str | None = None  # tokenizer.model (default: the one beside the checkpoint)
    name: str | None = None  # general.name in GGUF (default: the output's stem)

    def __post_init__(self):
        if self.format not in ("gguf", "hf", "meta"):
            raise ValueError(f"format must be gguf, hf or meta, found {self.format!r}")
        if self.outtype is None:
            self.outtype = "f16" if self.format == "gguf" else "auto"
        allowed = GGUF_TYPES if self.format == "gguf" else TORCH_TYPES
        if self.outtype not in allowed:
            raise ValueError(f"outtype {self.outtype!r} is not supported for {self.format}; expected one of {allowed}")
        if self.qlora and self.adapter is None:
            raise ValueError("qlora=True needs an adapter to merge")


def load_merged(cfg: ExportConfig) -> Llama:
    """The base model with the adapter (if any) merged in, in the dtype the base is stored in."""
    model = load_pretrained(cfg.checkpoint, dtype=None, quantize="nf4" if cfg.qlora else None,
                            **({"double_quant": False} if cfg.qlora else {}))
    if cfg.adapter is not None:
        from minillm.lora import load_adapter, merge_lora

        load_adapter(model, cfg.adapter)
        merged = merge_lora(model)  # an NF4 base is dequantized here and returned dense
        print(f"merged LoRA adapter from {cfg.adapter} into {len(merged)} layers")
    return model


def _check_writable(target: Path):
    parent = target.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"{target}: output directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"{target}: output directory {parent} is not writable")


def export(cfg: ExportConfig) -> Path:
    """Run one export; returns the written path."""
    out = Path(cfg.out)
    _check_writable(out)
    tokenizer = load_tokenizer(cfg.checkpoint, cfg.tokenizer)  # fail early, before loading gigabytes
    model = load_merged(cfg)
    if cfg.format == "gguf":
        from minillm.gguf_writer import write_gguf

        if out.suffix != ".gguf":
            raise ValueError(f"{out}: a GGUF output file must end in .gguf")
        if tokenizer.vocab_size != model.config.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} pieces but the model has "
                             f"{model.config.vocab_size} embedding rows; llama.cpp needs them equal")
        write_gguf(out, model.config, model.state_dict().items(), tokenizer, cfg.outtype,
                   name=cfg.name or out.stem)
        return out
    dtype = None if cfg.outtype == "auto" else DTYPES[cfg.outtype]
    if cfg.format == "meta" and dtype is not None:
        model = model.to(dtype)
    save = save_hf if cfg.format == "hf" else save_meta
    kwargs = {"dtype": dtype} if cfg.format == "hf" else {}

    with atomic_directory(out) as d:  # replaces an older export at `out` only once this one is complete
        save(model, d, **kwargs)
        # the tokenizer's bytes (from its file, or rebuilt from GGUF metadata) go beside the weights
        atomic_write_bytes(d / "tokenizer.model", tokenizer.model_bytes())
    return out
