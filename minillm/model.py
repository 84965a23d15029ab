"""The Llama model, readable top to bottom: RMSNorm → RoPE → attention (MHA/GQA, KV cache) → SwiGLU
MLP → block → Llama.

    idx (B, T) → embed_tokens → N × [x + attn(norm(x)); x + mlp(norm(x))] → norm → lm_head
               → logits (B, T, V)

Papers: LLaMA (Touvron et al. 2023, https://arxiv.org/abs/2302.13971), RMSNorm (Zhang & Sennrich
2019, https://arxiv.org/abs/1910.07467), RoPE (Su et al. 2021, https://arxiv.org/abs/2104.09864),
SwiGLU (Shazeer 2020, https://arxiv.org/abs/2002.05202), GQA (Ainslie et al. 2023,
https://arxiv.org/abs/2305.13245).

Module names follow HF's LlamaForCausalLM (minus its `model.` prefix) so checkpoints and PEFT
adapter keys map one to one (see names.py). This file is the paper: it imports only config.py, and
knows nothing of LoRA, quantization or fast CPU paths, which are module swaps over its nn.Linear
layers (finetune/, generate/), nor of batching plumbing, which the batched decoder passes in as
positions and a mask. One edge is lazy on purpose: `Llama.from_pretrained`, which users expect from
nanoGPT and transformers, calls formats/load.py. Shape letters: B batch, T time, H query heads, Hkv
key/value heads, D head dim, C model width, V vocabulary, S KV-cache slots.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint  # activation checkpointing; torch 2.5 does not import it with torch

from minillm.config import ModelConfig


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) * weight, computed in float32 and cast back (as HF does, so bf16
    models match it bit for bit): no mean subtraction and no bias, unlike LayerNorm."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


# --------------------------------------------------------------------------------------------------
# RoPE: rotate pairs of query/key dimensions by an angle proportional to the position, so that q·k
# depends only on the relative distance between the two positions.


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """Frequency i (0 ≤ i < D/2) of plain RoPE: theta^(-2i/D), (D/2,) float32."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def llama3_rope_divisors(inv_freq: torch.Tensor, scaling: dict[str, float]) -> torch.Tensor:
    """Llama 3's RoPE scaling (transformers' _compute_llama3_parameters) as what each frequency is
    divided by, (D/2,): llama.cpp stores exactly this as the `rope_freqs` tensor.

    With wavelength λ = 2π / inv_freq and the original context L: λ < L / high_freq_factor (fast
    rotations, local detail) keeps its frequency (divisor 1); λ > L / low_freq_factor (slower than
    the trained context) is divided by `factor`; in between, the inverse divisor blends the two
    linearly in s = (L/λ − low) / (high − low): 1/divisor = (1 − s)/factor + s.
    """
    factor, low, high = (scaling[k] for k in ("factor", "low_freq_factor", "high_freq_factor"))
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq  # (D/2,)
    smooth = (old_len / wavelen - low) / (high - low)
    medium = 1.0 / ((1 - smooth) / factor + smooth)
    divisors = torch.where(wavelen > old_len / low, factor, medium)
    return torch.where(wavelen < old_len / high, 1.0, divisors)


