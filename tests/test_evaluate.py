"""eval/metrics.py and training/loss.py: token-weighted held-out loss / perplexity by hand,
greedy answers against a plain argmax loop, exact-match / contains on fixed strings, and the
Markdown report's rows."""

import json
import math

import pytest
import torch
from tiny import CharTokenizer

from minillm.config import ModelConfig
from minillm.data.instruct import iter_batches, load_instruct_data, read_examples
from minillm.eval.metrics import (
    contains,
    exact_match,
    normalize,
    short_answer_accuracy,
    side_by_side,
    write_report,
)
from minillm.finetune.adapters import apply_lora, lora_disabled, lora_modules
from minillm.model import Llama
from minillm.training.loss import held_out_loss, token_loss_sum

TOK = CharTokenizer()
CFG = ModelConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=48, vocab_size=TOK.vocab_size,
                  max_seq_len=96)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return Llama(CFG).eval()


def data(tmp_path, records):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return load_instruct_data(path, TOK, template="none", max_seq_len=64, test_frac=0.0).train


def test_perplexity_is_exp_of_token_weighted_mean_loss(tmp_path):
    model = tiny_model()
    exs = data(tmp_path,
               [{"instruction": "ab", "output": "c"}, {"instruction": "d", "output": "efghij"}])
    nll, n = 0.0, 0
    with torch.no_grad():  # by hand: one example, one position at a time
        for e in exs:
            logits, _ = model(torch.tensor([e.ids[:-1]]))
            logp = torch.log_softmax(logits[0].double(), dim=-1)
            for t, target in enumerate(e.labels[1:]):
                if target != -100:
                    nll, n = nll - logp[t, target].item(), n + 1
    assert n == 2 + 7  # "c"+EOS and "efghij"+EOS
    for batch_size in (1, 2):  # batching must not change a token-weighted mean
        out = held_out_loss(model, iter_batches(exs, batch_size, TOK.pad_id))
        assert out["tokens"] == n
        assert math.isclose(out["loss"], nll / n, rel_tol=1e-5)
        assert math.isclose(out["ppl"], math.exp(nll / n), rel_tol=1e-5)


def test_token_loss_sum_is_the_models_mean_times_the_count_and_no_targets_is_an_error():
    model = tiny_model()
    x = torch.randint(0, CFG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    y = torch.roll(x, -1, 1)
    y[0, :4] = -100
    with torch.no_grad():
        mean = model(x, y)[1]
        torch.testing.assert_close(token_loss_sum(model, x, y), mean * int((y != -100).sum()))
    with pytest.raises(ValueError, match="no target tokens"):
        held_out_loss(model, [(x, torch.full_like(y, -100))])
    with pytest.raises(ValueError, match="no target tokens"):
        held_out_loss(model, [])  # an empty split: an error, not a NaN


def test_exact_match_and_contains_fixed_strings():
    assert normalize("  json \n\t dumps ") == "json dumps"
    assert exact_match("json", " json\n") and not exact_match("json.decoder", "json")
    assert contains("The module is json.", "json") and not contains("JSON", "json")
    assert exact_match("wrap(text,  width=70)", "wrap(text, width=70)")


def greedy_by_hand(model, prompt, n):
    """Argmax over a full forward each step (no KV cache): the obvious
    version of greedy decoding."""
    ids = TOK.encode(prompt, bos=True)
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([ids + out]))
            tok = int(logits[0, -1].argmax())
            if tok == TOK.eos_id:
                break
            out.append(tok)
    return TOK.decode(out).strip()


def test_greedy_answers_and_accuracy(tmp_path):
    model = tiny_model(1)
    expected = greedy_by_hand(model, "What?", 8)
    path = tmp_path / "q.jsonl"
    path.write_text(
        json.dumps({"instruction": "What?", "output": expected or "x"})
        + "\n"
        + json.dumps({"instruction": "Who?", "output": "~~~~"})
        + "\n"
    )
    acc = short_answer_accuracy(model, TOK, read_examples(path), template="none", max_new_tokens=8)
    assert (acc["n"], acc["exact"], acc["contains"]) == (2, 0.5, 0.5)
    assert [r["exact"] for r in acc["rows"]] == [True, False]
    assert acc["rows"][0]["prediction"] == expected


def test_side_by_side_with_lora_disabled_and_report_rows(tmp_path):
    model = tiny_model(2)
    apply_lora(model, r=4, alpha=8, dropout=0.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(0.5 * torch.randn(m.lora_B.weight.shape, generator=g))
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"instruction": "Hi", "output": "ok"}) + "\n")
    examples = read_examples(path)
    with lora_disabled(model):
        base = short_answer_accuracy(model, TOK, examples, template="none", max_new_tokens=6)
    tuned = short_answer_accuracy(model, TOK, examples, template="none", max_new_tokens=6)
    rows = side_by_side(base, tuned)
    plain = tiny_model(2)  # the same base weights, no adapters
    assert rows[0]["base"] == greedy_by_hand(plain, "Hi", 6)
    assert rows[0]["tuned"] == greedy_by_hand(model, "Hi", 6) != rows[0]["base"]
    assert rows[0]["reference"] == "ok" and rows[0]["instruction"] == "Hi"

    fixed = [
        dict(instruction="Which module defines `dumps`?", reference="json", base="pickle",
             tuned="json"),
        dict(instruction="a | b", reference="x\ny", base="", tuned="x y"),
    ]
    out = write_report(tmp_path / "r" / "report.md", fixed, title="stdlib",
                       metrics={"exact": (0.0, 0.5)})
    assert out.read_text(encoding="utf-8").splitlines() == [
        "# stdlib",
        "",
        "| metric | base | fine-tuned |",
        "|---|---|---|",
        "| exact | 0 | 0.5 |",
        "",
        "| # | instruction | reference | base | fine-tuned |",
        "|---|---|---|---|---|",
        "| 0 | Which module defines `dumps`? | json | pickle | json ✓ |",
        "| 1 | a \\| b | x<br>y |  | x y ✓ |",
    ]
    assert not list((tmp_path / "r").glob(".*tmp*"))  # the temp file was renamed away


def test_batched_answers_equal_one_at_a_time(tmp_path):
    model = tiny_model(3)
    path = tmp_path / "q.jsonl"
    questions = ["a", "What?", "Which module defines `x`?", "bc", "Who is there, and why?"]
    path.write_text("".join(json.dumps({"instruction": q, "output": "ab"}) + "\n"
                            for q in questions))
    examples = read_examples(path)
    one = short_answer_accuracy(model, TOK, examples, template="none", max_new_tokens=7)
    for batch_size in (2, 16):  # rows of different lengths, left-padded together
        many = short_answer_accuracy(model, TOK, examples, template="none", max_new_tokens=7,
                                     batch_size=batch_size)
        assert [r["prediction"] for r in many["rows"]] == [r["prediction"] for r in one["rows"]]
        assert [r["prediction"] for r in one["rows"]] == [greedy_by_hand(model, q, 7)
                                                         for q in questions]
