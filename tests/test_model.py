"""model.py against an independent plain forward, KV-cache decoding, loss, accounting."""

import math

import pytest
import torch
import torch.nn.functional as F
from reference_llama import reference_forward
from tiny import random_hf_state

from minillm.config import ModelConfig
from minillm.formats.weights import fill_model
from minillm.model import Llama, apply_rope, precompute_rope
from minillm.names import hf_to_ours
from minillm.training import flops

CONFIGS = {
    "mha": ModelConfig(dim=64, n_layers=2, n_heads=4, hidden_dim=160, vocab_size=97,
                       max_seq_len=64),
    "gqa": ModelConfig(dim=96, n_layers=3, n_heads=6, n_kv_heads=2, hidden_dim=200, vocab_size=131,
                       max_seq_len=64, rope_theta=500000.0),
    "tied": ModelConfig(dim=48, n_layers=1, n_heads=3, hidden_dim=80, vocab_size=61, max_seq_len=32,
                        tie_embeddings=True),
}


def model_from_state(cfg, state):
    with torch.device("meta"):
        m = Llama(cfg)
    items = ((("test"), hf_to_ours(k), v) for k, v in state.items())
    return fill_model(m, items, torch.float32, "cpu").eval()


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("seed", [0, 1])
def test_logits_match_reference(name, seed):
    cfg = CONFIGS[name]
    state = random_hf_state(cfg, seed, inv_freq=False)
    model = model_from_state(cfg, state)
    idx = torch.randint(0, cfg.vocab_size, (2, 23), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        logits, _ = model(idx)
    ref = reference_forward(state, cfg.to_hf_config(), idx)
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=0)


def test_rope_rotates_pairs_half_apart():
    # a vector that is 1 at dimension 0 only, rotated at position 3 by angle 3·θ^0 = 3 rad:
    # dims (0, D/2) become (cos 3, sin 3); all others stay 0
    D = 8
    cos, sin = precompute_rope(D, 4)
    x = torch.zeros(1, 1, 4, D)
    x[..., 0] = 1.0
    y = apply_rope(x, cos, sin)[0, 0, 3]
    expected = torch.zeros(D)
    expected[0], expected[D // 2] = math.cos(3.0), math.sin(3.0)
    torch.testing.assert_close(y, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["mha", "gqa"])
def test_kv_cache_decoding_equals_full_forward(name):
    torch.manual_seed(0)
    cfg = CONFIGS[name]
    model = Llama(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        full, _ = model(idx)
        model.setup_caches(batch_size=2, max_seq_len=32)
        steps = [model(idx[:, :7], input_pos=torch.arange(7))[0]]  # prefill 7 tokens
        for t in range(7, 20):  # then one token at a time
            steps.append(model(idx[:, t:t + 1], input_pos=torch.tensor([t]))[0])
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)



def test_loss_is_mean_ce_ignoring_minus_100():
    torch.manual_seed(0)
    cfg = CONFIGS["mha"]
    model = Llama(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 9))
    targets = torch.randint(0, cfg.vocab_size, (2, 9))
    targets[0, :4] = -100
    logits, loss = model(idx, targets)
    keep = targets != -100
    manual = -F.log_softmax(logits, -1).gather(
        -1, targets.clamp(min=0)[..., None])[..., 0][keep].mean()
    torch.testing.assert_close(loss, manual, atol=1e-6, rtol=0)


def test_attn_mask_block_diagonal_isolates_documents():
    # packing two documents in one row with a block-diagonal causal mask must give each document the
    # logits it has alone (RoPE depends only on relative positions)
    torch.manual_seed(0)
    cfg = CONFIGS["gqa"]
    model = Llama(cfg).eval()
    a = torch.randint(0, cfg.vocab_size, (1, 5))
    b = torch.randint(0, cfg.vocab_size, (1, 7))
    packed = torch.cat([a, b], dim=1)
    doc = torch.tensor([0] * 5 + [1] * 7)
    mask = (doc[:, None] == doc[None, :]) & torch.tril(torch.ones(12, 12, dtype=torch.bool))
    with torch.no_grad():
        out, _ = model(packed, mask=mask[None, None])
        alone_a, _ = model(a)
        alone_b, _ = model(b)
    torch.testing.assert_close(out[:, :5], alone_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, 5:], alone_b, atol=1e-5, rtol=0)


def test_param_count_and_flops():
    cfg = CONFIGS["gqa"]
    model = Llama(cfg)
    C, L, V, F_, Hkv, D = (cfg.dim, cfg.n_layers, cfg.vocab_size, cfg.hidden_dim, cfg.n_kv_heads,
                           cfg.head_dim)
    per_layer = C * C * 2 + 2 * C * Hkv * D + 3 * C * F_ + 2 * C
    expected = V * C + L * per_layer + C + V * C
    assert flops.model_params(model) == (expected, expected)  # (all, trainable)
    assert flops.model_flops_per_token(model, 64) == 6 * (expected - V * C) + 12 * L * C * 64
    tied = Llama(CONFIGS["tied"])
    c = CONFIGS["tied"]
    assert flops.model_params(tied)[0] == c.vocab_size * c.dim + c.n_layers * (
        4 * c.dim * c.dim + 3 * c.dim * c.hidden_dim + 2 * c.dim) + c.dim


def test_openllama_presets():
    for name, (C, F_, L, H) in {"openllama-3b": (3200, 8640, 26, 32),
                                "openllama-7b": (4096, 11008, 32, 32),
                                "openllama-13b": (5120, 13824, 40, 40)}.items():
        cfg = ModelConfig.from_name(name)
        assert ((cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads)
                == (C, F_, L, H, H))
        assert ((cfg.vocab_size, cfg.norm_eps, cfg.max_seq_len, cfg.rope_theta)
                == (32000, 1e-6, 2048, 10000.0))
    assert ModelConfig.from_name("openllama-3b").head_dim == 100
    with torch.device("meta"):
        assert abs(flops.model_params(Llama(ModelConfig.from_name("openllama-7b")))[0]
                   - 6.74e9) < 0.01e9
