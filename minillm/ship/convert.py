"""Export: merge an adapter into its base and write the model as GGUF (llama.cpp), HF safetensors or
Meta's consolidated layout — the last steps of the tutorial path ("merge the adapter, convert to
GGUF, quantize").

    base checkpoint ──load (stored dtype, memory-mapped)──▶ Llama
        [--adapter: LoRA onto it; --qlora / --int8 (or the adapter's record): the base is
         first rounded through NF4 / LLM.int8, as the adapter trained on it]
        ──merge W += (α/r)·B·A──▶ dense Llama ──▶ write_gguf / save_hf / save_meta
    --format gguf-lora: the adapter alone, unmerged, as llama.cpp's LoRA GGUF (gguf_lora.py)

The chat template the model was fine-tuned with (prompt_template.json in the adapter or checkpoint
directory, or --template) goes into the GGUF as `tokenizer.chat_template` and into an HF directory's
tokenizer_config.json as "chat_template" (Jinja from templates.py).

Nothing here holds a second full copy of the model: the base stays in the dtype it is stored in (no
rounding before quantizing, and a memory-mapped `.bin` is never copied), and the GGUF writer
converts one tensor at a time. Directory outputs are built in a temp folder beside the target and
renamed into place (fileio.atomic_directory, with the usual permissions); a failed export leaves no
partial output behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from minillm.data.chat_template import JinjaTemplate, model_template
from minillm.data.templates import JINJA, TEMPLATES, read_template_record
from minillm.formats.hf import save_hf
from minillm.formats.known_models import resolve_checkpoint
from minillm.formats.load import load_pretrained, load_tokenizer
from minillm.formats.meta import save_meta
from minillm.model import Llama
from minillm.ship.gguf_lora import LORA_OUTTYPES, write_lora_gguf
from minillm.ship.gguf_writer import check_gguf_output, write_gguf
from minillm.tokenizer.bpe import BPETokenizer
from minillm.tokenizer.bpe_files import save_tokenizer_json
from minillm.util.device import DTYPES
from minillm.util.fileio import (
    atomic_directory,
    atomic_write_bytes,
    read_json_object,
    require_owned,
)

# from q4_k_m on: llama-quantize's file types (quant_mix.py)
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k", "q4_k_s", "q5_k_s",
              "q4_k", "q5_k", "q4_1", "q5_0", "q5_1")
TORCH_TYPES = ("auto", "f32", "f16", "bf16")  # hf/meta outtypes: auto keeps the stored dtype


@dataclass
class ExportConfig:
    checkpoint: str  # HF/OpenLLaMA directory, minillm checkpoint, Meta directory or .gguf
    out: str  # .gguf file (format gguf) or a directory (hf, meta)
    format: str = "gguf"  # gguf | hf | meta | gguf-lora (the adapter alone, for llama.cpp's --lora)
    # gguf: one of GGUF_TYPES, f16 by default; hf/meta: auto (as stored) f32 f16 bf16
    outtype: str | None = None
    adapter: str | None = None  # a PEFT-format LoRA adapter directory to merge first
    # the adapter was trained on an NF4 base: merge into the NF4-rounded weights
    qlora: bool = False
    # the adapter was trained on an LLM.int8 base (alpaca-lora): merge into the int8-rounded weights
    int8: bool = False
    tokenizer: str | None = None  # tokenizer.model (default: the one beside the checkpoint)
    name: str | None = None  # general.name in GGUF (default: the output's stem)
    # chat template (templates.py); default: the recorded prompt_template.json
    template: str | None = None

    def __post_init__(self):
        if self.format not in ("gguf", "hf", "meta", "gguf-lora"):
            raise ValueError(f"format must be gguf, hf, meta or gguf-lora, found {self.format!r}")
        if self.outtype is None:
            self.outtype = {"gguf": "f16", "gguf-lora": "f32"}.get(self.format, "auto")
        allowed = {"gguf": GGUF_TYPES,
                   "gguf-lora": tuple(LORA_OUTTYPES)}.get(self.format, TORCH_TYPES)
        if self.outtype not in allowed:
            raise ValueError(f"outtype {self.outtype!r} is not supported for {self.format}; "
                             f"expected one of {allowed}")
        if (self.qlora or self.int8) and self.adapter is None:
            raise ValueError(f"{'qlora' if self.qlora else 'int8'}=True needs an adapter to merge")
        if self.qlora and self.int8:
            raise ValueError("qlora (an NF4 base) and int8 (an LLM.int8 base) exclude each other")
        if self.format == "gguf-lora" and (self.adapter is None or self.qlora or self.int8):
            raise ValueError("format gguf-lora writes an adapter: give --adapter (and no --qlora: "
                             "llama.cpp applies it to whatever base file it is given)")
        if self.template is not None and self.template not in TEMPLATES:
            raise ValueError(f"template must be one of {list(TEMPLATES)}, found {self.template!r}")


def base_quantization(cfg: ExportConfig) -> dict | None:
    """The quantized base to merge into: the adapter's record (base_quantization.json), else
    --qlora's QLoRA defaults (NF4, blocksize 64, no double quantization) or --int8's LLM.int8
    (threshold 6.0: the threshold changes the forward pass, not the stored weight). A flag that
    contradicts the record is an error."""
    from minillm.finetune.peft_io import BASE_QUANTIZATION, read_base_quantization

    record = read_base_quantization(cfg.adapter) if cfg.adapter is not None else None
    flag = "nf4" if cfg.qlora else "int8" if cfg.int8 else None
    if record is not None and flag is not None and record["quant_method"] != flag:
        raise ValueError(f"{Path(cfg.adapter) / BASE_QUANTIZATION}: the adapter was trained on a "
                         f"{record['quant_method']} base, but --{'qlora' if cfg.qlora else 'int8'} "
                         f"says {flag}")
    if record is None and flag == "nf4":
        record = {"quant_method": "nf4", "blocksize": 64, "double_quant": False}
        print(f"{cfg.adapter} records no NF4 settings: "
              "assuming blocksize 64, no double quantization")
    elif record is None and flag == "int8":
        record = {"quant_method": "int8", "threshold": 6.0}
        print(f"{cfg.adapter} records no int8 settings: assuming LLM.int8 row-wise weights")
    elif record is not None:
        print(f"merging into the {record['quant_method']} base the adapter was trained on: "
              f"{record}")
    return record


def load_merged(cfg: ExportConfig) -> Llama:
    """The base model with the adapter (if any) merged in, in the dtype the base is stored in. A
    QLoRA or lora8 adapter records the quantized base it trained on (base_quantization.json): the
    base is rounded through exactly that (`base_quantization`), so the merge is W_hat + ΔW with
    W_hat the weights the adapter saw in training."""
    from minillm.finetune.peft_io import quantized_base_hook

    hook = quantized_base_hook(base_quantization(cfg), torch.float32)
    model = load_pretrained(cfg.checkpoint, dtype=None, linear_hook=hook)
    if cfg.adapter is not None:
        from minillm.finetune.adapters import merge_lora
        from minillm.finetune.peft_io import load_adapter

        load_adapter(model, cfg.adapter)
        merged = merge_lora(model)  # an NF4 / int8 base is dequantized here and returned dense
        print(f"merged LoRA adapter from {cfg.adapter} into {len(merged)} layers")
    return model


def check_output(cfg: ExportConfig, out: Path):
    """Refuse a bad output path before any gigabyte is read: a missing or read-only parent
    directory, and anything at `out` that minillm did not write as this kind of export (a GGUF
    file replaces only a GGUF minillm wrote; an HF or Meta directory only minillm's own export of
    the same format: util/fileio.py's ownership rule)."""
    parent = out.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"{out}: output directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"{out}: output directory {parent} is not writable")
    if cfg.format in ("gguf", "gguf-lora"):
        check_gguf_output(out)
    elif out.exists() or out.is_symlink():
        require_owned(out, f"{cfg.format} export")


def chat_template(cfg: ExportConfig) -> str | None:
    """The Jinja chat template to ship: --template, else the adapter's or checkpoint's recorded
    one (a name, or a model's own Jinja that a fine-tune recorded), else the template the
    checkpoint itself ships (a GGUF's tokenizer.chat_template, an HF tokenizer_config.json's)."""
    dirs = [d for d in (cfg.adapter, cfg.checkpoint) if d is not None and Path(d).is_dir()]
    name = cfg.template or read_template_record(*dirs)
    if isinstance(name, JinjaTemplate):
        print(f"chat template: the model's own ({name.where})")
        return name.source
    if name is None and (own := model_template(cfg.checkpoint)) is not None:
        print(f"chat template: the model's own ({own.where})")
        return own.source
    if name is not None:
        print(f"chat template: {name}"
              + ("" if name in JINJA else " (plain completion: no chat template)"))
    return JINJA.get(name)


def write_bpe_files(d: Path, tokenizer: BPETokenizer, template: str | None):
    """A byte-level BPE tokenizer beside exported weights: tokenizer.json + tokenizer_config.json
    (transformers' AutoTokenizer gives the same ids), and the special tokens and generation ids
    of this vocabulary in place of save_hf's SentencePiece defaults."""
    save_tokenizer_json(tokenizer, d, template)
    names = {f"{k}_token": tokenizer.id_to_piece(i) for k, i in
             (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id), ("unk", tokenizer.unk_id))
             if i >= 0}
    atomic_write_bytes(d / "special_tokens_map.json", json.dumps(names, indent=2).encode())
    ids = {f"{k}_token_id": i for k, i in (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id),
                                           ("pad", tokenizer.pad_id)) if i >= 0}
    atomic_write_bytes(d / "generation_config.json", json.dumps(ids, indent=2).encode())


