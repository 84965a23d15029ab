"""The fidelity ledger: the reference row is exact (KL 0, top-1 100%), the merged row is the
reference up to float rounding, quantized rows drift in order of their bits, and new writer
types join by themselves."""

import json

import pytest
import torch
from tiny import tiny_tokenizer, write_hf_checkpoint

from minillm import Llama
from minillm.config import ModelConfig
from minillm.data.instruct import iter_batches, read_examples, tokenize_example
from minillm.eval.ledger import fidelity_ledger, format_ledger, kl_and_top1, ledger_outtypes, main
from minillm.finetune.adapters import apply_lora
from minillm.finetune.peft_io import save_adapter
from minillm.training.loss import held_out_loss


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("ledger")
    tok = tiny_tokenizer(d / "base" / "tokenizer.model")
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128,
                      vocab_size=tok.vocab_size, max_seq_len=128)
    write_hf_checkpoint(d / "base", cfg, seed=11, fmt="safetensors", tokenizer=tok)
    model = Llama.from_pretrained(d / "base")
    apply_lora(model, r=4, alpha=8, dropout=0.0)
    torch.manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    save_adapter(model, d / "adapter")
    records = [{"instruction": f"Which module defines `{name}`?", "input": "", "output": mod}
               for name, mod in [("dumps", "json"), ("dedent", "textwrap"), ("Template", "string"),
                                 ("loads", "json"), ("wrap", "textwrap"), ("capwords", "string")]]
    (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    examples = [tokenize_example(ex, tok, "alpaca", 128) for ex in read_examples(d / "test.jsonl")]
    return d, tok, examples


def test_ledger_rows(setup, monkeypatch):
    # the int8 / NF4 base rows on the PyTorch reference path (the kernels are checked against it
    # in test_int8_kernels.py / test_nf4_kernels.py): the interpreter would take a minute here
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    d, tok, examples = setup
    rows = fidelity_ledger(d / "base", d / "adapter", examples, tok.pad_id, d)
    assert [r.stage for r in rows] == (["adapter", "merged"] + ledger_outtypes()
                                       + ["base bf16", "base int8", "base nf4"])
    ref, merged = rows[0], rows[1]
    assert ref.kl == 0.0 and ref.top1 == 1.0
    assert merged.kl < 1e-6 and abs(merged.loss - ref.loss) < 1e-5  # float32 rounding only
    by = {r.stage: r for r in rows}
    # fewer bits, further from the trained model
    assert by["f16"].kl < by["q8_0"].kl < by["q4_0"].kl
    assert by["q4_0"].bits_per_weight < by["q8_0"].bits_per_weight < by["f16"].bits_per_weight
    # the loss column is training/loss.py's held_out_loss; KL and top-1 against the
    # adapter: recompute one row
    gguf = Llama.from_pretrained(d / "ledger-q8_0.gguf")
    assert (held_out_loss(gguf, iter_batches(examples, 16, tok.pad_id))["loss"]
            == pytest.approx(by["q8_0"].loss, abs=1e-6))
    assert kl_and_top1(gguf, gguf, examples, tok.pad_id) == (0.0, 1.0)
    # the adapter over other bases: each moves it, the fewer bits the further; the bits column
    # holds the block projections' bits per weight (int8: 8 + 32 / in_features)
    bf16, int8, nf4 = by["base bf16"], by["base int8"], by["base nf4"]
    assert 0 < bf16.kl < nf4.kl and 0 < int8.kl < nf4.kl
    # 2 layers of q, k, v, o, gate, up, down: 36864 weights in 512 rows per layer
    assert (bf16.bits_per_weight, int8.bits_per_weight, nf4.bits_per_weight) == (
        16.0, pytest.approx(8 + 32 * 512 / 36864), 4.5)
    table = format_ledger(rows).splitlines()
    assert table[0].startswith("| stage | held-out loss") and table[2].startswith("| adapter | ")
    assert len(table) == 2 + len(rows)


def test_new_writer_types_join_the_chain(monkeypatch):
    import minillm.eval.ledger as ledger

    only_old = {t: ledger.OUTTYPES[t] for t in ("f32", "f16", "bf16", "q8_0", "q4_0")}
    monkeypatch.setattr(ledger, "OUTTYPES", only_old)
    assert ledger.ledger_outtypes() == ["f16", "q8_0", "q4_0"]
    monkeypatch.setattr(ledger, "OUTTYPES", {**only_old, "q6_k": None, "q4_k_m": None,
                                             "q2_k": None})
    assert ledger.ledger_outtypes() == ["f16", "q8_0", "q6_k", "q4_k_m", "q4_0"]


def test_cli(setup, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # as in test_ledger_rows
    d, _, _ = setup
    rows = main(["--base", str(d / "base"), "--adapter", str(d / "adapter"),
                 "--data", str(d / "test.jsonl"), "--template", "alpaca", "--out", str(d),
                 "--max-seq-len", "128", "--outtypes", "q8_0", "--bases", "int8"])
    out = capsys.readouterr().out
    assert "| adapter | " in out and f"| {rows[-1].stage} | " in out
