"""Builders for tiny test artifacts in the exact on-disk layouts minillm reads (no downloads, ever).

`write_hf_checkpoint` writes an OpenLLaMA-style HF directory: config.json, weights as a
single file or as shards + index (including the legacy `rotary_emb.inv_freq` buffers),
tokenizer.model and the small JSON side files. `tiny_tokenizer` trains a SentencePiece model
on a few standard-library files.
"""

from __future__ import annotations

import importlib.util
import json
import string
import sysconfig
from pathlib import Path

import torch

from minillm.config import ModelConfig
from minillm.model import Llama
from minillm.names import ours_to_hf
from minillm.tokenizer.sentencepiece import Tokenizer, train_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
ROOT = Path(__file__).resolve().parents[1]


def script(name: str):
    """One of the command-line scripts at the repository root (train, generate, export) as a module,
    so a test can call its main(argv). Loaded from its file: the repository root is never put on
    sys.path (kernels/README.md says why)."""
    spec = importlib.util.spec_from_file_location(f"minillm_script_{name}", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stdlib_texts(names=("json/__init__.py", "json/decoder.py", "json/encoder.py", "textwrap.py",
                        "string.py")):
    return [(STDLIB / n).read_text(encoding="utf-8") for n in names]


def tiny_tokenizer(path: Path, vocab_size: int = 384) -> Tokenizer:
    return train_tokenizer(stdlib_texts(), path, vocab_size)


def random_hf_state(cfg: ModelConfig, seed: int = 0,
                    inv_freq: bool = True) -> dict[str, torch.Tensor]:
    """HF-named random weights for cfg; norms are random around 1 so they matter in comparisons."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: p.shape for k, p in Llama(cfg).named_parameters()}
    state = {}
    for k, shape in shapes.items():
        if k.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            t = 0.02 * torch.randn(shape, generator=g) * (5.0 if "embed" in k else 1.0)
        state[ours_to_hf(k)] = t
    if inv_freq:
        for i in range(cfg.n_layers):
            state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = 1.0 / (
                cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim)
            )
    return state


def write_hf_checkpoint(
    dirpath: Path,
    cfg: ModelConfig,
    seed: int = 0,
    fmt: str = "bin-sharded",
    dtype: torch.dtype = torch.float32,
    tokenizer: Tokenizer | None = None,
    n_shards: int = 3,
) -> dict[str, torch.Tensor]:
    """Write an OpenLLaMA-layout directory; fmt in {bin, bin-sharded, safetensors,
    safetensors-sharded}. Returns the HF-named state dict that was written (in `dtype`)."""
    from safetensors.torch import save_file

    dirpath = Path(dirpath)
    dirpath.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(dtype)
             for k, v in random_hf_state(cfg, seed, inv_freq=fmt.startswith("bin")).items()}
    hf_cfg = cfg.to_hf_config()
    hf_cfg.update(torch_dtype=str(dtype).removeprefix("torch."), transformers_version="4.30.0.dev0",
                  initializer_range=0.02, use_cache=True)
    (dirpath / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    (dirpath / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2})
    )
    (dirpath / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    )
    (dirpath / "tokenizer_config.json").write_text(
        json.dumps({"add_bos_token": True, "add_eos_token": False,
                    "tokenizer_class": "LlamaTokenizer"})
    )
    if tokenizer is not None:
        (dirpath / "tokenizer.model").write_bytes(tokenizer.model_bytes())
    is_st = fmt.startswith("safetensors")
    stem, ext = ("model", "safetensors") if is_st else ("pytorch_model", "bin")
    writer = ((lambda sd, p: save_file(sd, str(p), metadata={"format": "pt"})) if is_st
              else torch.save)
    if not fmt.endswith("sharded"):
        writer(state, dirpath / f"{stem}.{ext}")
        return state
    keys = list(state)
    per = -(-len(keys) // n_shards)
    weight_map = {}
    for s in range(n_shards):
        name = f"{stem}-{s + 1:05d}-of-{n_shards:05d}.{ext}"
        part = {k: state[k] for k in keys[s * per:(s + 1) * per]}
        writer(part, dirpath / name)
        weight_map.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dirpath / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2))
    return state


class CharTokenizer:
    """One id per printable character (3 + index), bos 1, eos 2, pad 0: token positions are easy to
    read in tests of masking, truncation and packing."""

    bos_id, eos_id, pad_id = 1, 2, 0
    alphabet = string.printable
    vocab_size = 3 + len(string.printable)

    def encode(self, text, bos=True, eos=False):
        return ([self.bos_id] * bos + [3 + self.alphabet.index(c) for c in text]
                + [self.eos_id] * eos)

    def decode(self, ids):
        return "".join(self.alphabet[i - 3] for i in ids if i >= 3)
