"""An independent, plain forward pass of an HF-layout Llama, written from the equations
in the test suite's own words: loops over heads, explicit softmax, no KV cache, no SDPA.
Used to check model.py."""

import math

import torch


def reference_forward(state: dict[str, torch.Tensor], hf_cfg: dict,
                      idx: torch.Tensor) -> torch.Tensor:
    """state: HF key names, float32. idx (B, T) → logits (B, T, V)."""
    C = hf_cfg["hidden_size"]
    H = hf_cfg["num_attention_heads"]
    Hkv = hf_cfg.get("num_key_value_heads", H)
    D = C // H
    eps = hf_cfg["rms_norm_eps"]
    theta = hf_cfg.get("rope_theta", 10000.0)
    B, T = idx.shape

    def rmsnorm(x, w):
        return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))

    # rotate-half RoPE: dimension i pairs with i + D/2, angle pos * theta^(-2i/D)
    pos = torch.arange(T, dtype=torch.float64)[:, None]
    # (T, D/2)
    ang = pos * theta ** (-torch.arange(0, D // 2, dtype=torch.float64) * 2 / D)[None, :]
    cos, sin = torch.cos(ang).float(), torch.sin(ang).float()

    def rope(x):  # x (T, D)
        a, b = x[:, : D // 2], x[:, D // 2:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)

    x = state["model.embed_tokens.weight"][idx]  # (B, T, C)
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for i in range(hf_cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rmsnorm(x, state[p + "input_layernorm.weight"])
        q = h @ state[p + "self_attn.q_proj.weight"].T
        k = h @ state[p + "self_attn.k_proj.weight"].T
        v = h @ state[p + "self_attn.v_proj.weight"].T
        out = torch.zeros(B, T, H * D)
        for b in range(B):
            for head in range(H):
                kvh = head // (H // Hkv)
                qh = rope(q[b, :, head * D:(head + 1) * D])
                kh = rope(k[b, :, kvh * D:(kvh + 1) * D])
                vh = v[b, :, kvh * D:(kvh + 1) * D]
                scores = (qh @ kh.T) / math.sqrt(D)
                scores = scores.masked_fill(~causal, float("-inf"))
                out[b, :, head * D:(head + 1) * D] = torch.softmax(scores, dim=-1) @ vh
        x = x + out @ state[p + "self_attn.o_proj.weight"].T
        h = rmsnorm(x, state[p + "post_attention_layernorm.weight"])
        gate = h @ state[p + "mlp.gate_proj.weight"].T
        up = h @ state[p + "mlp.up_proj.weight"].T
        x = x + ((gate * torch.sigmoid(gate)) * up) @ state[p + "mlp.down_proj.weight"].T
    x = rmsnorm(x, state["model.norm.weight"])
    head = state.get("lm_head.weight", state["model.embed_tokens.weight"])
    return x @ head.T
