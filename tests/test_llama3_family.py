"""The Llama 3 family: Llama 3's RoPE scaling, an explicit head_dim and attention biases (Qwen2),
against transformers' own logits on tiny checkpoints it wrote (bench/make_llama3_fixtures.py; the
versions are in tests/data/llama3_family/goldens.json), and round trips through GGUF and HF.

The original context of the scaled checkpoints is 16 positions and the forward runs 96, so the
scaled and the blended frequencies decide the logits at the later positions.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minillm.config import ModelConfig
from minillm.formats.gguf_reader import llama3_scaling_from_divisors, read_gguf
from minillm.formats.load import load_pretrained
from minillm.model import llama3_rope_divisors, rope_inv_freq

DATA = Path(__file__).parent / "data" / "llama3_family"
NAMES = ("llama3", "llama3_tied", "qwen2")
POSITIONS = [0, 7, 15, 16, 40, 95]


def logits_at(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids[None])[0][0, POSITIONS]  # (len(POSITIONS), V)


@pytest.mark.parametrize("name", NAMES)
def test_matches_transformers_logits(name):
    golden = load_file(DATA / name / "golden.safetensors")
    model = load_pretrained(DATA / name)
    torch.testing.assert_close(logits_at(model, golden["ids"]), golden["logits"],
                               atol=1e-5, rtol=1e-5)


def test_the_checkpoints_use_what_they_test():
    llama3, tied, qwen2 = (load_pretrained(DATA / n).config for n in NAMES)
    assert (llama3.head_dim, llama3.dim // llama3.n_heads) == (24, 16)
    assert (llama3.attention_bias, llama3.attention_out_bias) == (True, True)
    assert (qwen2.attention_bias, qwen2.attention_out_bias, qwen2.rope_scaling) == (True, False,
                                                                                   None)
    assert tied.tie_embeddings and tied.rope_scaling == llama3.rope_scaling == {
        "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16.0}
    # plain RoPE would give other logits at the late positions, not at position 0
    golden = load_file(DATA / "llama3" / "golden.safetensors")
    plain = load_pretrained(DATA / "llama3")
    plain.config.rope_scaling = None
    plain.init_rope(seq_len=96)
    diff = (logits_at(plain, golden["ids"]) - golden["logits"]).abs().amax(-1)
    assert diff[0] < 1e-5 and diff[-1] > 1e-2


def test_llama3_divisors_match_the_reference_formula():
    # transformers' _compute_llama3_parameters, transcribed for Llama 3.1 (theta 5e5, head 128)
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192.0}
    inv = rope_inv_freq(128, 500000.0)
    want = []
    for f in inv.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < 8192 / 4:
            want.append(f)
        elif wavelen > 8192 / 1:
            want.append(f / 8)
        else:
            s = (8192 / wavelen - 1) / (4 - 1)
            want.append((1 - s) * f / 8 + s * f)
    got = inv / llama3_rope_divisors(inv, scaling)
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-6, atol=0)
    # llama.cpp's rope_freqs back to the four numbers: exact for Llama 3.1's
    cfg = ModelConfig(dim=4096, n_heads=32, n_kv_heads=8, rope_theta=500000.0)
    assert llama3_scaling_from_divisors(llama3_rope_divisors(inv, scaling), cfg, "x") == scaling


def test_rope_freqs_that_are_not_llama3_are_refused():
    cfg = ModelConfig(dim=64, n_heads=4, rope_theta=10000.0)
    with pytest.raises(ValueError, match=r"^x: rope_freqs.weight holds divisors .* that are not "
                                         r"Llama 3's RoPE scaling"):
        llama3_scaling_from_divisors(torch.linspace(3.0, 1.0, 8), cfg, "x")


@pytest.mark.parametrize("name", NAMES)
def test_gguf_round_trip(name, tmp_path):
    from tiny import tiny_tokenizer

    from minillm.ship.gguf_writer import write_gguf

    golden = load_file(DATA / name / "golden.safetensors")
    model = load_pretrained(DATA / name)
    tok = tiny_tokenizer(tmp_path / "tokenizer.model", vocab_size=384)
    cfg = model.config
    # the vocabulary must match the embedding: pad the model out to the tokenizer's 384 rows
    big = ModelConfig(**(cfg.to_dict() | {"vocab_size": tok.vocab_size}))
    state = dict(model.state_dict())
    pad = torch.zeros(tok.vocab_size - cfg.vocab_size, cfg.dim)
    for key in ("embed_tokens.weight", "lm_head.weight"):
        state[key] = torch.cat([state[key], pad])
    if cfg.tie_embeddings:
        del state["lm_head.weight"]
    write_gguf(tmp_path / "m.gguf", big, iter(state.items()), tok, "f32", progress=False)
    g = read_gguf(tmp_path / "m.gguf")
    assert ("rope_freqs.weight" in g.tensors) == (cfg.rope_scaling is not None)
    assert ("blk.0.attn_q.bias" in g.tensors) == cfg.attention_bias
    assert ("blk.0.attn_output.bias" in g.tensors) == cfg.attention_out_bias
    explicit = cfg.head_dim != cfg.dim // cfg.n_heads
    assert ("llama.attention.key_length" in g.metadata) == explicit
    again = load_pretrained(tmp_path / "m.gguf")
    # the scaling comes back as the same divisors; as the same four numbers where the divisors
    # determine them (two or more blended frequencies: not llama3_tied's head of 16)
    inv = rope_inv_freq(cfg.head_dim, cfg.rope_theta)
    if cfg.rope_scaling is not None:
        torch.testing.assert_close(llama3_rope_divisors(inv, again.config.rope_scaling),
                                   llama3_rope_divisors(inv, cfg.rope_scaling))
    exact = name != "llama3_tied"
    assert again.config == (big if exact else dataclasses.replace(
        big, rope_scaling=again.config.rope_scaling))
    torch.testing.assert_close(logits_at(again, golden["ids"])[:, : cfg.vocab_size],
                               golden["logits"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_hf_round_trip(name, tmp_path):
    from minillm.formats.hf import save_hf

    golden = load_file(DATA / name / "golden.safetensors")
    save_hf(load_pretrained(DATA / name), tmp_path / "hf")
    again = load_pretrained(tmp_path / "hf")
    assert again.config == load_pretrained(DATA / name).config
    torch.testing.assert_close(logits_at(again, golden["ids"]), golden["logits"],
                               atol=1e-5, rtol=1e-5)


def test_quantized_bases_keep_qwen2_biases():
    # QLoRA / LLM.int8 load hooks swap each projection as its weight streams in; the q/k/v biases
    # (stored before the weights in the file) must land on the swapped layers
    from minillm.finetune.int8_linear import int8_hook
    from minillm.finetune.nf4_linear import nf4_hook

    golden = load_file(DATA / "qwen2" / "golden.safetensors")
    stored = load_file(DATA / "qwen2" / "model.safetensors")
    for hook in (nf4_hook(compute_dtype=torch.float32), int8_hook(0.0, torch.float32)):
        model = load_pretrained(DATA / "qwen2", linear_hook=hook)
        attn = model.layers[1].self_attn
        assert torch.equal(attn.k_proj.bias, stored["model.layers.1.self_attn.k_proj.bias"])
        err = (logits_at(model, golden["ids"]) - golden["logits"]).abs().max()
        for layer in model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.zero_()
        unbiased = (logits_at(model, golden["ids"]) - golden["logits"]).abs().max()
        assert err < unbiased / 3  # the rounding of 4 / 8 bits remains; the biases are used


def test_a_qwen2_gguf_loads(tmp_path):
    # llama.cpp's qwen2 architecture: the llama keys under "qwen2.", q/k rows not permuted (its
    # RoPE rotates halves, as HF does), biases as attn_{q,k,v}.bias; written here tensor by tensor
    from tiny import tiny_tokenizer

    from minillm.formats.ggml_quants import GGML_F32
    from minillm.formats.gguf_layout import STRING, expected_shapes
    from minillm.names import ours_to_gguf
    from minillm.ship.gguf_writer import llama_metadata, tokenizer_metadata, write_tensors

    golden = load_file(DATA / "qwen2" / "golden.safetensors")
    model = load_pretrained(DATA / "qwen2")
    tok = tiny_tokenizer(tmp_path / "tokenizer.model", vocab_size=384)
    cfg = ModelConfig(**(model.config.to_dict() | {"vocab_size": tok.vocab_size}))
    state = dict(model.state_dict())
    pad = torch.zeros(tok.vocab_size - model.config.vocab_size, cfg.dim)
    state["embed_tokens.weight"] = torch.cat([state["embed_tokens.weight"], pad])
    kvs = [(k.replace("llama.", "qwen2.", 1), *rest) if k != "general.architecture"
           else (k, STRING, "qwen2") for k, *rest in llama_metadata(cfg, "f32", "q")]
    tensors = [(ours_to_gguf(k), state[k], GGML_F32) for k in expected_shapes(cfg)]
    write_tensors(tmp_path / "qwen2.gguf", kvs + tokenizer_metadata(tok), tensors)
    again = load_pretrained(tmp_path / "qwen2.gguf")
    assert again.config == cfg
    torch.testing.assert_close(logits_at(again, golden["ids"])[:, :96], golden["logits"],
                               atol=1e-5, rtol=1e-5)
