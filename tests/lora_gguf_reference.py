"""The test oracle for ship/gguf_lora.py: read a LoRA GGUF back and merge it into a state
dict the way llama.cpp applies it (W + (α / r) · B A), so the tests can check what
llama.cpp would compute."""

from __future__ import annotations

import os

import torch

from minillm.config import ModelConfig
from minillm.formats.gguf_reader import read_gguf
from minillm.names import gguf_to_ours, interleaved_to_hf, is_rope_rotated


def _heads(config: ModelConfig, key: str) -> int:
    return config.n_heads if key.endswith("q_proj.weight") else config.n_kv_heads


def read_lora_gguf(path: str | os.PathLike,
                   config: ModelConfig) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{our weight key: (A (r, in), B (out, r) in HF row order, scaling α / r)} from a LoRA GGUF.

    Raises ValueError naming the file for a GGUF that is not a llama LoRA adapter, a lora_a without
    its lora_b (or the reverse), or a tensor of no Llama weight."""
    g = read_gguf(path)
    for key, want in (("general.type", "adapter"), ("adapter.type", "lora"),
                      ("general.architecture", "llama")):
        if g.metadata.get(key) != want:
            raise ValueError(f"{g.path}: {key} is {g.metadata.get(key)!r}, expected {want!r} for a "
                             "LoRA adapter")
    alpha = float(g.metadata.get("adapter.lora.alpha", 0.0))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for tname in g.tensors:
        base, _, part = tname.rpartition(".")
        if part not in ("lora_a", "lora_b"):
            raise ValueError(f"{g.path}: tensor {tname!r} is neither a .lora_a nor a .lora_b")
        pairs.setdefault(base, {})[part] = g.tensor(tname)
    out = {}
    for base, ab in pairs.items():
        if set(ab) != {"lora_a", "lora_b"}:
            raise ValueError(f"{g.path}: {base} has only {sorted(ab)}; llama.cpp needs both lora_a "
                             "and lora_b")
        try:
            key = gguf_to_ours(base)
        except KeyError:
            raise ValueError(f"{g.path}: {base!r} is not a Llama weight") from None
        a, b = ab["lora_a"], ab["lora_b"]
        if is_rope_rotated(key):
            b = interleaved_to_hf(b, _heads(config, key))
        r = b.shape[1]
        out[key] = (a, b, alpha / r if alpha else 1.0)  # llama.cpp: no α means scale 1
    return out


def merge_lora_gguf(state: dict[str, torch.Tensor],
                    lora: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """W + s · B A for every adapted weight (float32, as
    LoRALinear.delta_weight), others unchanged."""
    merged = dict(state)
    for key, (a, b, scaling) in lora.items():
        merged[key] = state[key].float() + (b.float() @ a.float()) * scaling
    return merged