def _export_lora_gguf(cfg: ExportConfig, out: Path) -> Path:
    from minillm.finetune.peft_io import ADAPTER_CONFIG, load_adapter

    whole = read_json_object(Path(cfg.adapter) / ADAPTER_CONFIG,
                             "adapter config").get("modules_to_save")
    if whole:
        raise ValueError(f"{cfg.adapter}: trains {whole} in full (modules_to_save); "
                         "llama.cpp's LoRA GGUF holds only lora_a / lora_b pairs: "
                         "export the merged model instead")
    # the base's config and shapes check the adapter
    model = load_pretrained(cfg.checkpoint, dtype=None)
    load_adapter(model, cfg.adapter)
    write_lora_gguf(out, model, cfg.outtype, name=cfg.name or out.stem)
    return out


def export(cfg: ExportConfig) -> Path:
    """Run one export; returns the written path."""
    # a known model's name stands for its cached file (fetched on first use)
    cfg = dataclasses.replace(cfg, checkpoint=str(resolve_checkpoint(cfg.checkpoint)))
    out = Path(cfg.out)
    check_output(cfg, out)
    if cfg.format == "gguf-lora":
        return _export_lora_gguf(cfg, out)
    template = chat_template(cfg)
    tokenizer_path = cfg.tokenizer
    if (tokenizer_path is None and cfg.adapter is not None
            and (Path(cfg.adapter) / "tokenizer.model").is_file()):
        # the adapter's vocabulary has new pieces
        tokenizer_path = Path(cfg.adapter) / "tokenizer.model"
    # fail early, before loading gigabytes
    tokenizer = load_tokenizer(cfg.checkpoint, tokenizer_path)
    model = load_merged(cfg)
    if cfg.format == "gguf":
        if tokenizer.vocab_size != model.config.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} pieces but the model has "
                             f"{model.config.vocab_size} embedding rows; "
                             "llama.cpp needs them equal")
        write_gguf(out, model.config, model.state_dict().items(), tokenizer, cfg.outtype,
                   name=cfg.name or out.stem, chat_template=template)
        return out
    dtype = None if cfg.outtype == "auto" else DTYPES[cfg.outtype]
    if cfg.format == "meta" and dtype is not None:
        model = model.to(dtype)
    save = save_hf if cfg.format == "hf" else save_meta
    kwargs = {"dtype": dtype} if cfg.format == "hf" else {}

    # replaces an older export at `out` only once this one is complete
    with atomic_directory(out, f"{cfg.format} export") as d:
        save(model, d, **kwargs)
        if isinstance(tokenizer, BPETokenizer):  # tokenizer.json + its configs, template inside
            write_bpe_files(d, tokenizer, template)
            return out
        # the tokenizer's bytes (from its file, or rebuilt from GGUF metadata) go beside the weights
        atomic_write_bytes(d / "tokenizer.model", tokenizer.model_bytes())
        # transformers' apply_chat_template reads it here
        if template is not None and cfg.format == "hf":
            tok_cfg = read_json_object(d / "tokenizer_config.json", "tokenizer config")
            atomic_write_bytes(d / "tokenizer_config.json",
                               json.dumps({**tok_cfg, "chat_template": template},
                                          indent=2).encode())
    return out
