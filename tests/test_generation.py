"""Sampling maths on exact values, the streaming detokenizer, greedy determinism and the CLI."""

import copy
import math

import pytest
import torch
from tiny import script, tiny_tokenizer

from minillm.config import ModelConfig
from minillm.formats.native import save_model
from minillm.generate.decode import generate_tokens
from minillm.generate.sampling import SamplingConfig, apply_repetition_penalty, logits_to_probs
from minillm.generate.text import TextStream, generate_text
from minillm.model import Llama


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.model")


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128,
                      vocab_size=tok.vocab_size, max_seq_len=128)
    return Llama(cfg).eval()


def test_top_k_and_top_p_exact():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.0625, 0.0625]]))
    p = logits_to_probs(logits, temperature=1.0, top_k=2, top_p=None)
    torch.testing.assert_close(p, torch.tensor([[2 / 3, 1 / 3, 0.0, 0.0, 0.0]]))
    # nucleus 0.7: 0.5 < 0.7, 0.5 + 0.25 crosses 0.7 → keep the first two
    p = logits_to_probs(logits, temperature=1.0, top_k=None, top_p=0.7)
    torch.testing.assert_close(p, torch.tensor([[2 / 3, 1 / 3, 0.0, 0.0, 0.0]]))
    # exactly reaching p keeps no more tokens: 0.75 mass after two → the third is dropped
    p = logits_to_probs(logits, temperature=1.0, top_k=None, top_p=0.75)
    torch.testing.assert_close(p, torch.tensor([[2 / 3, 1 / 3, 0.0, 0.0, 0.0]]))
    # temperature 2 on [ln .5, ln .25] → proportional to sqrt: [0.7071, 0.5]
    p = logits_to_probs(logits[:, :2], temperature=2.0, top_k=None, top_p=None)
    torch.testing.assert_close(p, torch.tensor([[math.sqrt(.5), .5]]) / (math.sqrt(.5) + .5))


def test_repetition_penalty_hf_convention():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]


def test_text_stream_matches_decode(tok):
    text = "def f(x):\n\treturn  'héllo → 世界'  # 🙂\n"
    ids = tok.encode(text, bos=False)
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) + stream.flush() == tok.decode(ids) == text
    # a multi-byte character split over byte pieces only appears once it is complete
    byte_ids = [i for i in ids if tok.sp.IsByte(i)]
    assert byte_ids and all("\ufffd" not in p for p in pieces)


def test_text_stream_matches_decode_on_any_ids(tok):
    # The stream is decode, piece by piece: only the first piece that has text loses its
    # dummy-prefix space (a byte piece first, as a random model emits, keeps the space of the word
    # piece after it), and invalid UTF-8 comes out exactly as SentencePiece decodes it. 200 random
    # sequences over every piece, plus one that continues a prompt (its last token as the prefix).
    g = torch.Generator().manual_seed(0)
    sp = tok.sp
    space_piece = next(i for i in range(tok.vocab_size) if sp.IdToPiece(i).startswith("\u2581"))
    byte_piece = next(i for i in range(tok.vocab_size)
                      if sp.IsByte(i) and sp.IdToPiece(i) == "<0x41>")
    cases = [[byte_piece, space_piece]] + [
        torch.randint(0, tok.vocab_size, (12,), generator=g).tolist() for _ in range(200)]
    for ids in cases:
        stream = TextStream(tok)
        assert "".join(stream.push(i) for i in ids) + stream.flush() == tok.decode(ids), ids
    prompt = tok.encode("x =", bos=True)
    stream = TextStream(tok, prefix=prompt[-1:])
    cont = tok.encode(" 1 + 2", bos=False)
    assert ("".join(stream.push(i) for i in cont) + stream.flush()
            == tok.decode(prompt + cont)[len("x ="):])


def test_greedy_is_deterministic_and_matches_argmax_loop(model):
    prompt = [1, 5, 9, 42]
    cfg = SamplingConfig(max_new_tokens=12, temperature=0.0)
    a = list(generate_tokens(model, prompt, cfg))
    b = list(generate_tokens(model, prompt, cfg))
    # the slow way: full forward over the growing sequence, argmax each time
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            logits, _ = model(torch.tensor([ids]))
            ids.append(int(logits[0, -1].argmax()))
    assert a == b == ids[len(prompt):]


