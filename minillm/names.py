"""One table for every checkpoint naming scheme minillm reads or writes: HF ⇄ ours ⇄ GGUF ⇄ Meta.

minillm's module names follow HF's `LlamaForCausalLM` without its `model.` prefix, so an HF key maps
to ours by dropping that prefix, and LoRA target names (`q_proj`, …) are the ones PEFT uses.

    ours                                   HF (OpenLLaMA)
    embed_tokens.weight                    model.embed_tokens.weight
    layers.{i}.input_layernorm.weight      model.layers.{i}.input_layernorm.weight
    layers.{i}.self_attn.q_proj.weight     model.layers.{i}.self_attn.q_proj.weight
    ...                                    ...
    norm.weight                            model.norm.weight
    lm_head.weight                         lm_head.weight

    (the `.weight` that ends every name is left out of this table)
    ours                                   GGUF (llama.cpp)       Meta (consolidated.pth)
    embed_tokens                           token_embd             tok_embeddings
    layers.{i}.input_layernorm             blk.{i}.attn_norm      layers.{i}.attention_norm
    layers.{i}.self_attn.q_proj            blk.{i}.attn_q (*)     layers.{i}.attention.wq (*)
    layers.{i}.self_attn.k_proj            blk.{i}.attn_k (*)     layers.{i}.attention.wk (*)
    layers.{i}.self_attn.v_proj            blk.{i}.attn_v         layers.{i}.attention.wv
    layers.{i}.self_attn.o_proj            blk.{i}.attn_output    layers.{i}.attention.wo
    layers.{i}.post_attention_layernorm    blk.{i}.ffn_norm       layers.{i}.ffn_norm
    layers.{i}.mlp.gate_proj               blk.{i}.ffn_gate       layers.{i}.feed_forward.w1
    layers.{i}.mlp.up_proj                 blk.{i}.ffn_up         layers.{i}.feed_forward.w3
    layers.{i}.mlp.down_proj               blk.{i}.ffn_down       layers.{i}.feed_forward.w2
    layers.{i}.self_attn.{q,k,v,o}_proj.bias   blk.{i}.attn_{q,k,v,output}.bias   (Qwen2's biases)
    norm                                   output_norm            norm
    lm_head                                output                 output

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
    # attention biases (Qwen2; an HF Llama with attention_bias): llama.cpp's optional tensors
    "self_attn.q_proj.bias": ("attn_q.bias", "attention.wq.bias"),
    "self_attn.k_proj.bias": ("attn_k.bias", "attention.wk.bias"),
    "self_attn.v_proj.bias": ("attn_v.bias", "attention.wv.bias"),
    "self_attn.o_proj.bias": ("attn_output.bias", "attention.wo.bias"),
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
    """q and k projections (weights and biases) are the tensors whose rows depend on the RoPE
    pairing convention."""
    return key.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                         "self_attn.q_proj.bias", "self_attn.k_proj.bias"))


def hf_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k rows from HF's rotate-half layout to the interleaved (Meta / llama.cpp) layout.

    w: (n_heads * head_dim, dim), or a bias (n_heads * head_dim,). Within a head, HF row
    r < head_dim/2 pairs with r + head_dim/2; the interleaved layout wants those two rows adjacent.
    For k pass the number of KV heads.
    """
    if w.dim() == 1:
        return hf_to_interleaved(w[:, None], n_heads)[:, 0]
    rows, dim = w.shape
    head_dim = rows // n_heads
    # (H, 2, D/2, dim) → swap the "which half" axis with the pair index → (H, D/2, 2, dim)
    return w.reshape(n_heads, 2, head_dim // 2, dim).transpose(1, 2).reshape(rows, dim)


def interleaved_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `hf_to_interleaved`."""
    if w.dim() == 1:
        return interleaved_to_hf(w[:, None], n_heads)[:, 0]
    rows, dim = w.shape
    head_dim = rows // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(rows, dim)