def precompute_rope(head_dim: int, seq_len: int, theta: float = 10000.0,
                    scaling: dict[str, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for positions 0 … seq_len-1, each (seq_len, head_dim), in the HF "rotate
    half" layout; `scaling` is Llama 3's (llama3_rope_divisors), None for plain RoPE.

    Frequency i (0 ≤ i < D/2) is theta^(-2i/D); dimension i is paired with dimension i + D/2, so the
    table repeats the D/2 angles twice: [θ_0 … θ_{D/2-1}, θ_0 … θ_{D/2-1}]. (Meta's code pairs
    (2i, 2i+1) instead; the weights of the two conventions differ by a row permutation, see
    names.py.)
    """
    inv_freq = rope_inv_freq(head_dim, theta)  # (D/2,)
    if scaling is not None:
        inv_freq = inv_freq / llama3_rope_divisors(inv_freq, scaling)
    t = torch.arange(seq_len, dtype=torch.int64).float()  # (T,)
    freqs = torch.outer(t, inv_freq)  # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, D)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) → (-x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D); cos, sin (T, D), or (B, 1, T, D) when each row has its own positions. Each
    pair (x_i, x_{i+D/2}) is rotated by its angle:
    x_i' = x_i cos − x_{i+D/2} sin,  x_{i+D/2}' = x_{i+D/2} cos + x_i sin."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


# --------------------------------------------------------------------------------------------------
# Attention


class KVCache(nn.Module):
    """Preallocated key/value buffers (B, Hkv, max_seq_len, D) for incremental decoding (as in
    gpt-fast).

    Each forward writes the new keys/values at their positions and attends over the whole buffer; a
    mask hides the slots not yet written. Fixed shapes are what let `torch.compile` capture the
    decode step.
    """

    def __init__(self, batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int, dtype,
                 device=None):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """input_pos (T,); k, v (B, Hkv, T, D) → the full buffers (B, Hkv, S, D). The buffers take
        the dtype of what is written: a forward may compute in bf16 over weights stored otherwise
        (float32 embeddings beside a bf16 base, FSDP's bf16 copies of float32 shards)."""
        if self.k.dtype != k.dtype:
            self.k, self.v = self.k.to(k.dtype), self.v.to(v.dtype)
        B = k.shape[0]
        self.k[:B, :, input_pos] = k
        self.v[:B, :, input_pos] = v
        return self.k[:B], self.v[:B]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        # Llama has no biases; Qwen2 adds them to q, k and v (attention_bias)
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.attention_out_bias)
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, input_pos=None, mask=None):
        """x (B, T, C); cos/sin (T, D) or (B, 1, T, D) for these positions; mask None (plain causal)
        or a bool (B or 1, 1, T, S) where True means "may attend"."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        # k, v: (B, Hkv, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache is not None and input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, Hkv, S, D), S = cache length
        # GQA: each group of H/Hkv query heads shares one key/value head (Meta's code repeats them:
        # repeat_kv). With enable_gqa, SDPA's flash kernels (CUDA without a mask, and the CPU's)
        # read the shared heads in place; its math backend (e.g. a CUDA call with a mask, which
        # flash does not take) repeats K and V to H heads first, materializing the copies.
        gqa = self.n_kv_heads != self.n_heads
        if mask is None:
            # training / full forward: the causal mask is implied, and SDPA can take its flash path
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               enable_gqa=gqa)  # (B, H, T, D)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                               enable_gqa=gqa)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*D)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) ⊙ up(x)), hidden width cfg.hidden_dim."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, input_pos=None, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, input_pos, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


def cache_mask(input_pos: torch.Tensor, S: int) -> torch.Tensor:
    """The attention mask of queries at cache slots input_pos (T,) over a cache of S slots
    → (1, 1, T, S).

    Slot s is visible to the query at position p iff s <= p: this single rule hides both the future
    and the slots not yet written, so prefill (T > 1) and decode (T = 1) use the same mask, and a
    rejected speculative token's stale slot is hidden until it is written again."""
    slots = torch.arange(S, device=input_pos.device)  # (S,)
    return (input_pos[:, None] >= slots[None, :])[None, None]  # (1, 1, T, S)


# --------------------------------------------------------------------------------------------------
# The model


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # the trainer switches this on to trade compute for memory
        self.activation_checkpointing = False
        self.init_rope()
        if self.embed_tokens.weight.device.type != "meta":
            self.apply(self._init_weights)
            # GPT-2's scaled init: the projections that write into the residual stream get
            # std/sqrt(2L)
            for name, p in self.named_parameters():
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def init_rope(self, device=None, seq_len: int = 0):
        """(Re)build the RoPE tables for positions [0, seq_len); called again after a model built on
        the meta device is loaded. The tables grow to the length actually run (grow_rope, from
        forward and setup_caches), never to config.max_seq_len up front: that is only a limit, and a
        checkpoint's metadata may claim 2^31 positions (a table of 2^31 × head_dim floats: a
        terabyte for head_dim 128)."""
        if device is None:
            device = self.embed_tokens.weight.device
        # on "meta" this records shapes only; inference_mode(False): a table grown while decoding
        # under inference_mode must still be usable by a later training step
        with torch.device(device), torch.inference_mode(False):
            cos, sin = precompute_rope(self.config.head_dim, seq_len, self.config.rope_theta,
                                       self.config.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)  # (seq_len, D) float32
        self.register_buffer("rope_sin", sin, persistent=False)

    def grow_rope(self, seq_len: int):
        """Make the RoPE tables cover positions [0, seq_len) (rebuilt only when they are
        shorter)."""
        if self.rope_cos.shape[0] < seq_len:
            self.init_rope(self.rope_cos.device, seq_len)

    def forward(self, idx, targets=None, *, input_pos=None, mask=None, positions=None,
                loss_fn=None):
        """idx (B, T) token ids → (logits (B, T, V), loss or None).

        targets (B, T): next-token ids, -100 where no loss is wanted; loss = mean cross-entropy over
        the others. With loss_fn as well, the model returns (None, loss_fn(lm_head, h, targets)) on
        the final hidden states h (B, T, C) and never computes the (B, T, V) logits: training passes
        training/loss.py's chunked_cross_entropy, whose memory does not grow with the vocabulary.

        Without input_pos the sequence is run whole: positions 0 … T-1 and causal attention, or
        `mask` (B, 1, T, T), True = "may attend", e.g. block-diagonal for packed examples (it must
        hold the causal rule itself). With input_pos (T,), the slots these tokens take in the KV
        cache (setup_caches first), each query sees the slots up to its own (cache_mask).
        `positions` (B, T) and `mask` (B, 1, T, S) replace both per row: what the batched decoder
        passes for left-padded prompts (generate/batched.py).
        """
        B, T = idx.shape
        if input_pos is None:
            if T > self.config.max_seq_len:
                raise ValueError(f"sequence length {T} exceeds "
                                 f"max_seq_len={self.config.max_seq_len}")
            self.grow_rope(T)
            pos = torch.arange(T, device=idx.device) if positions is None else positions
        else:
            assert self.layers[0].self_attn.kv_cache is not None, "Caches must be initialized first"
            S = self.layers[0].self_attn.kv_cache.k.shape[2]
            self.grow_rope(S)  # a no-op: setup_caches grew the tables to the cache length
            mask = cache_mask(input_pos, S) if mask is None else mask
            pos = input_pos if positions is None else positions
        # (T, D), or (B, T, D) for per-row positions
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]
        if pos.dim() == 2:
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D): broadcast over the heads
        x = self.embed_tokens(idx)  # (B, T, C)
        for layer in self.layers:
            if self.activation_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, input_pos, mask,
                                                      use_reentrant=False)
            else:
                x = layer(x, cos, sin, input_pos, mask)
        h = self.norm(x)  # (B, T, C)
        if targets is not None and loss_fn is not None:
            return None, loss_fn(self.lm_head, h, targets)
        logits = self.lm_head(h)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-100)
        return logits, loss

    # ----------------------------------------------------------------------------------------------
    # decoding support

    def setup_caches(self, batch_size: int, max_seq_len: int | None = None, dtype=None):
        """Allocate a KV cache in every attention layer (call before decoding with input_pos)."""
        max_seq_len = max_seq_len or self.config.max_seq_len
        if max_seq_len > self.config.max_seq_len:
            raise ValueError(f"cache length {max_seq_len} exceeds "
                             f"max_seq_len={self.config.max_seq_len}")
        self.grow_rope(max_seq_len)  # here, not inside a compiled decode step
        p = self.embed_tokens.weight
        dtype = dtype or p.dtype
        for layer in self.layers:
            layer.self_attn.kv_cache = KVCache(batch_size, max_seq_len, self.config.n_kv_heads,
                                               self.config.head_dim, dtype, p.device)

    def clear_caches(self):
        for layer in self.layers:
            layer.self_attn.kv_cache = None

    # ----------------------------------------------------------------------------------------------
    # loading

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu", **kwargs) -> Llama:
        """Load an OpenLLaMA / HF directory, a minillm checkpoint, a Meta consolidated directory or
        a GGUF file: formats/load.py's load_pretrained, the one lazy edge from this file to the
        loaders."""
        from minillm.formats.load import load_pretrained

        return load_pretrained(path, dtype=dtype, device=device, **kwargs)
