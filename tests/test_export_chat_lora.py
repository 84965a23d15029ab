"""export.py's llama.cpp extras: the chat template shipped in GGUF / HF outputs, and LoRA
adapters as llama.cpp's LoRA GGUF (structure, RoPE permutation, and merging it back gives our
merged weights exactly)."""

import json

import pytest
import torch
from lora_gguf_reference import merge_lora_gguf, read_lora_gguf
from tiny import tiny_tokenizer, write_hf_checkpoint

from minillm import Llama
from minillm.config import ModelConfig
from minillm.data.templates import JINJA, write_template_record
from minillm.finetune.adapters import apply_lora
from minillm.finetune.peft_io import save_adapter
from minillm.formats.gguf_layout import FLOAT32, STRING
from minillm.formats.gguf_reader import load_gguf_model, read_gguf
from minillm.names import hf_to_interleaved
from minillm.ship.convert import ExportConfig, export, load_merged


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    tok = tiny_tokenizer(d / "tokenizer.model")
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128,
                      vocab_size=tok.vocab_size, max_seq_len=64)
    write_hf_checkpoint(d, cfg, seed=5, fmt="safetensors", tokenizer=tok)
    return d


def make_adapter(base, d, use_rslora=False, dora=False,
                 targets=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")):
    model = Llama.from_pretrained(base)
    kw = {"use_dora": True} if dora else {}
    apply_lora(model, list(targets), r=4, alpha=8, dropout=0.0, use_rslora=use_rslora, **kw)
    torch.manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)  # a trained-looking adapter (B = 0 would merge to nothing)
    save_adapter(model, d, base_model_name_or_path=str(base))
    return d


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_gguf_layout_and_merge_back_exact(base, tmp_path, use_rslora):
    adapter = make_adapter(base, tmp_path / "adapter", use_rslora=use_rslora)
    out = export(ExportConfig(checkpoint=str(base), out=str(tmp_path / "a.gguf"),
                              format="gguf-lora", adapter=str(adapter)))
    g = read_gguf(out)
    assert g.metadata["general.type"] == "adapter" and g.metadata["adapter.type"] == "lora"
    assert g.metadata["general.architecture"] == "llama"
    assert g.value_types["adapter.lora.alpha"] == (FLOAT32, None)
    assert g.value_types["general.type"] == (STRING, None)
    # llama.cpp scales by alpha / r: alpha' = scaling * r, so rsLoRA's
    # alpha / sqrt(r) = 4 gives alpha' = 16
    assert g.metadata["adapter.lora.alpha"] == (16.0 if use_rslora else 8.0)
    assert len(g.tensors) == 2 * 2 * 5
    a, b = g.tensors["blk.1.ffn_down.weight.lora_a"], g.tensors["blk.1.ffn_down.weight.lora_b"]
    assert a.shape == (4, 128) and b.shape == (64, 4) and a.ggml_type == b.ggml_type == 0  # F32
    assert g.tensors["blk.0.attn_k.weight.lora_b"].shape == (32, 4)  # 2 KV heads x 16

    # q/k: lora_b rows are permuted like the base's rows, lora_a is as stored
    model = Llama.from_pretrained(base)
    from minillm.finetune.peft_io import load_adapter

    load_adapter(model, adapter)
    q = model.layers[0].self_attn.q_proj
    assert torch.equal(g.tensor("blk.0.attn_q.weight.lora_b"),
                       hf_to_interleaved(q.lora_B.weight.detach(), 4))
    assert torch.equal(g.tensor("blk.0.attn_q.weight.lora_a"), q.lora_A.weight.detach())

    # base + the file's adapter, merged, equals export's own merge exactly (in HF layout, float32)
    base_sd = Llama.from_pretrained(base).state_dict()
    merged_back = merge_lora_gguf(base_sd, read_lora_gguf(out, model.config))
    merged = load_merged(ExportConfig(checkpoint=str(base), out=str(tmp_path / "m.gguf"),
                                      adapter=str(adapter)))
    for key, w in merged.state_dict().items():
        assert torch.equal(merged_back[key], w.float()), key


