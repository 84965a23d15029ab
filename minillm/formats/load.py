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

import torch

from minillm.formats.gguf_reader import load_gguf_weights, read_gguf, sentencepiece_model_from_gguf
from minillm.formats.hf import load_hf
from minillm.formats.meta import load_meta
from minillm.formats.native import MINILLM_CONFIG, load_minillm
from minillm.formats.weights import fill_model
from minillm.model import Llama
from minillm.tokenizer.sentencepiece import Tokenizer

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


def load_tokenizer(checkpoint, tokenizer_path=None):
    """The tokenizer for a checkpoint: an explicit tokenizer_path, the tokenizer.model beside it, or
    for a GGUF file the SentencePiece model rebuilt from its metadata."""
    if tokenizer_path is not None:
        return Tokenizer(tokenizer_path)
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():  # say so, rather than that the tokenizer.model inside it is missing
        raise FileNotFoundError(f"{checkpoint}: checkpoint path does not exist")
    if checkpoint.is_file() and checkpoint.suffix == ".gguf":
        return Tokenizer(model_bytes=sentencepiece_model_from_gguf(read_gguf(checkpoint)))
    if checkpoint.is_dir() and not any((checkpoint / f).is_file() for f in CHECKPOINT_FILES):
        raise FileNotFoundError(f"{checkpoint}: not a checkpoint directory (expected one of "
                                f"{', '.join(CHECKPOINT_FILES)})")
    path = checkpoint / "tokenizer.model"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing tokenizer.model beside the checkpoint "
                                f"(pass a tokenizer path)")
    return Tokenizer(path)
