"""export.py end to end: adapters merged, GGUF / HF / Meta written, each loads
back with the same logits."""

import os
import stat

import pytest
import torch
from tiny import script, tiny_tokenizer, write_hf_checkpoint

from minillm import Llama
from minillm.config import ModelConfig
from minillm.finetune.adapters import apply_lora
from minillm.finetune.peft_io import save_adapter
from minillm.formats.gguf_reader import read_gguf
from minillm.formats.load import load_tokenizer
from minillm.ship.convert import ExportConfig, export
from minillm.tokenizer.sentencepiece import Tokenizer

export_cli = script("export")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    tok = tiny_tokenizer(d / "tokenizer.model")
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128,
                      vocab_size=tok.vocab_size, max_seq_len=64)
    write_hf_checkpoint(d, cfg, seed=5, fmt="safetensors-sharded", tokenizer=tok)
    return d


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory):
    model = Llama.from_pretrained(base)
    apply_lora(model, r=4, alpha=8, dropout=0.0)
    torch.manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)  # a trained-looking adapter (B = 0 would merge to nothing)
    d = tmp_path_factory.mktemp("adapter")
    save_adapter(model, d, base_model_name_or_path=str(base))
    with torch.no_grad():
        logits = model.eval()(IDX)[0]
    return d, logits


IDX = torch.tensor([[1, 17, 42, 7, 99, 3, 250, 11]])


def logits_of(path):
    with torch.no_grad():
        return Llama.from_pretrained(path)(IDX)[0]


def test_gguf_f32_round_trip_logits_identical(base, tmp_path):
    out = export(ExportConfig(checkpoint=str(base), out=str(tmp_path / "m.gguf"), outtype="f32"))
    assert torch.equal(logits_of(out), logits_of(base))
    g = read_gguf(out)
    assert g.metadata["general.name"] == "m"
    assert g.metadata["general.file_type"] == 0


def test_gguf_with_merged_adapter(base, adapter, tmp_path):
    out = export(ExportConfig(checkpoint=str(base), out=str(tmp_path / "m.gguf"), outtype="f32",
                              adapter=str(adapter[0])))
    torch.testing.assert_close(logits_of(out), adapter[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("outtype,tol", [("f16", 2e-3), ("q8_0", 2e-2), ("q4_0", 2e-1)])
def test_gguf_quantized_close_to_base(base, tmp_path, outtype, tol):
    out = export(ExportConfig(checkpoint=str(base), out=str(tmp_path / "m.gguf"), outtype=outtype))
    diff = (logits_of(out) - logits_of(base)).abs().max().item()
    assert 0 < diff < tol if outtype != "f16" else diff < tol


def test_hf_export_round_trip_and_tokenizer(base, adapter, tmp_path):
    # the usual one: a directory gets 0755 (mkdtemp's was 0700), a file 0644
    umask = os.umask(0o022)
    try:
        out = export(ExportConfig(checkpoint=str(base), out=str(tmp_path / "hf"), format="hf",
                                  adapter=str(adapter[0])))
    finally:
        os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}
    torch.testing.assert_close(logits_of(out), adapter[1], atol=1e-5, rtol=0)
    assert (out / "tokenizer.model").read_bytes() == (base / "tokenizer.model").read_bytes()
    assert (out / "model.safetensors.index.json").is_file() and (out / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_meta_export_round_trip(base, tmp_path):
    out = export(ExportConfig(checkpoint=str(base), out=str(tmp_path / "meta"), format="meta"))
    assert torch.equal(logits_of(out), logits_of(base))


def test_gguf_to_generate_uses_rebuilt_tokenizer(base, tmp_path, capsys):
    generate = script("generate")

    out = export(ExportConfig(checkpoint=str(base), out=str(tmp_path / "m.gguf"), outtype="q8_0"))
    generate.main(["--checkpoint", str(out), "--prompt", "import json", "--temperature", "0",
                   "--max-new-tokens", "5"])
    assert capsys.readouterr().out.startswith("import json")
    tok = Tokenizer(base / "tokenizer.model")
    assert (load_tokenizer(out).encode("def f():\n\treturn  'é'")
            == tok.encode("def f():\n\treturn  'é'"))


def test_qlora_merge_uses_nf4_weights(base, adapter, tmp_path):
    plain = export(ExportConfig(checkpoint=str(base), out=str(tmp_path / "a.gguf"), outtype="f32",
                                adapter=str(adapter[0])))
    q = export(ExportConfig(checkpoint=str(base), out=str(tmp_path / "b.gguf"), outtype="f32",
                            adapter=str(adapter[0]), qlora=True))
    a, b = Llama.from_pretrained(plain), Llama.from_pretrained(q)
    from minillm.kernels.nf4 import dequantize_nf4_ref, quantize_nf4_ref

    w = Llama.from_pretrained(base).layers[0].mlp.up_proj.weight
    nf4_w = dequantize_nf4_ref(*quantize_nf4_ref(w), w.shape, dtype=torch.float32)
    delta = a.layers[0].mlp.up_proj.weight - w  # the adapter's ΔW, merged into the plain base
    torch.testing.assert_close(b.layers[0].mlp.up_proj.weight, nf4_w + delta, atol=1e-6, rtol=0)


def test_bad_inputs(base, tmp_path):
    with pytest.raises(ValueError, match="outtype 'q3_k' is not supported for gguf"):
        export_cli.main(["--checkpoint", str(base), "--out", str(tmp_path / "x.gguf"),
                         "--outtype", "q3_k"])
    with pytest.raises(FileNotFoundError, match="output directory .* does not exist"):
        export(ExportConfig(checkpoint=str(base), out=str(tmp_path / "nodir" / "x.gguf")))
    notok = tmp_path / "notok"
    write_hf_checkpoint(notok, ModelConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=64,
                                           vocab_size=50), fmt="bin")
    with pytest.raises(FileNotFoundError, match="missing tokenizer"):
        export(ExportConfig(checkpoint=str(notok), out=str(tmp_path / "x.gguf")))
    other = tmp_path / "other"
    model = Llama(ModelConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, vocab_size=50))
    apply_lora(model, r=2, alpha=4)
    save_adapter(model, other)
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        export(ExportConfig(checkpoint=str(base), out=str(tmp_path / "x.gguf"), adapter=str(other)))
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*"))
