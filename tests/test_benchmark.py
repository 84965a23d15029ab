"""eval/harness.py: multiple-choice log-likelihoods against a hand computation, perplexity against
exp(mean NLL) one token at a time, the harness's context/continuation split, the embedded task's
determinism, and the eval CLI on a minillm checkpoint and its GGUF export."""

import json
import math

import pytest
import torch
from tiny import CharTokenizer, tiny_tokenizer

from minillm.config import ModelConfig
from minillm.eval.harness import (
    MCExample,
    encode_pair,
    main,
    module_choice_examples,
    perplexity,
    read_mc_task,
    score_multiple_choice,
)
from minillm.model import Llama

TOK = CharTokenizer()


def tiny_model(seed=0, vocab=TOK.vocab_size, max_seq_len=16):
    torch.manual_seed(seed)
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=48, vocab_size=vocab,
                      max_seq_len=max_seq_len)
    return Llama(cfg).eval()


def logp_next(model, ids):
    """log p(· | ids) from a full forward over ids (the slow obvious way), float64."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
    return torch.log_softmax(logits[0, -1].double(), dim=-1)


def test_multiple_choice_against_hand_computation():
    model = tiny_model()
    examples = [MCExample("ab", ["c", "de", "fgh"], 1),
                MCExample("x y ", ["z", "zz"], 0, target_delimiter="")]
    # by hand: score each choice token by token; the trailing space of "x y "
    # moves into the continuation
    by_hand = []
    for ctx, conts in (("ab", [" c", " de", " fgh"]), ("x y", [" z", " zz"])):
        row = []
        for cont in conts:
            ids, ll = TOK.encode(ctx), 0.0
            for ch in cont:
                ll += logp_next(model, ids)[TOK.encode(ch, bos=False)[0]].item()
                ids = ids + TOK.encode(ch, bos=False)
            row.append(ll)
        by_hand.append(row)
    out = score_multiple_choice(model, TOK, examples, batch_size=2)  # batches cut across examples
    for got, want in zip(out["lls"], by_hand, strict=True):
        assert got == pytest.approx(want, abs=1e-4)
    acc = [max(range(len(r)), key=r.__getitem__) == ex.answer
           for r, ex in zip(by_hand, examples, strict=True)]
    # chars, no delimiter
    norm = [max(range(len(r)), key=lambda j: r[j] / len(ex.choices[j])) == ex.answer
            for r, ex in zip(by_hand, examples, strict=True)]
    assert out["acc"] == sum(acc) / 2 and out["acc_norm"] == sum(norm) / 2 and out["n"] == 2


def test_encode_pair_splits_like_the_harness(tmp_path):
    tok = tiny_tokenizer(tmp_path / "t.model")
    ctx, cont = encode_pair(tok, "import json.", " dumps")
    assert (ctx == tok.encode("import json.", bos=True)
            and ctx + cont == tok.encode("import json. dumps", bos=True))
    # the trailing space moves to the continuation
    ctx2, cont2 = encode_pair(tok, "import json. ", "dumps")
    assert (ctx2, cont2) == (ctx, cont)


def test_long_sequences_lose_context_from_the_left():
    model = tiny_model(max_seq_len=8)
    ex = MCExample("abcdefghij", ["kl", "m"], 0, "")  # 1 + 10 + 2 tokens > 8 + 1
    out = score_multiple_choice(model, TOK, [ex])
    ids = TOK.encode("abcdefghijkl")[-9:]  # the last max_seq_len + 1 tokens
    want = logp_next(model, ids[:-2])[ids[-2]] + logp_next(model, ids[:-1])[ids[-1]]
    assert out["lls"][0][0] == pytest.approx(want.item(), abs=1e-4)


def test_perplexity_is_exp_of_mean_nll_over_windows():
    model = tiny_model(max_seq_len=8)
    text = "def f(x):\n    return 2*x\n"  # 25 tokens: three windows of 8 and one of 1
    ids = TOK.encode(text)
    L = 8
    nll = 0.0
    # token j is predicted from the start of its window: (j - 1) // L * L
    for j in range(1, len(ids)):
        start = (j - 1) // L * L
        nll -= logp_next(model, ids[start:j])[ids[j]].item()
    n = len(ids) - 1
    out = perplexity(model, TOK, text, batch_size=2)
    assert out["tokens"] == n and len(ids) > 2 * L + 1
    assert out["nll"] == pytest.approx(nll / n, rel=1e-5)
    assert out["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert out["bits_per_byte"] == pytest.approx(nll / (math.log(2) * len(text.encode())), rel=1e-5)


def test_module_choice_examples_are_deterministic_and_held_out():
    records = [dict(instruction="Which module defines `dumps`?", output="json", kind="module",
                    name="json.dumps"),
               dict(instruction="What does `json.dumps` do?", output="Serialize.", kind="describe",
                    name="json.dumps"),
               dict(instruction="Which module defines `wrap`?", output="textwrap", kind="module",
                    name="textwrap.wrap")]
    pool = ["json", "textwrap", "ast", "os.path", "re", "string", "csv"]
    a = module_choice_examples(records, pool)
    # the pool's order does not matter
    assert a == module_choice_examples(records, list(reversed(pool)))
    assert len(a) == 2  # only "module" records
    for ex, r in zip(a, (records[0], records[2]), strict=True):
        assert (ex.choices[ex.answer] == r["output"] and len(set(ex.choices)) == 4
                and ex.target_delimiter == "")
        assert ex.context.endswith("### Response:\n") and r["instruction"] in ex.context


def test_read_mc_task_errors_name_the_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"context": "a", "choices": ["b", "c"], "answer": 1}) + "\n\n"
                    + json.dumps({"context": "a", "choices": ["b", "c"], "answer": 2}) + "\n")
    with pytest.raises(ValueError,
                       match=r"t.jsonl:3: 'answer' must be an index into the 2 choices"):
        read_mc_task(path)


def test_eval_cli_one_table_for_a_checkpoint_and_its_gguf(tmp_path, capsys):
    from minillm.formats.native import save_model
    from minillm.ship.convert import ExportConfig, export

    tok = tiny_tokenizer(tmp_path / "tokenizer.model")
    model = tiny_model(vocab=tok.vocab_size, max_seq_len=32)
    save_model(model, tmp_path / "ckpt", tokenizer_path=tok.path)
    gguf = export(ExportConfig(checkpoint=str(tmp_path / "ckpt"), outtype="f32",
                               out=str(tmp_path / "m.gguf")))
    mc = tmp_path / "mc.jsonl"
    mc.write_text("".join(json.dumps({"context": c, "choices": ch, "answer": a}) + "\n"
                          for c, ch, a in [("import", ["json", "os", "xyz"], 0),
                                           ("def", ["f(x):", "class"], 0)]))
    txt = tmp_path / "code.txt"
    txt.write_text("import json\n\ndef f(x):\n    return json.dumps(x)\n" * 3)
    rows = main(["--checkpoint", str(tmp_path / "ckpt"), "--checkpoint", str(gguf),
                 "--task", str(mc), "--task", str(txt)])
    table = capsys.readouterr().out.splitlines()
    assert (table[0] == "| checkpoint | task | n | acc | acc_norm | ppl | bits/byte |"
            and len(table) == 6)
    want_mc = score_multiple_choice(model, tok, read_mc_task(mc))
    want_ppl = perplexity(model, tok, txt.read_text())
    for _ckpt, task, m in rows:  # the GGUF (f32) scores what the checkpoint scores
        if task == str(mc):
            assert (m["acc"], m["acc_norm"]) == (want_mc["acc"], want_mc["acc_norm"])
            for got, want in zip(m["lls"], want_mc["lls"], strict=True):
                assert got == pytest.approx(want, abs=1e-4)
        else:
            assert m["ppl"] == pytest.approx(want_ppl["ppl"], rel=1e-5)
    assert f"| {tmp_path / 'ckpt'} | {mc} | 2 | " in table[2]
