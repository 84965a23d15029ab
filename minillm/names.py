"""One table for every checkpoint naming scheme minillm reads or writes: HF ⇄ ours ⇄ GGUF ⇄ Meta.

minillm's module names follow HF's `LlamaForCausalLM` without its `model.` prefix, so an HF key maps to
ours by dropping that prefix, and LoRA target names (`q_proj`, …) are the ones PEFT uses.

    ours                                   HF (OpenLLaMA)                          GGUF (llama.cpp)             Meta (consolidated.pth)
    embed_tokens.weight                    model.embed_tokens.weight               token_embd.weight            tok_embeddings.weight
    layers.{i}.input_layernorm.weight      model.layers.{i}.input_layernorm.weight blk.{i}.attn_norm.weight      layers.{i}.attention_norm.weight
    layers.{i}.self_attn.q_proj.weight     model.layers.{i}.self_attn.q_proj...    blk.{i}.attn_q.weight  (*)   layers.{i}.attention.wq.weight (*)
    layers.{i}.self_attn.k_proj.weight     ...                                     blk.{i}.attn_k.weight  (*)   layers.{i}.attention.wk.weight (*)
    layers.{i}.self_attn.v_proj.weight                                             blk.{i}.attn_v.weight        layers.{i}.attention.wv.weight
    layers.{i}.self_attn.o_proj.weight                                             blk.{i}.attn_output.weight   layers.{i}.attention.wo.weight
    layers.{i}.post_attention_layernorm.weight                                     blk.{i}.ffn_norm.weight      layers.{i}.ffn_norm.weight
    layers.{i}.mlp.gate_proj.weight                                                blk.{i}.ffn_gate.weight      layers.{i}.feed_forward.w1.weight
    layers.{i}.mlp.up_proj.weight                                                  blk.{i}.ffn_up.weight        layers.{i}.feed_forward.w3.weight
    layers.{i}.mlp.down_proj.weight                                                blk.{i}.ffn_down.weight      layers.{i}.feed_forward.w2.weight
    norm.weight                            model.norm.weight                       output_norm.weight           norm.weight
    lm_head.weight                         lm_head.weight                          output.weight                output.weight

(*) HF stores q/k rows for the "rotate half" RoPE, pairing dimension i with i + head_dim/2; Meta and
llama.cpp rotate interleaved pairs (2i, 2i+1). Crossing between them permutes q/k rows
(`hf_to_interleaved` / `interleaved_to_hf` below); forgetting it gives fluent-looking garbage.
"""

from __future__ import annotations

import re

import torch

# per-layer names: ours → (gguf, meta); layer-independent names listed separately
_LAYER = {
    "input_layernorm.weight": ("attn_norm.weight", "attention_norm.weight"),
    "self_attn.q_proj.weight": ("attn_q.weight", "attention.wq.weight"),
    "self_attn.k_proj.weight": ("attn_k.weight", "attention.wk.weight"),
    "self_attn.v_proj.weight": ("attn_v.weight", "attention.wv.weight"),
    "self_attn.o_proj.weight": ("attn_output.weight", "attention.wo.weight"),
    "post_attention_layernorm.weight": ("ffn_norm.weight", "ffn_norm.weight"),
    "mlp.gate_proj.weight": ("ffn_gate.weight", "feed_forward.w1.weight"),
    "mlp.up_proj.weight": ("ffn_up.weight", "feed_forward.w3.weight"),
    "mlp.down_proj.weight": ("ffn_down.weight", "feed_forward.w2.weight"),
}
_GLOBAL = {
    "embed_tokens.weight": ("token_embd.weight", "tok_embeddings.weight"),
    "norm.weight": ("output_norm.weight", "norm.weight"),
    "lm_head.weight": ("output.weight", "output.weight"),
}
_OURS_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


def hf_to_ours(hf_key: str) -> str:
    return hf_key.removeprefix("model.")


def ours_to_hf(key: str) -> str:
    return key if key == "lm_head.weight" else "model." + key


def _convert(key: str, column: int, prefix: str) -> str:
    if key in _GLOBAL:
        return _GLOBAL[key][column]
    m = _OURS_LAYER.match(key)
    if m is None or m.group(2) not in _LAYER:
        raise KeyError(f"no {('GGUF', 'Meta')[column]} name for minillm key {key!r}")
    return f"{prefix}{m.group(1)}.{_LAYER[m.group(2)][column]}"


def _invert(name: str, column: int, prefix: str) -> str:
    for ours, names in _GLOBAL.items():
        if names[column] == name:
            return ours
    m = re.match(rf"^{re.escape(prefix)}(\d+)\.(.+)$", name)
    if m is not None:
        for ours, names in _LAYER.items():
            if names[column] == m.group(2):
                return f"layers.{m.group(1)}.{ours}"
    raise KeyError(f"unknown {('GGUF', 'Meta')[column]} tensor name {name!r}")


def ours_to_gguf(key: str) -> str:
    return _convert(key, 0, "blk.")


def gguf_to_ours(name: str) -> str:
    return _invert(name, 0, "blk.")


def ours_to_meta(key: str) -> str:
    return _convert(key, 1, "layers.")


def meta_to_ours(name: str) -> str:
    return _invert(name, 1, "layers.")


def is_rope_rotated(key: str) -> bool:
    """q and k projections are the weights whose rows depend on the RoPE pairing convention."""
    return key.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight"))


def hf_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k rows from HF's rotate-half layout to the interleaved (Meta / llama.cpp) layout.

    w: (n_heads * head_dim, dim). Within a head, HF row r < head_dim/2 pairs with r + head_dim/2; the
    interleaved layout wants those two rows adjacent. For k pass the number of KV heads.
    """
    rows, dim = w.shape
    head_dim = rows // n_heads
    # (H, 2, D/2, dim) → swap the "which half" axis with the pair index → (H, D/2, 2, dim)
    return w.reshape(n_heads, 2, head_dim // 2, dim).transpose(1, 2).reshape(rows, dim)


def interleaved_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `hf_to_interleaved`."""
    rows, dim = w.shape
    head_dim = rows // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(rows, dim)