def test_sampling_with_seed_is_reproducible(model):
    cfg = SamplingConfig(max_new_tokens=10, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    assert list(generate_tokens(model, [1, 3], cfg)) == list(generate_tokens(model, [1, 3], cfg))


def test_stop_string_cuts_output_and_stream(model, tok):
    cfg = SamplingConfig(max_new_tokens=40, temperature=0.0)
    full = generate_text(model, tok, "import json", cfg)
    assert len(full) > 4
    stop = full[2:4]
    streamed = []
    cut = generate_text(model, tok, "import json",
                        SamplingConfig(max_new_tokens=40, temperature=0.0, stop=[stop]),
                        stream=streamed.append)
    assert cut == full[: full.find(stop)]
    assert "".join(streamed) == cut


def test_generate_cli_end_to_end(tmp_path, model, tok, capsys):
    generate = script("generate")

    save_model(model, tmp_path / "ckpt", tokenizer_path=tok.path)
    generate.main(["--checkpoint", str(tmp_path / "ckpt"), "--prompt", "def f(x):\\n",
                   "--temperature", "0", "--max-new-tokens", "8"])
    out = capsys.readouterr()
    expected = generate_text(model, tok, "def f(x):\n",
                             SamplingConfig(max_new_tokens=8, temperature=0.0))
    assert out.out == "def f(x):\n" + expected + "\n"
    assert "prefill:" in out.err and "decode:" in out.err


def test_trace_prints_shapes(tmp_path, model, tok, capsys):
    generate = script("generate")

    save_model(model, tmp_path / "ckpt", tokenizer_path=tok.path)
    generate.main(["--checkpoint", str(tmp_path / "ckpt"), "--prompt", "x = 1", "--trace"])
    out = capsys.readouterr().out
    T = len(tok.encode("x = 1"))
    assert (f"layers.0.self_attn.k_proj                Linear       (1, {T}, 64) float32 "
            f"-> (1, {T}, 32) float32") in out
    assert (f"logits                                                "
            f"(1, {T}, {tok.vocab_size}) float32") in out


@pytest.mark.parametrize("split", [False, True], ids=["gemv", "split-gemv"])
def test_compiled_decode_step_matches_eager(model, split, request):
    # the GPU decode goal relies on torch.compile capturing decode_one_token whole
    # (static KV cache): fullgraph=True fails on any graph break, and the tokens must
    # equal the eager ones exactly. split: RowSplitLinear's CPU batch-1 path (bmm over 2
    # threads' row chunks) taken for every weight
    from minillm.generate.decode import decode_one_token
    from minillm.generate.fast_linear import use_row_split_linears

    if split:
        request.getfixturevalue("split_every_gemv")  # tests/conftest.py
        model = copy.deepcopy(model)
        use_row_split_linears(model)

    compiled = torch.compile(decode_one_token, fullgraph=True)
    cfg = SamplingConfig(max_new_tokens=10, temperature=0.0)
    eager = list(generate_tokens(model, [1, 5, 9], cfg))
    assert list(generate_tokens(model, [1, 5, 9], cfg, decode_fn=compiled)) == eager


def test_decode_rate_leaves_out_the_first_step():
    # with --compile the first decode step compiles (seconds): it is reported apart from tokens/s
    from minillm.generate.decode import GenerationStats

    stats = GenerationStats(prompt_tokens=4, new_tokens=5, prefill_seconds=0.5, decode_seconds=4.0,
                            first_step_seconds=3.0)
    assert stats.summary() == ("prefill: 4 tokens at 8.0 tok/s | decode: 5 tokens at 3.0 tok/s "
                               "(first step 3.00 s)")
    two = GenerationStats(prompt_tokens=4, new_tokens=2, prefill_seconds=0.5, decode_seconds=0.25,
                          first_step_seconds=0.25)
    assert two.summary() == "prefill: 4 tokens at 8.0 tok/s | decode: 2 tokens at 4.0 tok/s"


def test_generation_times_the_first_decode_step(model):
    from minillm.generate.decode import GenerationStats

    stats = GenerationStats()
    list(generate_tokens(model, [1, 5, 9], SamplingConfig(max_new_tokens=6, temperature=0.0),
                         stats=stats))
    assert stats.new_tokens == 6 and 0 < stats.first_step_seconds <= stats.decode_seconds


# --------------------------------------------------------------------------------------------------
# batched generation


def test_left_padded_prefill_matches_each_row_alone(model):
    # the per-row mask and RoPE positions: every row's logits equal its batch-1 prefill (fp32)
    from minillm.generate.batched import left_pad_prompts, row_args

    prompts = [[1, 5, 9, 42, 7, 3, 11], [1, 3], [1, 8, 8, 2, 4]]
    ids, pad = left_pad_prompts(prompts)
    assert pad.tolist() == [0, 5, 2] and ids[1].tolist() == [1, 1, 1, 1, 1, 1, 3]
    with torch.no_grad():
        model.setup_caches(batch_size=3, max_seq_len=16)
        pos = torch.arange(7)
        batch, _ = model(ids, input_pos=pos, **row_args(pos, pad, 16))  # (3, 7, V)
        for b, p in enumerate(prompts):
            model.setup_caches(batch_size=1, max_seq_len=16)
            alone, _ = model(torch.tensor([p]), input_pos=torch.arange(len(p)))
            torch.testing.assert_close(batch[b, 7 - len(p):], alone[0], atol=1e-5, rtol=1e-5)
    model.clear_caches()
    assert not batch.isnan().any()  # padding queries see only themselves: no all-masked row


def test_batched_greedy_equals_each_row_alone_with_eos_per_row(model):
    from minillm.generate.batched import generate_tokens_batch

    prompts = [[1, 5, 9, 42, 7, 3, 11], [1, 3], [1, 8, 8, 2, 4, 17, 6, 30, 12, 1, 9], [1, 77]]
    cfg = SamplingConfig(max_new_tokens=16, temperature=0.0)
    free = [list(generate_tokens(model, p, cfg)) for p in prompts]
    eos = free[0][5]  # a token row 0 reaches at step 5: rows now end at different steps
    alone = [list(generate_tokens(model, p, cfg, eos_id=eos)) for p in prompts]
    assert len({len(a) for a in alone}) > 1 and any(len(a) == 16 for a in alone)
    rows, ended = [[] for _ in prompts], []
    for row, tok in generate_tokens_batch(model, prompts, cfg, eos_id=eos):
        assert row not in ended  # nothing comes for a row after its end event
        if tok is None:
            ended.append(row)
        else:
            rows[row].append(tok)
    assert rows == alone and sorted(ended) == [0, 1, 2, 3]
    # in the order they finish (ties: row order)
    assert ended == sorted(range(4), key=lambda b: len(alone[b]))


def test_batched_text_stop_strings_and_on_done(model, tok):
    from minillm.generate.text import generate_text_batch

    prompts = ["import json", "def f(x):", "x"]
    cfg = SamplingConfig(max_new_tokens=20, temperature=0.0)
    full = [generate_text(model, tok, p, cfg) for p in prompts]
    stop = full[1][3:5]
    cfg_stop = SamplingConfig(max_new_tokens=20, temperature=0.0, stop=[stop])
    expected = [generate_text(model, tok, p, cfg_stop) for p in prompts]
    done = []
    outs = generate_text_batch(model, tok, prompts, cfg_stop,
                               on_done=lambda r, t: done.append((r, t)))
    assert outs == expected and sorted(done) == sorted(enumerate(expected))
    assert done[0] == (1, full[1][:full[1].find(stop)])  # the stopped row is reported first
    done = []
    assert generate_text_batch(model, tok, ["a", "bc"], SamplingConfig(max_new_tokens=0),
                               on_done=lambda r, t: done.append((r, t))) == ["", ""]
    assert done == [(0, ""), (1, "")]  # every row is reported, even when no step runs


def test_generate_cli_prompts_file(tmp_path, model, tok, capsys):
    generate = script("generate")

    save_model(model, tmp_path / "ckpt", tokenizer_path=tok.path)
    (tmp_path / "p.txt").write_text("import json\ndef f(x):\\n\n\n")  # blank lines are skipped
    (tmp_path / "p.jsonl").write_text('{"prompt": "import json"}\n{"prompt": "def f(x):\\n"}\n')
    cfg = SamplingConfig(max_new_tokens=6, temperature=0.0)
    expected = [generate_text(model, tok, p, cfg) for p in ("import json", "def f(x):\n")]
    for name in ("p.txt", "p.jsonl"):
        generate.main(["--checkpoint", str(tmp_path / "ckpt"), "--prompts", str(tmp_path / name),
                       "--temperature", "0", "--max-new-tokens", "6"])
        out = capsys.readouterr()
        for i, (p, e) in enumerate(zip(("import json", "def f(x):\n"), expected, strict=True)):
            assert f"=== [{i}] ===\n{p}{e}\n" in out.out
        assert "prompts 0..1 of 2 as one batch" in out.err and "decode:" in out.err
    # bounded batches: --batch-size 1 decodes the same answers one prompt at a time, in order
    generate.main(["--checkpoint", str(tmp_path / "ckpt"), "--prompts", str(tmp_path / "p.txt"),
                   "--temperature", "0", "--max-new-tokens", "6", "--batch-size", "1"])
    out = capsys.readouterr()
    pairs = zip(("import json", "def f(x):\n"), expected, strict=True)
    assert out.out == "".join(f"=== [{i}] ===\n{p}{e}\n" for i, (p, e) in enumerate(pairs))
    assert "prompts 0..0 of 2" in out.err and "prompts 1..1 of 2" in out.err


def test_generate_cli_unescapes_stop_strings_like_the_prompt(tmp_path, model, tok, monkeypatch):
    # issue 12: `--stop "\n\n"` arrives as backslash-n characters; it must mean two newlines
    generate = script("generate")

    seen = {}
    monkeypatch.setattr(generate, "generate_text",
                        lambda m, t, prompt, cfg, **kw: seen.update(cfg=cfg) or "")
    save_model(model, tmp_path / "ckpt", tokenizer_path=tok.path)
    generate.main(["--checkpoint", str(tmp_path / "ckpt"), "--prompt", "x", "--stop", "\\n\\n",
                   "--stop", "a\\tb"])
    assert seen["cfg"].stop == ["\n\n", "a\tb"]
    assert generate.unescape("a\\\\n") == "a\\n"  # an escaped backslash stays one backslash


def test_forward_with_input_pos_needs_the_caches(model):
    with pytest.raises(AssertionError, match="Caches must be initialized first"):
        model(torch.tensor([[1, 2]]), input_pos=torch.arange(2))
