"""Chat templates: the Jinja (data, for llama.cpp and transformers) and our Python
renderer give the same pinned strings; tokenizing that string the way llama.cpp does
gives exactly the ids training saw."""

import jinja2
import jinja2.sandbox
import pytest
from tiny import tiny_tokenizer

from minillm.data.templates import (
    JINJA,
    chat_segments,
    chat_token_ids,
    read_template_record,
    render_chat,
    trained_template,
    write_template_record,
)

CHAT = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And \"3+3\"? It's\nsix?"},
]
ALPACA_HEAD = ("Below is an instruction that describes a task. Write a response that appropriately "
               "completes the request.\n\n### Instruction:\n")
VICUNA_SYS = ("A chat between a curious user and an artificial intelligence assistant. The "
              "assistant gives helpful, detailed, and polite answers to the user's questions.")
EXPECTED = {
    "alpaca": ("<s>" + ALPACA_HEAD + "What is 2+2?\n\n### Response:\n 4</s>"
               + ALPACA_HEAD + "And \"3+3\"? It's\nsix?\n\n### Response:\n"),
    "vicuna": ("<s>" + VICUNA_SYS + " USER: What is 2+2? ASSISTANT: 4</s>"
                                    "USER: And \"3+3\"? It's\nsix? ASSISTANT:"),
}


def jinja_render(template: str, messages, add_generation_prompt=True, bos="<s>", eos="</s>") -> str:
    """transformers' way: a sandboxed environment with
    trim_blocks/lstrip_blocks and raise_exception."""
    def raise_exception(msg):
        raise jinja2.exceptions.TemplateError(msg)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages,
                                            add_generation_prompt=add_generation_prompt,
                                            bos_token=bos, eos_token=eos)


@pytest.mark.parametrize("name", ["alpaca", "vicuna"])
def test_python_and_jinja_render_the_pinned_string(name):
    assert render_chat(name, CHAT) == EXPECTED[name]
    assert jinja_render(JINJA[name], CHAT) == EXPECTED[name]
    # without the generation prompt, and with other special-token spellings, both still agree
    for kw in ({"add_generation_prompt": False}, {"bos_token": "", "eos_token": "<|end|>"}):
        jkw = {"add_generation_prompt": kw.get("add_generation_prompt", True),
               "bos": kw.get("bos_token", "<s>"), "eos": kw.get("eos_token", "</s>")}
        assert render_chat(name, CHAT, **kw) == jinja_render(JINJA[name], CHAT, **jkw)
    assert render_chat(name, CHAT, add_generation_prompt=False) == EXPECTED[name].removesuffix(
        "### Response:\n" if name == "alpaca" else " ASSISTANT:")


def test_vicuna_system_message_replaces_the_default():
    msgs = [{"role": "system", "content": "Be terse."}] + CHAT[:1]
    want = "<s>Be terse. USER: What is 2+2? ASSISTANT:"
    assert render_chat("vicuna", msgs) == jinja_render(JINJA["vicuna"], msgs) == want
    # an empty system message: no system text at all, as conversation_segments
    msgs[0]["content"] = ""
    assert (render_chat("vicuna", msgs) == jinja_render(JINJA["vicuna"], msgs)
            == "<s>USER: What is 2+2? ASSISTANT:")


@pytest.mark.parametrize("name,messages,match", [
    ("alpaca", [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}],
     "no system message"),
    ("vicuna", [{"role": "assistant", "content": "x"}], "roles must alternate"),
    ("vicuna", [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}],
     "roles must alternate"),
    ("alpaca", [{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}],
     "roles must alternate"),
])
def test_bad_conversations_fail_in_both(name, messages, match):
    with pytest.raises(ValueError, match=match):
        render_chat(name, messages)
    with pytest.raises(jinja2.exceptions.TemplateError, match=match):
        jinja_render(JINJA[name], messages)


def llama_cpp_tokenize(tok, text: str) -> list[int]:
    """llama.cpp's SPM tokenization with special tokens parsed: <s> / </s> become their
    ids, and each text fragment gets the dummy-prefix space when it follows a special
    token (llama-vocab.cpp)."""
    ids, rest = [], text
    while rest:
        cuts = [(rest.find(s), s) for s in ("<s>", "</s>") if rest.find(s) >= 0]
        at, special = min(cuts) if cuts else (len(rest), None)
        if at:
            # SentencePiece adds the dummy prefix to every fragment
            ids += tok.encode(rest[:at], bos=False)
        if special is None:
            break
        ids.append(tok.bos_id if special == "<s>" else tok.eos_id)
        rest = rest[at + len(special):]
    return ids


@pytest.mark.parametrize("name", ["alpaca", "vicuna"])
def test_rendered_string_tokenizes_to_the_training_ids(tmp_path, name):
    tok = tiny_tokenizer(tmp_path / "tokenizer.model", vocab_size=384)
    ids = chat_token_ids(tok, name, CHAT)
    assert ids == llama_cpp_tokenize(tok, render_chat(name, CHAT))
    assert ids[0] == tok.bos_id and ids.count(tok.eos_id) == 1  # one finished answer so far


def test_chat_segments_match_training_segments():
    assert chat_segments("vicuna", CHAT) == [
        (VICUNA_SYS + " USER: What is 2+2? ASSISTANT:", False), ("4", True),
        ("USER: And \"3+3\"? It's\nsix? ASSISTANT:", False)]
    assert (chat_segments("alpaca", CHAT[:1])
            == [(ALPACA_HEAD + "What is 2+2?\n\n### Response:\n", False)])
    with pytest.raises(ValueError, match="must end with a user message"):
        chat_segments("alpaca", CHAT[:2])
    with pytest.raises(ValueError, match="has no chat form"):
        render_chat("none", CHAT)


def test_trained_template_and_record(tmp_path):
    assert trained_template("", ["alpaca", "alpaca"]) == "alpaca"
    assert trained_template("", ["sharegpt"]) == "vicuna"
    assert trained_template("vicuna", ["alpaca"]) == "vicuna"
    assert trained_template("", ["alpaca", "sharegpt"]) is None
    assert trained_template("", ["completion"]) is None
    assert read_template_record(tmp_path) is None
    write_template_record(tmp_path, "vicuna")
    assert read_template_record(tmp_path / "missing", tmp_path) == "vicuna"
    (tmp_path / "prompt_template.json").write_text('{"template": "chatml2"}')
    with pytest.raises(ValueError, match="prompt_template.json: template 'chatml2' is not one of"):
        read_template_record(tmp_path)