def test_lora_gguf_applied_in_file_layout_equals_merged_gguf(base, tmp_path):
    """What llama.cpp computes: base GGUF tensor + (alpha/r) B_file A_file, in the file's own row
    order, equals the merged GGUF's tensor (the permutation commutes with the merge)."""
    adapter = make_adapter(base, tmp_path / "adapter")
    lora = read_gguf(export(ExportConfig(checkpoint=str(base), out=str(tmp_path / "a.gguf"),
                                         format="gguf-lora", adapter=str(adapter))))
    g_base = read_gguf(export(ExportConfig(checkpoint=str(base), out=str(tmp_path / "b.gguf"),
                                           outtype="f32")))
    g_merged = read_gguf(export(ExportConfig(checkpoint=str(base), out=str(tmp_path / "m.gguf"),
                                             outtype="f32", adapter=str(adapter))))
    scale = lora.metadata["adapter.lora.alpha"] / 4
    for name in ("blk.0.attn_q.weight", "blk.1.attn_k.weight", "blk.0.attn_v.weight",
                 "blk.1.ffn_down.weight"):
        w = g_base.tensor(name) + (lora.tensor(name + ".lora_b")
                                   @ lora.tensor(name + ".lora_a")) * scale
        assert torch.equal(w, g_merged.tensor(name)), name


def test_lora_gguf_refuses_what_llama_cpp_cannot_hold(base, tmp_path):
    dora = make_adapter(base, tmp_path / "dora", dora=True)
    with pytest.raises(ValueError, match="DoRA adapter"):
        export(ExportConfig(checkpoint=str(base), out=str(tmp_path / "a.gguf"), format="gguf-lora",
                            adapter=str(dora)))
    plain = make_adapter(base, tmp_path / "plain")
    cfg_path = plain / "adapter_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()),
                                    "modules_to_save": ["lm_head"]}))
    with pytest.raises(ValueError, match="modules_to_save"):
        export(ExportConfig(checkpoint=str(base), out=str(tmp_path / "a.gguf"), format="gguf-lora",
                            adapter=str(plain)))
    with pytest.raises(ValueError, match="gguf-lora writes an adapter"):
        ExportConfig(checkpoint=str(base), out=str(tmp_path / "a.gguf"), format="gguf-lora")
    assert not (tmp_path / "a.gguf").exists()


def test_chat_template_from_the_record_into_gguf_and_hf(base, tmp_path):
    adapter = make_adapter(base, tmp_path / "adapter")
    out = export(ExportConfig(checkpoint=str(base), out=str(tmp_path / "none.gguf"),
                              adapter=str(adapter)))
    # nothing recorded: nothing shipped
    assert "tokenizer.chat_template" not in read_gguf(out).metadata
    write_template_record(adapter, "vicuna")
    out = export(ExportConfig(checkpoint=str(base), out=str(tmp_path / "m.gguf"),
                              adapter=str(adapter)))
    assert read_gguf(out).metadata["tokenizer.chat_template"] == JINJA["vicuna"]
    load_gguf_model(out)  # the extra key does not disturb loading
    # --template wins over the record
    out = export(ExportConfig(checkpoint=str(base), out=str(tmp_path / "a.gguf"),
                              adapter=str(adapter), template="alpaca"))
    assert read_gguf(out).metadata["tokenizer.chat_template"] == JINJA["alpaca"]
    hf = export(ExportConfig(checkpoint=str(base), out=str(tmp_path / "hf"), format="hf",
                             adapter=str(adapter)))
    tok_cfg = json.loads((hf / "tokenizer_config.json").read_text())
    assert tok_cfg["chat_template"] == JINJA["vicuna"] and tok_cfg["eos_token"] == "</s>"
