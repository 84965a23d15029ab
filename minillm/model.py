"""The Llama model, readable top to bottom: RMSNorm → RoPE → attention (MHA/GQA, KV cache) → SwiGLU MLP →
block → Llama.

    idx (B, T) → embed_tokens → N × [x + attn(norm(x)); x + mlp(norm(x))] → norm → lm_head → logits (B, T, V)

Papers: LLaMA (Touvron et al. 2023, https://arxiv.org/abs/2302.13971), RMSNorm (Zhang & Sennrich 2019,
https://arxiv.org/abs/1910.07467), RoPE (Su et al. 2021, https://arxiv.org/abs/2104.09864), SwiGLU
(Shazeer 2020, https://arxiv.org/abs/2002.05202), GQA (Ainslie et al. 2023, https://arxiv.org/abs/2305.13245).

Module names follow HF's LlamaForCausalLM (minus its `model.` prefix) so checkpoints and PEFT adapter keys
map one to one (see names.py). This file knows nothing of checkpoints, LoRA or quantization: those are
module swaps and loaders that live in their own files. Shape letters: B batch, T time, H query heads,
Hkv key/value heads, D head dim, C model width, V vocabulary.
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


# -----------------------------------------------------------------------------------------------------
# Linear: nn.Linear, plus a CPU fast path for one input row (batch-1 decoding)


@torch.compiler.assume_constant_result  # torch.compile reads it once, at capture: no graph break
def cpu_threads() -> int:
    return torch.get_num_threads()


class Linear(nn.Linear):
    """nn.Linear (same arguments, same state dict), with one CPU fast path for a single input row.

    Decoding one token multiplies one row x (1, K) by every weight W (N, K): a matrix-vector product that
    reads each weight once and does 2 FLOPs per 4-byte read, so its speed is memory bandwidth. MKL runs a
    one-row matmul on one thread, which streams about 9 GB/s on the 2-core CI machine while two cores
    pull 15. So W's rows are cut into `chunks` slices and x is multiplied by all of them as one batched
    matmul, which torch spreads over the threads, one slice each: every output is still x · (a row of W).
    1.4x the decode tokens/s of the 33M and 97M models of bench/cpu.py. Small weights (they sit in cache,
    and the split only adds overhead), several rows, a bias and a single thread keep F.linear.
    """

    MIN_SPLIT = 1 << 18  # weights under 1 MiB (fp32) stay whole
    CHUNKS_PER_THREAD = 2  # 10% more GB/s than 1 per thread on the CI machine; 4 and 8 are no better

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the cheap tests first: this runs for every projection of every step, training included
        if x.numel() != self.in_features or self.weight.numel() < self.MIN_SPLIT or self.bias is not None:
            return F.linear(x, self.weight, self.bias)
        N, K = self.weight.shape
        chunks = self.CHUNKS_PER_THREAD * cpu_threads()
        if chunks < 4 or N % chunks or x.device.type != "cpu":
            return F.linear(x, self.weight)
        w = self.weight.view(chunks, N // chunks, K)  # (c, N/c, K): a view, no copy
        y = torch.bmm(x.reshape(1, 1, K).expand(chunks, 1, K), w.transpose(1, 2))  # (c, 1, N/c)
        return y.view(*x.shape[:-1], N)


# -----------------------------------------------------------------------------------------------------
# RoPE: rotate pairs of query/key dimensions by an angle proportional to the position, so that q·k
# depends only on the relative distance between the two positions.


def precompute_rope(head_dim: int, seq_len: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for positions 0 … seq_len-1, each (seq_len, head_dim), in the HF "rotate half"
    layout.

    Frequency i (0 ≤ i < D/2) is theta^(-2i/D); dimension i is paired with dimension i + D/2, so the table
    repeats the D/2 angles twice: [θ_0 … θ_{D/2-1}, θ_0 … θ_{D/2-1}]. (Meta's code pairs (2i, 2i+1)
    instead; the weights of the two conventions differ by a row permutation, see names.py.)
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))  # (D/2,)
    t = torch.arange(seq_len, dtype=torch.int64).float()  # (T,)
    freqs = torch.outer(t, inv_freq)  # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, D)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) → (-x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D); cos, sin (T, D), or (B, 1, T, D) when each row has its own positions. Each pair
    (x_i, x_{i+D/2}) is rotated by its angle:
    x_i' = x_i cos − x_{i+D/2} sin,  x_{i+D/2}' = x_{i+D/2} cos + x_i sin."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


# -----------------------------------------------------------------------------------------------------
# Attention


class KVCache(nn.Module):
    """Preallocated key/value buffers (B, Hkv, max_seq_len, D) for incremental decoding (as in gpt-fast).

    Each forward writes the new keys/values at their positions and attends over the whole buffer; a mask
    hides the slots not yet written. Fixed shapes are what let `torch.compile` capture the decode step.
    """

    def __init__(self, batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int, dtype, device=None):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """input_pos (T,); k, v (B, Hkv, T, D) → the full buffers (B, Hkv, S, D)."""
        B = k.shape[0]
        self.k[:B, :, input_pos] = k
        self.v[:B, :, input_pos] = v
        return self.k[:B], self.v[:B]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, input_pos=None, mask=None):
        """x (B, T, C); cos/sin (T, D) or (B, 1, T, D) for these positions; mask None (plain causal) or a
        bool (B or 1, 1, T, S) where True means "may attend"."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache is not None and input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, Hkv, S, D), S = cache length
        # GQA: each group of H/Hkv query heads shares one key/value head (Meta's code repeats them: repeat_kv).
        # With enable_gqa, SDPA's flash kernels (CUDA without a mask, and the CPU's) read the shared heads in
        # place; its math backend (e.g. a CUDA call with a mask, which flash does not take) repeats K and V
        # to H heads first, materializing the copies.
        gqa = self.n_kv_heads != self.n_heads
        if mask is None:
            # training / full forward: the causal mask is implied, and SDPA can take its flash path
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)  # (B, H, T, D)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*D)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) ⊙ up(x)), hidden width cfg.hidden_dim."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = Linear(cfg.hidden_dim, cfg.dim, bias=False)

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


