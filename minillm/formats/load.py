"""Load any checkpoint: `load_pretrained(path)` picks the format by what it finds at the path, and
`load_tokenizer(path)` finds the tokenizer that belongs to it.

    model.gguf                     GGUF file (gguf_reader.py)
    dir/minillm_config.json        minillm: model.safetensors (our key names) + ModelConfig JSON
                                   (native.py)
    dir/config.json                HF / OpenLLaMA: model.safetensors[.index.json] or
                                   pytorch_model.bin[.index.json] (shards listed in the index's
                                   weight_map)
    dir/params.json                Meta: consolidated.00.pth (meta.py)

Every format builds the Llama on the meta device and fills it tensor by tensor (weights.py), so a 7B
model never sits in memory twice. A `linear_hook` (finetune/nf4_linear.py's `nf4_hook`) may take
each projection weight as it streams in, e.g. to quantize it: the loaders know nothing of
quantization.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from minillm.formats.gguf_reader import load_gguf_weights, read_gguf, sentencepiece_model_from_gguf
from minillm.formats.hf import load_hf
from minillm.formats.meta import load_meta
from minillm.formats.native import MINILLM_CONFIG, load_minillm
from minillm.formats.weights import fill_model
from minillm.model import Llama
from minillm.tokenizer.bpe import BPETokenizer
from minillm.tokenizer.bpe_files import from_gguf_metadata, from_tokenizer_json
from minillm.tokenizer.sentencepiece import Tokenizer
from minillm.util.fileio import read_json_object

CHECKPOINT_FILES = (MINILLM_CONFIG, "config.json", "params.json")  # what names a checkpoint dir


def load_pretrained(path, dtype=torch.float32, device="cpu", linear_hook=None) -> Llama:
    """Load any supported checkpoint into a Llama (see the module docstring for the formats), in
    eval mode.

    dtype None keeps the dtype the weights are stored in (what export uses: no rounding before
    quantizing). linear_hook(model, key, weight) -> bool may consume each weight as it streams in
    (weights.fill_model), e.g. `nf4_hook(...)` stores every block projection as an NF4Linear
    (QLoRA's frozen base).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint path does not exist")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path}: a checkpoint file must be .gguf; "
                             f"for HF/minillm weights pass the directory")
        cfg, state = load_gguf_weights(path)
        with torch.device("meta"):
            model = Llama(cfg)
        tensors = ((str(path), k, t) for k, t in state.items())
        model = fill_model(model, tensors, dtype, device, linear_hook, where=str(path))
    elif (path / MINILLM_CONFIG).is_file():
        model = load_minillm(path, dtype, device, linear_hook)
    elif (path / "config.json").is_file():
        model = load_hf(path, dtype, device, linear_hook)
    elif (path / "params.json").is_file():
        model = load_meta(path, dtype, device, linear_hook)
    else:
        raise FileNotFoundError(f"{path}: not a checkpoint directory (expected one of "
                                f"{', '.join(CHECKPOINT_FILES)})")
    return model.eval()


def model_width(path) -> int | None:
    """The hidden size of the checkpoint at `path`, read from its config alone, before any weight:
    what training's dtype choice weighs (util/device.py, CPU_BF16_MIN_WIDTH). None where the path
    holds no config that says it (load_pretrained then gives the error)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        meta = read_gguf(path).metadata
        width = meta.get(f"{meta.get('general.architecture', 'llama')}.embedding_length")
    else:
        configs = ((MINILLM_CONFIG, "dim"), ("config.json", "hidden_size"), ("params.json", "dim"))
        found = [(name, key) for name, key in configs if (path / name).is_file()]
        if not found:
            return None
        name, key = found[0]
        width = read_json_object(path / name, name).get(key)
    return int(width) if isinstance(width, int | np.integer) and width > 0 else None


def load_tokenizer(checkpoint, tokenizer_path=None) -> Tokenizer | BPETokenizer:
    """The tokenizer for a checkpoint: an explicit tokenizer_path, the tokenizer beside it
    (tokenizer.model, SentencePiece, first: the GUIDE's rule for OpenLLaMA; else tokenizer.json,
    byte-level BPE), or for a GGUF file the one its tokenizer.ggml.* metadata describes."""
    if tokenizer_path is not None:
        return open_tokenizer(tokenizer_path)
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():  # say so, rather than that the tokenizer.model inside it is missing
        raise FileNotFoundError(f"{checkpoint}: checkpoint path does not exist")
    if checkpoint.is_file() and checkpoint.suffix == ".gguf":
        return gguf_tokenizer(checkpoint)
    if checkpoint.is_dir() and not any((checkpoint / f).is_file() for f in CHECKPOINT_FILES):
        raise FileNotFoundError(f"{checkpoint}: not a checkpoint directory (expected one of "
                                f"{', '.join(CHECKPOINT_FILES)})")
    path = checkpoint / "tokenizer.model"
    if not path.is_file() and (checkpoint / "tokenizer.json").is_file():
        return from_tokenizer_json(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing tokenizer.model (or tokenizer.json) beside the "
                                f"checkpoint (pass a tokenizer path)")
    return Tokenizer(path)


def gguf_tokenizer(path) -> Tokenizer | BPETokenizer:
    """A GGUF's tokenizer: SentencePiece ("llama") or byte-level BPE ("gpt2")."""
    g = read_gguf(path)
    if g.metadata.get("tokenizer.ggml.model") == "gpt2":
        return from_gguf_metadata(g.metadata, str(g.path))
    return Tokenizer(model_bytes=sentencepiece_model_from_gguf(g))


def open_tokenizer(path) -> Tokenizer | BPETokenizer:
    """A tokenizer file, by what it is: a .gguf, a tokenizer.json (or a directory holding one and
    no tokenizer.model), else a SentencePiece model (or a directory holding tokenizer.model)."""
    path = Path(path)
    if path.suffix == ".gguf" and path.is_file():
        return gguf_tokenizer(path)
    if path.suffix == ".json" or (path.is_dir() and not (path / "tokenizer.model").is_file()
                                  and (path / "tokenizer.json").is_file()):
        return from_tokenizer_json(path)
    return Tokenizer(path)
