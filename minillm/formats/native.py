"""minillm's own checkpoint directory: `model.safetensors` (our key names) + `minillm_config.json`
(the ModelConfig fields, read strictly) + `tokenizer.model` (SentencePiece) or `tokenizer.json` and
its configs (byte-level BPE); what training writes beside ckpt.pt and what generate.py reads back.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from minillm.config import ModelConfig
from minillm.formats.weights import fill_model, iter_shard
from minillm.model import Llama
from minillm.tokenizer.bpe_files import save_tokenizer_json
from minillm.util.fileio import atomic_write_bytes, read_json_object

MINILLM_CONFIG = "minillm_config.json"


def load_minillm(dirpath: Path, dtype, device, linear_hook=None) -> Llama:
    cfg_path = dirpath / MINILLM_CONFIG
    cfg = ModelConfig.from_dict(read_json_object(cfg_path, "minillm config"), source=str(cfg_path))
    weights = dirpath / "model.safetensors"
    with torch.device("meta"):
        model = Llama(cfg)
    return fill_model(model, ((str(weights), k, t) for k, t in iter_shard(weights)), dtype, device,
                      linear_hook, where=str(weights))


def save_model(model: Llama, dirpath, tokenizer_path=None, step: int | None = None):
    """Write model.safetensors (our key names) + minillm_config.json (+ the tokenizer: a
    tokenizer.model, a tokenizer.json with its configs, or a GGUF's BPE vocabulary as
    tokenizer.json), each atomically.

    A tied lm_head is stored once (as the embedding). Every file is written under a temp name and
    renamed, so an interrupted save leaves the previous files intact. `step`, from a training run,
    goes into the safetensors metadata (minillm_step), to tell which checkpoint it is.
    """
    from safetensors.torch import save

    dirpath = Path(dirpath)
    dirpath.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    metadata = None if step is None else {"minillm_step": str(step)}  # a training run's step
    atomic_write_bytes(dirpath / "model.safetensors", save(state, metadata=metadata))
    atomic_write_bytes(dirpath / MINILLM_CONFIG,
                       json.dumps(model.config.to_dict(), indent=2).encode())
    if tokenizer_path is not None and Path(tokenizer_path).name == "tokenizer.json":
        copy_bpe_files(Path(tokenizer_path), dirpath)
    elif tokenizer_path is not None and Path(tokenizer_path).suffix == ".gguf":
        from minillm.formats.load import gguf_tokenizer  # a GGUF's BPE vocabulary, written out

        save_tokenizer_json(gguf_tokenizer(tokenizer_path), dirpath)
    elif (tokenizer_path is not None
            and Path(tokenizer_path).resolve() != (dirpath / "tokenizer.model").resolve()):
        atomic_write_bytes(dirpath / "tokenizer.model", Path(tokenizer_path).read_bytes())


BPE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "chat_template.jinja")


def copy_bpe_files(tokenizer_json: Path, dirpath: Path):
    """A byte-level BPE tokenizer's files (those present beside its tokenizer.json) into dirpath."""
    for name in BPE_FILES:
        src = tokenizer_json.parent / name
        if src.is_file() and src.resolve() != (dirpath / name).resolve():
            atomic_write_bytes(dirpath / name, src.read_bytes())