# -----------------------------------------------------------------------------------------------------
# The model


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.activation_checkpointing = False  # the trainer switches this on to trade compute for memory
        self.init_rope()
        if self.embed_tokens.weight.device.type != "meta":
            self.apply(self._init_weights)
            # GPT-2's scaled init: the projections that write into the residual stream get std/sqrt(2L)
            for name, p in self.named_parameters():
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def init_rope(self, device=None, seq_len: int = 0):
        """(Re)build the RoPE tables for positions [0, seq_len); called again after a model built on the
        meta device is loaded. The tables grow to the length actually run (grow_rope, from forward and
        setup_caches), never to config.max_seq_len up front: that is only a limit, and a checkpoint's
        metadata may claim 2^31 positions (a table of 2^31 × head_dim floats: a terabyte for head_dim 128)."""
        if device is None:
            device = self.embed_tokens.weight.device
        # on "meta" this records shapes only; inference_mode(False): a table grown while decoding under
        # inference_mode must still be usable by a later training step
        with torch.device(device), torch.inference_mode(False):
            cos, sin = precompute_rope(self.config.head_dim, seq_len, self.config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # (seq_len, D) float32
        self.register_buffer("rope_sin", sin, persistent=False)

    def grow_rope(self, seq_len: int):
        """Make the RoPE tables cover positions [0, seq_len) (rebuilt only when they are shorter)."""
        if self.rope_cos.shape[0] < seq_len:
            self.init_rope(self.rope_cos.device, seq_len)

    def forward(self, idx, targets=None, *, input_pos=None, attn_mask=None, left_pad=None):
        """idx (B, T) token ids → (logits (B, T, V), loss or None).

        targets (B, T): next-token ids, -100 where no loss is wanted; loss = mean cross-entropy over the
        others. input_pos (T,): positions of idx when decoding with a KV cache (see setup_caches).
        attn_mask: optional bool (B, 1, T, T) "may attend" mask, e.g. block-diagonal for packed examples;
        it must include the causal constraint itself. left_pad (B,): with input_pos, how many cache slots
        of each row are padding before its prompt (batched prompts of different lengths, generation.py).
        """
        B, T = idx.shape
        if input_pos is None:
            if T > self.config.max_seq_len:
                raise ValueError(f"sequence length {T} exceeds max_seq_len={self.config.max_seq_len}")
            self.grow_rope(T)
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # (T, D)
            mask = attn_mask
        else:
            # With a cache, queries at positions input_pos attend over the whole buffer (S slots). Slot s
            # is visible to the query at position p iff s <= p: this single rule hides both the future
            # and the slots not yet written, so prefill (T > 1) and decode (T = 1) use the same mask.
            S = self.layers[0].self_attn.kv_cache.k.shape[2]
            self.grow_rope(S)  # positions are < S (setup_caches already grew the tables)
            cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]  # (T, D)
            slots = torch.arange(S, device=idx.device)  # (S,)
            mask = input_pos[:, None] >= slots[None, :]  # (T, S)
            mask = mask[None, None]  # (1, 1, T, S)
            if left_pad is not None:
                # Left padding: row b's prompt starts at slot left_pad[b]. Its RoPE positions count from
                # there and its queries never see the padding slots, so the row computes what it would
                # alone. A padding query sees only itself (an all-masked row would give NaN, which the
                # next layer would write into the cache).
                pos = (input_pos[None, :] - left_pad[:, None]).clamp(min=0)  # (B, T)
                cos, sin = self.rope_cos[pos][:, None], self.rope_sin[pos][:, None]  # (B, 1, T, D)
                first = torch.minimum(left_pad[:, None], input_pos[None, :])  # (B, T) first visible slot
                mask = mask & (slots[None, None, :] >= first[:, :, None])[:, None]  # (B, 1, T, S)
        x = self.embed_tokens(idx)  # (B, T, C)
        for layer in self.layers:
            if self.activation_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, input_pos, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, input_pos, mask)
        logits = self.lm_head(self.norm(x))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    # -------------------------------------------------------------------------------------------------
    # decoding support

    def setup_caches(self, batch_size: int, max_seq_len: int | None = None, dtype=None):
        """Allocate a KV cache in every attention layer (call before decoding with input_pos)."""
        max_seq_len = max_seq_len or self.config.max_seq_len
        if max_seq_len > self.config.max_seq_len:
            raise ValueError(f"cache length {max_seq_len} exceeds max_seq_len={self.config.max_seq_len}")
        self.grow_rope(max_seq_len)  # here, not inside a compiled decode step
        p = self.embed_tokens.weight
        dtype = dtype or p.dtype
        for layer in self.layers:
            layer.self_attn.kv_cache = KVCache(
                batch_size, max_seq_len, self.config.n_kv_heads, self.config.head_dim, dtype, p.device
            )

    def clear_caches(self):
        for layer in self.layers:
            layer.self_attn.kv_cache = None

    # -------------------------------------------------------------------------------------------------
    # loading

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu", **kwargs) -> Llama:
        """Load an OpenLLaMA / HF directory, a minillm checkpoint, a Meta consolidated directory or a
        GGUF file. The format code lives in checkpoint.py (this file stays format-free)."""
        from minillm.formats.load import load_pretrained

        return load_pretrained(path, dtype=dtype, device=device, **kwargs)
