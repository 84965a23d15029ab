"""generate.py --chat: each turn feeds the model exactly the training token ids of the conversation
so far, and the answer is what greedy decoding from those ids gives, cut at EOS."""

import dataclasses
import io
import json
import sys

import pytest
from tiny import script, tiny_tokenizer, write_hf_checkpoint

from minillm import Llama
from minillm.config import ModelConfig
from minillm.data.templates import chat_token_ids, write_template_record
from minillm.generate import chat as chat_module
from minillm.generate.chat import chat_loop, fit_context, reply
from minillm.generate.decode import generate_tokens
from minillm.generate.sampling import SamplingConfig

generate_cli = script("generate")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat")
    tok = tiny_tokenizer(d / "tokenizer.model")
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128,
                      vocab_size=tok.vocab_size, max_seq_len=256)
    write_hf_checkpoint(d, cfg, seed=3, fmt="safetensors", tokenizer=tok)
    return d, tok, Llama.from_pretrained(d).eval()


GREEDY = SamplingConfig(max_new_tokens=12, temperature=0.0, seed=0)


@pytest.mark.parametrize("template", ["alpaca", "vicuna"])
def test_reply_is_greedy_decoding_of_the_training_ids(tiny, template):
    _, tok, model = tiny
    messages = [{"role": "user", "content": "def f(x):"}]
    want = list(generate_tokens(model, chat_token_ids(tok, template, messages), GREEDY,
                                eos_id=tok.eos_id))
    pieces = []
    got = reply(model, tok, template, messages, GREEDY, stream=pieces.append)
    assert got == "".join(pieces) == tok.decode(want)


def test_chat_loop_carries_the_conversation(tiny, monkeypatch):
    _, tok, model = tiny
    lines = iter(["import os", "return x", ""])
    seen_ids = []  # the ids each turn decodes from
    real = chat_module.generate_text

    def spy(model, tokenizer, ids, *args, **kwargs):
        seen_ids.append(list(ids))
        return real(model, tokenizer, ids, *args, **kwargs)

    monkeypatch.setattr(chat_module, "generate_text", spy)
    out = []
    messages = chat_loop(model, tok, "vicuna", GREEDY, read=lambda _: next(lines), write=out.append)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    # turn 2's ids start with turn 1's ids, then the first answer's ids and an EOS
    first = seen_ids[0] + tok.encode(messages[1]["content"], bos=False, eos=True)
    assert seen_ids[1][:len(first)] == first
    assert "".join(out) == messages[1]["content"] + "\n" + messages[3]["content"] + "\n"


def test_a_full_context_drops_the_oldest_exchanges_and_says_so(tiny):
    _, tok, model = tiny
    n_tokens = lambda msgs: len(chat_token_ids(tok, "vicuna", msgs))
    system = {"role": "system", "content": "Be brief."}
    turns = [{"role": r, "content": f"{r} message number {i}"}
             for i in range(6) for r in ("user", "assistant")][:-1]  # ends with a user message
    fits = n_tokens([system] + turns[-3:]) + 10  # room for the last exchange and the question
    kept, dropped = fit_context([system] + turns, n_tokens, room=10, max_seq_len=fits)
    assert kept == [system] + turns[-3:] and dropped == 4
    with pytest.raises(ValueError, match="this message takes .* tokens of the model's 20"):
        fit_context([{"role": "user", "content": "x " * 50}], n_tokens, room=10, max_seq_len=20)
    # in the loop: the note, and the session goes on (a too-long message is refused alone)
    question = "word " * 10
    one = n_tokens([{"role": "user", "content": question}])
    limit = one + GREEDY.max_new_tokens + 8  # one exchange fits; a second question does not
    small = Llama(dataclasses.replace(model.config, max_seq_len=limit)).eval()
    small.load_state_dict(model.state_dict())
    lines = iter([question, question, "word " * 300, question, ""])
    out = []
    messages = chat_loop(small, tok, "vicuna", GREEDY, read=lambda _: next(lines),
                         write=out.append)
    text = "".join(out)
    assert "dropped the oldest 1 exchange(s)" in text and f"tokens of the model's {limit}" in text
    assert [m["role"] for m in messages] == ["user", "assistant"]  # the last exchange only


def test_generate_cli_chat_uses_the_recorded_template(tiny, tmp_path, monkeypatch, capsys):
    d, tok, model = tiny
    monkeypatch.setattr(sys, "stdin", io.StringIO("def f(x):\n\n"))
    with pytest.raises(SystemExit):  # nothing recorded and no --template: a one-line usage error
        generate_cli.main(["--checkpoint", str(d), "--chat", "--device", "cpu"])
    assert "--chat needs a chat template" in capsys.readouterr().err
    write_template_record(d, "alpaca")
    monkeypatch.setattr(sys, "stdin", io.StringIO("def f(x):\n\n"))
    generate_cli.main(["--checkpoint", str(d), "--chat", "--temperature", "0",
                       "--max-new-tokens", "12", "--device", "cpu", "--dtype", "float32"])
    want = reply(model, tok, "alpaca", [{"role": "user", "content": "def f(x):"}], GREEDY)
    assert want and capsys.readouterr().out == "> " + want + "\n> "  # input()'s prompts, the answer


def test_generate_cli_chat_uses_the_models_own_template(tiny, tmp_path, monkeypatch, capsys):
    # an HF directory that ships a chat template (tokenizer_config.json) and records none: --chat
    # talks in it, feeding exactly its rendering's ids
    import shutil

    from minillm.data.chat_template import JinjaTemplate
    from minillm.data.templates import CHATML_JINJA

    d, tok, model = tiny
    own = tmp_path / "own"
    shutil.copytree(d, own, ignore=shutil.ignore_patterns("prompt_template.json"))
    (own / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML_JINJA}))
    monkeypatch.setattr(sys, "stdin", io.StringIO("def f(x):\n\n"))
    generate_cli.main(["--checkpoint", str(own), "--chat", "--temperature", "0",
                       "--max-new-tokens", "12", "--device", "cpu", "--dtype", "float32"])
    messages = [{"role": "user", "content": "def f(x):"}]
    want = reply(model, tok, JinjaTemplate(CHATML_JINJA), messages, GREEDY)
    assert capsys.readouterr().out == "> " + want + "\n> "
    # the conversation so far, then the generation prompt, each encoded on its own (no BOS: the
    # template writes none)
    ids = chat_token_ids(tok, JinjaTemplate(CHATML_JINJA), messages)
    assert ids == (tok.encode("<|im_start|>user\ndef f(x):<|im_end|>\n", bos=False)
                   + tok.encode("<|im_start|>assistant\n", bos=False))
