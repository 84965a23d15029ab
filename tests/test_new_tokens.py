"""New tokens and modules_to_save: Tokenizer.add_pieces (USER_DEFINED pieces, split out first as
llama.cpp does), resize_vocab's mean initialisation, embed_tokens / lm_head saved in PEFT's
layout, and a QDoRA + rsLoRA fine-tune with two new tokens end to end: trained, exported to GGUF
(tokens and types), reloaded."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_tokenizer, write_hf_checkpoint

from minillm.config import ModelConfig
from minillm.finetune.adapters import apply_lora, lora_modules, mark_only_lora_trainable
from minillm.finetune.new_tokens import resize_vocab
from minillm.finetune.peft_io import load_adapter, read_base_quantization, save_adapter
from minillm.formats.gguf_layout import TOKEN_NORMAL, TOKEN_USER_DEFINED
from minillm.formats.gguf_reader import read_gguf
from minillm.model import Llama
from minillm.ship.convert import ExportConfig, export
from minillm.tokenizer.sentencepiece import Tokenizer
from minillm.training.checkpoint import plain_llama
from minillm.training.config import TrainConfig, apply_overrides
from minillm.training.loop import train

NEW = ["<|im_start|>", "<|im_end|>"]
CHAT = "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n  x = 1<|im_end|>"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.model")


def test_add_pieces_encodes_each_as_one_id_and_text_between_on_its_own(tok, tmp_path):
    new = tok.add_pieces(NEW, tmp_path / "tokenizer.model")
    V = tok.vocab_size
    assert new.vocab_size == V + 2 and new.added == {"<|im_start|>": V, "<|im_end|>": V + 1}
    assert not tok.added  # a trained model's "\n" and "\t" are user-defined too, but whitespace
    ids = new.encode(CHAT)
    # the rule llama.cpp applies: split on the added pieces, SentencePiece-encode
    # each stretch between them
    expected = [new.bos_id, V] + tok.encode("user\nhi there", bos=False) + [V + 1] \
        + tok.encode("\n", bos=False) + [V] + tok.encode("assistant\n  x = 1", bos=False) + [V + 1]
    assert ids == expected
    assert new.decode(ids[1:]) == CHAT  # exact inverse
    text = "def f(a):\n\treturn  a  # é"
    assert new.encode(text) == tok.encode(text)  # text without the pieces: ids unchanged
    assert Tokenizer(model_bytes=new.model_bytes()).added == new.added
    for bad in (["<|im_start|>"] * 2, ["a b"], [""], [tok.id_to_piece(300)]):
        with pytest.raises(ValueError, match="add_pieces"):
            tok.add_pieces(bad, tmp_path / "bad.model")


def test_streamed_text_equals_decode_around_added_pieces(tok, tmp_path):
    from minillm.generate.text import TextStream

    new = tok.add_pieces(NEW, tmp_path / "tokenizer.model")
    ids = new.encode(CHAT + " é", bos=False)
    stream = TextStream(new)
    assert "".join(stream.push(i) for i in ids) + stream.flush() == new.decode(ids) == CHAT + " é"


def test_resize_vocab_appends_the_mean_of_the_old_rows():
    torch.manual_seed(0)
    model = Llama(ModelConfig(dim=16, n_layers=1, n_heads=2, hidden_dim=32, vocab_size=50,
                              max_seq_len=16))
    emb, head = model.embed_tokens.weight.detach().clone(), model.lm_head.weight.detach().clone()
    resize_vocab(model, 53)
    assert model.config.vocab_size == 53 and model.embed_tokens.num_embeddings == 53
    assert model.lm_head.out_features == 53
    assert (torch.equal(model.embed_tokens.weight[:50], emb)
            and torch.equal(model.lm_head.weight[:50], head))
    for w, old in ((model.embed_tokens.weight, emb), (model.lm_head.weight, head)):
        torch.testing.assert_close(w[50:], old.mean(0, keepdim=True).expand(3, -1), atol=1e-7,
                                   rtol=0)
    logits, _ = model(torch.tensor([[1, 51, 7]]))
    assert logits.shape == (1, 3, 53)
    with pytest.raises(ValueError, match="would drop trained rows"):
        resize_vocab(model, 52)


def test_modules_to_save_train_in_full_and_round_trip_in_peft_layout(tmp_path):
    cfg = ModelConfig(dim=40, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=52, vocab_size=71,
                      max_seq_len=32)
    torch.manual_seed(0)
    model = Llama(cfg).eval()
    resize_vocab(model, 73)
    apply_lora(model, ["q", "v"], r=4, alpha=8, use_dora=True)
    mark_only_lora_trainable(model, ["embed_tokens", "lm_head"])
    assert model.embed_tokens.weight.requires_grad and model.lm_head.weight.requires_grad
    assert (sorted(n for n, p in model.named_parameters() if p.requires_grad and "lora" not in n)
            == ["embed_tokens.weight", "lm_head.weight"])
    with torch.no_grad():
        model.embed_tokens.weight.add_(0.01 * torch.randn(73, 40))
        model.lm_head.weight.add_(0.01 * torch.randn(73, 40))
    save_adapter(model, tmp_path, modules_to_save=["embed_tokens", "lm_head"])
    state = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert state["base_model.model.model.embed_tokens.weight"].shape == (73, 40)
    assert torch.equal(state["base_model.model.lm_head.weight"], model.lm_head.weight.detach())
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["embed_tokens", "lm_head"]
    torch.manual_seed(0)
    fresh = Llama(cfg).eval()  # the 71-row base: load_adapter resizes it to the adapter's 73 rows
    loaded = load_adapter(fresh, tmp_path)
    assert loaded == list(lora_modules(model)) + ["embed_tokens", "lm_head"]
    assert fresh.config.vocab_size == 73
    idx = torch.tensor([[1, 72, 5, 71, 9]])
    with torch.no_grad():
        assert torch.equal(fresh(idx)[0], model(idx)[0])
    with pytest.raises(ValueError, match="modules_to_save"):
        mark_only_lora_trainable(fresh, ["layers"])


def test_modules_to_save_of_a_bf16_model_train_in_float32_and_run_without_autocast():
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=64, vocab_size=50, max_seq_len=16)
    model = Llama(cfg).to(torch.bfloat16)
    apply_lora(model, ["q", "v"], r=2, alpha=4)
    mark_only_lora_trainable(model, ["embed_tokens", "lm_head"])
    assert model.embed_tokens.weight.dtype == model.lm_head.weight.dtype == torch.float32
    assert model.layers[0].self_attn.q_proj.base.weight.dtype == torch.bfloat16
    # no autocast: dtypes must meet
    logits, loss = model(torch.tensor([[1, 7, 3]]), torch.tensor([[7, 3, 9]]))
    loss.backward()
    assert logits.dtype == torch.float32 and model.embed_tokens.weight.grad.abs().sum() > 0


def finetune_cfg(tmp_path: Path, base: Path, tok: Tokenizer, method: str, **over) -> TrainConfig:
    rows = [{"text": f"<|im_start|>user\nname {i}<|im_end|>\n"
                     f"<|im_start|>assistant\nitem {i % 5}<|im_end|>"}
            for i in range(24)]
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    flat = {"out_dir": str(tmp_path / "out"), "init_from": str(base), "seed": 7,
            "data.format": "instruct", "data.corpus": str(data), "data.val_frac": 0.2,
            "data.num_workers": 0, "data.cache_dir": str(tmp_path / "cache"),
            "finetune.method": method, "finetune.lora_r": 4,
            "finetune.lora_targets": ["q_proj", "v_proj", "down_proj"], "finetune.new_tokens": NEW,
            "finetune.modules_to_save": ["embed_tokens", "lm_head"], "finetune.use_rslora": True,
            "batch_size": 4, "block_size": 48, "schedule.total_steps": 2,
            "schedule.warmup_steps": 1, "schedule.max_lr": 1e-2, "schedule.min_lr": 1e-3,
            "eval.interval": 0, "eval.iters": 1, "eval.sample_tokens": 0, "checkpoint.interval": 0,
            "log.progress_bar": False, "log.tensorboard": False, **over}
    return apply_overrides(TrainConfig(), flat, "test")


@pytest.fixture(scope="module")
def base(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, vocab_size=tok.vocab_size,
                      max_seq_len=64)
    write_hf_checkpoint(d, cfg, fmt="safetensors", tokenizer=tok)
    return d


def test_qdora_finetune_with_new_tokens_trains_saves_and_exports(base, tok, tmp_path):
    cfg = finetune_cfg(tmp_path, base, tok, "qlora",
                       **{"finetune.use_dora": True, "finetune.double_quant": True})
    result = train(cfg)
    out, V = tmp_path / "out", tok.vocab_size
    model = result.model
    assert model.config.vocab_size == V + 2
    assert all(type(m).__name__ == "DoRALinear" and m.scaling == 16 / 4**0.5
               for m in lora_modules(model).values())
    # the new rows started as the mean of the old ones and were trained (their gradient is not zero)
    base_emb = Llama.from_pretrained(base).embed_tokens.weight
    assert not torch.allclose(model.embed_tokens.weight[V:].detach(),
                              base_emb.mean(0).expand(2, -1), atol=1e-4)
    adapter = out / "adapter"
    assert Tokenizer(adapter / "tokenizer.model").added == {"<|im_start|>": V, "<|im_end|>": V + 1}
    assert read_base_quantization(adapter) == {"quant_method": "nf4", "blocksize": 64,
                                              "double_quant": True}
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["use_dora"] and config["use_rslora"]
            and config["modules_to_save"] == ["embed_tokens", "lm_head"])

    # export: the base + this adapter, through the recorded NF4 settings,
    # equals the trainer's own export
    gguf = export(ExportConfig(checkpoint=str(base), out=str(tmp_path / "m.gguf"), outtype="f32",
                               adapter=str(adapter)))
    g = read_gguf(gguf)
    tokens, types = (g.metadata["tokenizer.ggml.tokens"],
                     list(g.metadata["tokenizer.ggml.token_type"]))
    assert tokens[V:] == NEW and types[V:] == [TOKEN_USER_DEFINED] * 2
    assert TOKEN_USER_DEFINED not in types[:V] and types[V - 1] == TOKEN_NORMAL
    exported = Llama.from_pretrained(gguf)
    trainer_export = Llama.from_pretrained(out)  # plain_llama, written by the trainer
    for (k, a), (_, b) in zip(sorted(exported.state_dict().items()),
                              sorted(trainer_export.state_dict().items()), strict=True):
        assert torch.equal(a, b), k
    idx = torch.tensor([Tokenizer(adapter / "tokenizer.model").encode(
        rows_text := "<|im_start|>user\nname 3")])
    assert idx[0, 1].item() == V, rows_text
    with torch.no_grad():
        torch.testing.assert_close(plain_llama(model).eval()(idx)[0], exported(idx)[0], atol=1e-5,
                                   rtol=0)
