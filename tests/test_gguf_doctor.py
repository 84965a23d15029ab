"""The GGUF doctor on good files (verdict OK) and on files broken on purpose: each
verdict names the fault."""

import dataclasses

import pytest
import torch
from tiny import stdlib_texts, tiny_tokenizer, write_hf_checkpoint

from minillm.config import ModelConfig
from minillm.formats.load import load_pretrained
from minillm.names import hf_to_interleaved, interleaved_to_hf
from minillm.ship.doctor import check_gguf, qk_layout
from minillm.ship.doctor import main as doctor_main
from minillm.ship.gguf_writer import write_gguf
from minillm.tokenizer.sentencepiece import train_tokenizer
from minillm.util.cli import run_cli


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    tok = tiny_tokenizer(d / "tokenizer.model")
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128,
                      vocab_size=tok.vocab_size, max_seq_len=64, norm_eps=1e-6)
    write_hf_checkpoint(d, cfg, seed=7, fmt="safetensors", tokenizer=tok)
    model = load_pretrained(d)
    return d, tok, model.config, {k: v.detach() for k, v in model.state_dict().items()}


def write(path, hf, state=None, config=None, tok=None, outtype="f32"):
    d, hf_tok, cfg, sd = hf
    write_gguf(path, config or cfg, (state or sd).items(), tok or hf_tok, outtype, progress=False)
    return path


def verdict(path, hf) -> str:
    lines = []
    check_gguf(path, hf[0], out=lines.append)
    assert lines[-1].startswith("VERDICT: ")
    return lines[-1]


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0", "q4_0"])
def test_faithful_files_pass(hf, tmp_path, outtype):
    v = verdict(write(tmp_path / f"m-{outtype}.gguf", hf, outtype=outtype), hf)
    assert v.startswith("VERDICT: OK"), v


def qk_rewritten(hf, fn):
    _, _, cfg, sd = hf
    out = dict(sd)
    for k in sd:
        if k.endswith("q_proj.weight"):
            out[k] = fn(sd[k], cfg.n_heads, cfg.n_heads)
        elif k.endswith("k_proj.weight"):
            out[k] = fn(sd[k], cfg.n_kv_heads, cfg.n_heads)
    return out


# the writer permutes once more, so feeding it these gives files permuted 0 times,
# 2 times, or k with 4 heads
BROKEN_QK = {
    "unpermuted": (lambda w, h, hq: interleaved_to_hf(w, h), "unpermuted (HF's rotate-half rows)"),
    "twice": (lambda w, h, hq: hf_to_interleaved(w, h), "permuted twice"),
    "gqa": (lambda w, h, hq: interleaved_to_hf(hf_to_interleaved(w, hq), h) if h != hq else w,
            "permuted with the query head count 4 instead of 2"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_QK))
def test_qk_layout_faults_are_named(hf, tmp_path, case):
    fn, name = BROKEN_QK[case]
    v = verdict(write(tmp_path / "qk.gguf", hf, state=qk_rewritten(hf, fn)), hf)
    assert v.startswith("VERDICT: FAULT: q/k layout") and name in v, v
    if case == "gqa":
        assert "2 of the attn_q/attn_k" in v  # only the two attn_k; attn_q is right


def test_wrong_tokenizer(hf, tmp_path):
    other = train_tokenizer(stdlib_texts(("textwrap.py", "string.py", "json/encoder.py"))
                            + ["other text"], tmp_path / "other.model", hf[1].vocab_size)
    v = verdict(write(tmp_path / "tok.gguf", hf, tok=other), hf)
    assert v.startswith("VERDICT: FAULT: tokenizer:") and "pieces differ from HF's" in v, v


def test_wrong_eps_and_rope_theta(hf, tmp_path):
    v = verdict(write(tmp_path / "eps.gguf", hf,
                      config=dataclasses.replace(hf[2], norm_eps=1e-5)), hf)
    assert v.startswith("VERDICT: FAULT: metadata: llama.attention.layer_norm_rms_epsilon "
                        "is 9.99"), v
    assert "HF's config gives 1e-06" in v
    v = verdict(write(tmp_path / "theta.gguf", hf,
                      config=dataclasses.replace(hf[2], rope_theta=500000.0)), hf)
    assert v.startswith("VERDICT: FAULT: metadata: llama.rope.freq_base is 500000"), v
    # the CLI (run.py doctor) exits 1 on a fault
    assert run_cli(doctor_main, [str(tmp_path / "theta.gguf"), "--against", str(hf[0])]) == 1


def test_swapped_tensor_is_named_with_what_it_holds(hf, tmp_path):
    sd = dict(hf[3])
    sd["layers.0.mlp.up_proj.weight"], sd["layers.1.mlp.up_proj.weight"] = \
        sd["layers.1.mlp.up_proj.weight"], sd["layers.0.mlp.up_proj.weight"]
    v = verdict(write(tmp_path / "swap.gguf", hf, state=sd), hf)
    assert v.startswith("VERDICT: FAULT: tensors: blk.0.ffn_up.weight (F32) differs from HF's "
                        "layers.0.mlp.up_proj.weight"), v
    assert "it holds HF's layers.1.mlp.up_proj.weight" in v and "swapped tensor" in v and "(+" in v


def test_qk_layout_candidates():
    cfg = ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=32)
    w = torch.randn(32, 64)
    assert qk_layout("layers.0.self_attn.k_proj.weight", hf_to_interleaved(w, 2), w, cfg) == \
        ("permuted once (correct)", 0.0)


def test_cli_check_prints_the_verdict(hf, tmp_path, capsys):
    path = write(tmp_path / "m.gguf", hf, outtype="q8_0")
    assert run_cli(doctor_main, [str(path), "--against", str(hf[0])]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("GGUF doctor:") and out[-1].startswith("VERDICT: OK")
    assert any(line.startswith("  ok     logits: KL") for line in out)
