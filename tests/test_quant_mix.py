"""llama-quantize's per-tensor type rules (minillm/ship/quant_mix.py) and the GGUF
export that follows them.

The expected types are spelled out from `llama_tensor_get_type` in llama.cpp's src/llama-quant.cpp;
the fixture tests/data/llama_cpp_mix_types.json holds the types llama.cpp itself chose for a tiny
model (bench/peer_quant_check.py, through llama-cpp-python's `llama_model_quantize`)."""

import json
from pathlib import Path

import pytest
import torch
from tiny import tiny_tokenizer, write_hf_checkpoint

from minillm.config import ModelConfig
from minillm.formats.ggml_quants import (
    GGML_F16,
    GGML_F32,
    GGML_Q4_K,
    GGML_Q5_0,
    GGML_Q5_1,
    GGML_Q5_K,
    GGML_Q6_K,
    GGML_Q8_0,
    type_name,
)
from minillm.formats.gguf_layout import expected_shapes
from minillm.formats.gguf_reader import read_gguf
from minillm.model import Llama
from minillm.ship import quant_mix
from minillm.ship.convert import ExportConfig, export
from minillm.ship.gguf_writer import plan_tensors

FIXTURE = Path(__file__).parent / "data" / "llama_cpp_mix_types.json"


def test_use_more_bits_layers():
    assert [i for i in range(32) if quant_mix.use_more_bits(i, 32)] == [
        0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert [i for i in range(26) if quant_mix.use_more_bits(i, 26)] == [
        0, 1, 2, 5, 8, 11, 14, 17, 20, 22, 23, 24, 25]  # n/8 = 3, 7n/8 = 22 (integer division)


def types_of(cfg: ModelConfig, mix: str) -> dict[str, str]:
    return {p.name: type_name(p.ggml_type) for p in plan_tensors(cfg, mix)}


def test_q4_k_m_openllama_7b():
    t = types_of(ModelConfig.from_name("openllama-7b"), "q4_k_m")
    more = {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31}
    assert t["output.weight"] == "Q6_K" and t["token_embd.weight"] == "Q4_K"
    assert t["output_norm.weight"] == t["blk.0.attn_norm.weight"] == "F32"
    for i in range(32):
        six_or_four = "Q6_K" if i in more else "Q4_K"
        assert t[f"blk.{i}.attn_v.weight"] == six_or_four
        assert t[f"blk.{i}.ffn_down.weight"] == six_or_four  # rows of 11008 = 43·256
        for other in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
            assert t[f"blk.{i}.{other}.weight"] == "Q4_K"


def test_fallbacks_openllama_3b():
    """Rows of 3200 and 8640 are not multiples of 256: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0."""
    cfg = ModelConfig.from_name("openllama-3b")
    t = types_of(cfg, "q4_k_m")
    assert t["output.weight"] == "Q8_0" and t["token_embd.weight"] == "Q5_0"
    # Q6_K layer, fallen back
    assert t["blk.0.attn_v.weight"] == t["blk.0.ffn_down.weight"] == "Q8_0"
    assert t["blk.3.attn_v.weight"] == t["blk.3.ffn_down.weight"] == "Q5_0"
    assert t["blk.5.attn_v.weight"] == "Q8_0"  # (5 - 26/8) % 3 == 2
    t = types_of(cfg, "q5_k_s")
    assert {t[f"blk.{i}.attn_q.weight"] for i in range(26)} == {"Q5_1"}
    # 48 % 32 != 0
    assert quant_mix.tensor_type("blk.0.attn_q.weight", (8, 48), "q4_k_m", 1, 1, 1) == GGML_F16
    assert quant_mix.tensor_type("blk.0.attn_q.weight", (8, 48), "q5_0", 1, 1, 1) == GGML_F16


def test_other_mixes_and_aliases():
    s = quant_mix.tensor_type
    args = (32, 32, 32)
    assert s("blk.3.attn_v.weight", (4096, 4096), "q4_k_s", *args) == GGML_Q5_K
    assert s("blk.4.attn_v.weight", (4096, 4096), "q4_k_s", *args) == GGML_Q4_K
    assert s("blk.3.ffn_down.weight", (4096, 11008), "q4_k_s", *args) == GGML_Q5_K
    assert s("blk.6.ffn_down.weight", (4096, 11008), "q5_k_m", *args) == GGML_Q6_K
    assert s("blk.7.ffn_down.weight", (4096, 11008), "q5_k", *args) == GGML_Q5_K  # alias of q5_k_m
    assert s("blk.7.ffn_down.weight", (4096, 11008), "q6_k", *args) == GGML_Q6_K
    assert s("output.weight", (32000, 4096), "q5_1", *args) == GGML_Q6_K
    assert s("output.weight", (32000, 4000), "q5_1", *args) == GGML_Q8_0
    assert s("blk.7.ffn_down.weight", (4096, 11008), "q5_1", *args) == GGML_Q5_1
    assert s("token_embd.weight", (32000, 4096), "q5_0", *args, tied=True) == GGML_Q6_K
    assert s("blk.11.attn_v.weight", (1024, 8192), "q4_k_m", 80, 64, 8) == GGML_Q5_K  # 70B rule
    assert s("blk.11.attn_v.weight", (1024, 8192), "q4_k_m", 80, 64, 64) == GGML_Q4_K  # 65B: no GQA
    assert s("blk.1.attn_norm.weight", (4096,), "q4_k_m", *args) == GGML_F32
    assert quant_mix.file_type("q4_k").ftype == 15 and quant_mix.file_type("q6_k").ftype == 18
    with pytest.raises(ValueError, match="unknown llama-quantize file type 'q3_k_m'"):
        quant_mix.file_type("q3_k_m")


@pytest.mark.parametrize("mix", ["q4_k_m", "q5_k_m", "q6_k", "q4_k_s", "q5_k_s", "q4_1", "q5_0",
                                 "q5_1"])
def test_types_match_llama_cpp(mix):
    """The types llama.cpp's llama_model_quantize chose for the peer-check model (8 layers; rows of
    256, 320 and 512 values), tensor for tensor."""
    fixture = json.loads(FIXTURE.read_text())
    cfg = ModelConfig(**fixture["config"])
    assert types_of(cfg, mix) == fixture["types"][mix]
    assert quant_mix.file_type(mix).ftype == fixture["file_type"][mix]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    tok = tiny_tokenizer(d / "tokenizer.model")
    # 2 layers: use_more_bits(1, 2) holds and use_more_bits(0, 2) does not;
    # ffn_down rows of 96 fall back
    cfg = ModelConfig(dim=256, n_layers=2, n_heads=2, n_kv_heads=1, hidden_dim=96,
                      vocab_size=tok.vocab_size, max_seq_len=64)
    write_hf_checkpoint(d, cfg, seed=3, fmt="safetensors", tokenizer=tok)
    return d


def test_export_q4_k_m_reads_back(base, tmp_path, capsys):
    out = export(ExportConfig(checkpoint=str(base), out=str(tmp_path / "m.gguf"), outtype="q4_k_m"))
    printed = capsys.readouterr().err  # the per-tensor table is a report, on stderr
    g = read_gguf(out)
    assert g.metadata["general.file_type"] == 15
    types = {name: t.ggml_type for name, t in g.tensors.items()}
    assert types["output.weight"] == GGML_Q6_K and types["token_embd.weight"] == GGML_Q4_K
    assert types["blk.1.ffn_down.weight"] == GGML_Q8_0  # rows of 96: Q6_K falls back to Q8_0
    assert types["blk.0.ffn_down.weight"] == GGML_Q5_0  # Q4_K falls back to Q5_0
    assert types["blk.1.attn_v.weight"] == GGML_Q6_K and types["blk.0.attn_v.weight"] == GGML_Q4_K
    # the per-tensor summary: one line per tensor with its type and bits per weight
    assert "blk.1.attn_v.weight              Q6_K    6.56" in printed
    assert "output_norm.weight               F32    32.00  0.000e+00" in printed
    # minillm runs llama.cpp-typed files: logits close to the f32 model's
    base_model = Llama.from_pretrained(base)
    model = Llama.from_pretrained(out)
    ids = torch.arange(1, 17)[None]
    with torch.no_grad():
        ref, got = base_model(ids)[0], model(ids)[0]
    rel_rms = ((got - ref).pow(2).mean() / ref.pow(2).mean()).sqrt().item()
    assert 0 < rel_rms < 0.1, rel_rms  # 4-6 bit weights: a few percent
    assert set(expected_shapes(model.config)) == set(dict(model.state_dict()))
