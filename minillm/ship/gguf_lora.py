"""A LoRA adapter as a GGUF file for llama.cpp (`llama-cli -m base.gguf --lora adapter.gguf`).

The layout is the one llama.cpp's `convert_lora_to_gguf.py`
writes and `src/llama-adapter.cpp` reads:

    general.architecture = "llama"       must equal the base model's (llama.cpp refuses a mismatch)
    general.type         = "adapter"
    adapter.type         = "lora"
    adapter.lora.alpha   = α  (FLOAT32)  llama.cpp scales by α / r, r read from the lora_b tensor
    per adapted weight W (GGUF name, e.g. blk.0.attn_q.weight):
        W.lora_a   A, PyTorch (r, in)    file dims [in, r]     (llama.cpp checks in  = W's ne[0])
        W.lora_b   B, PyTorch (out, r)   file dims [r, out]    (llama.cpp checks out = W's ne[1])

llama.cpp computes y = W x + (α / r) · B (A x),
the same as minillm's LoRALinear (lora.py). Two details:

- RoPE: the base's q / k rows are permuted from HF's rotate-half layout to llama.cpp's interleaved
  pairs (names.hf_to_interleaved). W + s·BA permuted row-wise is P·W + s·(P·B)·A, so only B's rows
  are permuted (with the KV head count for k), A is written as is: what the converter's
  LoraTorchTensor does.
- Scale: llama.cpp always divides α by r. rsLoRA scales by α / √r, so we write α' = scaling · r,
  which gives llama.cpp's α' / r = our scaling exactly for either kind.

What llama.cpp's format cannot carry is an error: DoRA's magnitude vectors, and modules trained in
full (PEFT's modules_to_save, e.g. the embedding of new tokens). Export the merged model for those.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from minillm.config import ModelConfig
from minillm.finetune.adapters import lora_modules
from minillm.finetune.dora import DoRALinear
from minillm.formats.ggml_quants import GGML_F16, GGML_F32
from minillm.formats.gguf_layout import FLOAT32, STRING, UINT32
from minillm.names import hf_to_interleaved, is_rope_rotated, ours_to_gguf
from minillm.ship.gguf_writer import write_tensors

# outtype -> (ggml type, general.file_type)
LORA_OUTTYPES = {"f32": (GGML_F32, 0), "f16": (GGML_F16, 1)}


def _heads(config: ModelConfig, key: str) -> int:
    return config.n_heads if key.endswith("q_proj.weight") else config.n_kv_heads


def lora_gguf_tensors(model: nn.Module) -> tuple[float, list[tuple[str, torch.Tensor]]]:
    """(α for adapter.lora.alpha, [(GGUF tensor name, tensor in PyTorch shape)]) of a model whose
    adapters were loaded with peft_io.load_adapter.
    q/k lora_b rows are permuted for llama.cpp's RoPE."""
    modules = lora_modules(model)
    if not modules:
        raise ValueError("gguf-lora: the model has no LoRA adapters to write")
    scalings = {m.scaling * m.r for m in modules.values()}
    if len(scalings) != 1:
        raise ValueError("gguf-lora: llama.cpp has one α per file, "
                         f"but the adapters' α·(scaling·r) differ: {scalings}")
    tensors = []
    for name, m in modules.items():
        if isinstance(m, DoRALinear):
            raise ValueError(f"gguf-lora: {name} is a DoRA adapter; "
                             "llama.cpp's LoRA GGUF has no magnitude vectors "
                             "(export the merged model instead)")
        key = name + ".weight"
        a = m.lora_A.weight.detach().float().cpu()  # (r, in)
        b = m.lora_B.weight.detach().float().cpu()  # (out, r)
        if is_rope_rotated(key):
            b = hf_to_interleaved(b, _heads(model.config, key))  # rows of ΔW = rows of B
        tensors += [(ours_to_gguf(key) + ".lora_a", a), (ours_to_gguf(key) + ".lora_b", b)]
    return scalings.pop(), tensors


def write_lora_gguf(path: str | os.PathLike, model: nn.Module, outtype: str = "f32",
                    name: str = "minillm-lora"):
    """Write the model's LoRA adapters (all sharing one scaling) as llama.cpp's LoRA GGUF."""
    if outtype not in LORA_OUTTYPES:
        raise ValueError(f"gguf-lora outtype must be one of {sorted(LORA_OUTTYPES)}, "
                         f"found {outtype!r}")
    ggml_type, file_type = LORA_OUTTYPES[outtype]
    alpha, tensors = lora_gguf_tensors(model)
    kvs = [
        ("general.architecture", STRING, "llama"),
        ("general.type", STRING, "adapter"),
        ("general.name", STRING, name),
        ("general.file_type", UINT32, file_type),
        ("adapter.type", STRING, "lora"),
        ("adapter.lora.alpha", FLOAT32, alpha),
    ]
    return write_tensors(path, kvs, [(n, t, ggml_type) for n, t in tensors])
