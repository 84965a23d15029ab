"""A model's own chat template (data/chat_template.py): rendered as transformers renders it (the
strings bench/peer_chat_template_check.py pinned from transformers, no peer needed here), read from
every file a checkpoint ships it in, masked for training, and sandboxed against hostile templates.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from minillm.data.chat_template import (
    load_chat_template,
    render_chat_template,
    template_segments,
)

GOLDEN = json.loads((Path(__file__).parent / "data" / "chat_template_goldens.json").read_text())
TEMPLATES, CONVERSATIONS = GOLDEN["templates"], GOLDEN["conversations"]


@pytest.mark.parametrize("row", GOLDEN["rendered"],
                         ids=lambda r: f"{r['template']}-{r['conversation']}-"
                                       f"{'gen' if r['add_generation_prompt'] else 'nogen'}")
def test_renders_as_transformers(row):
    t = TEMPLATES[row["template"]]
    got = render_chat_template(t["source"], CONVERSATIONS[row["conversation"]],
                               row["add_generation_prompt"], t["bos_token"], t["eos_token"])
    assert got == row["rendered"]


def test_raise_exception_is_one_line():
    t = TEMPLATES["mistral"]
    with pytest.raises(ValueError, match=r"^mistral: TemplateError: Conversation roles must "
                                         r"alternate user/assistant/user/assistant/...$"):
        render_chat_template(t["source"], [{"role": "assistant", "content": "x"}], where="mistral")


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.system('echo pwned') }}",
    "{{ messages.__class__ }}",
    "{{ open('/etc/passwd').read() }}",
    "{% import 'os' as os %}{{ os }}",
    "{{ namespace(_secret=1) }}",
    "{{ raise_exception.__globals__ }}",
    "{{ messages.append(1) }}",  # immutable sandbox: no mutation of what it is given
    "{% for m in messages %}",  # a syntax error
])
def test_hostile_templates_execute_nothing(source, tmp_path):
    with pytest.raises(ValueError) as e:
        render_chat_template(source, [{"role": "user", "content": "hi"}], where="t.jinja")
    assert str(e.value).startswith("t.jinja: ") and "\n" not in str(e.value)


def test_huge_output_is_cut():
    for source in ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
                   "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}"
                   "{% endfor %}"):
        with pytest.raises(ValueError, match=r"^t: the rendered prompt exceeds 1000000 "
                                             r"characters \(cut off\)$"):
            render_chat_template(source, [], where="t", max_chars=1_000_000)


def test_generation_tags_render_their_body():
    source = ("{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}"
              "{{ m.content }}!{% endgeneration %}{% else %}{{ m.content }}|{% endif %}"
              "{% endfor %}")
    got = render_chat_template(source, [{"role": "user", "content": "q"},
                                        {"role": "assistant", "content": "a"}])
    assert got == "q|a!"


def test_segments_train_the_assistant_turns_only():
    t = TEMPLATES["smollm2"]
    messages = CONVERSATIONS["multi-turn"][:4]
    segments = template_segments(t["source"], messages, t["bos_token"], t["eos_token"])
    assert segments == [
        ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
         "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False),
        ("Hello!<|im_end|>", True),
        ("\n<|im_start|>user\nAnd \"3+3\"? It's\n\tsix?<|im_end|>\n<|im_start|>assistant\n", False),
        ("6.<|im_end|>", True),
        ("\n", False)]
    full = render_chat_template(t["source"], messages, False, t["bos_token"], t["eos_token"])
    assert "".join(text for text, _ in segments) == full
    llama3 = TEMPLATES["llama3"]
    trained = [text for text, is_trained in template_segments(
        llama3["source"], messages, llama3["bos_token"], llama3["eos_token"]) if is_trained]
    assert trained == ["Hello!<|eot_id|>", "6.<|eot_id|>"]


def test_a_template_that_rewrites_earlier_turns_is_refused():
    # shows the number of messages at the top: every prefix renders a different start
    source = "{{ messages | length }}{% for m in messages %}{{ m.content }}{% endfor %}"
    with pytest.raises(ValueError, match=r"^t: the template does not render the conversation "
                                         r"prefix by prefix \(message 1"):
        template_segments(source, CONVERSATIONS["multi-turn"][:2], where="t")


def test_load_from_every_file(tmp_path):
    assert load_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "A"}))
    assert load_chat_template(tmp_path) == "A"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}))
    assert load_chat_template(tmp_path) == "D"
    (tmp_path / "chat_template.jinja").write_text("J")  # transformers 5's file comes first
    assert load_chat_template(tmp_path) == "J"
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "T"}]}))
    with pytest.raises(ValueError, match=r"tokenizer_config.json: chat_template is a list "
                                         r"without a 'default' template \(names: \['tool_use'\]\)"):
        load_chat_template(tmp_path)


def test_load_from_the_real_gguf():
    from real_model import smollm2_gguf

    assert load_chat_template(smollm2_gguf()) == TEMPLATES["smollm2"]["source"]


# --------------------------------------------------------------------------------------------------
# the template in training, chat and export


class CharTokenizer:
    """One id per character (ord), and ChatML's two markers as whole tokens: exact ids to assert
    on. (The byte-level BPE tokenizer parses added tokens the same way.)"""

    bos_id, eos_id = 1, 2
    pieces = {1: "<|im_start|>", 2: "<|im_end|>"}

    def id_to_piece(self, i):
        return self.pieces[i]

    def encode(self, text, bos=True, eos=False):
        ids, rest = [], text
        while rest:
            hit = next((i for i, p in self.pieces.items() if rest.startswith(p)), None)
            ids.append(hit if hit is not None else ord(rest[0]))
            rest = rest[len(self.pieces[hit]) if hit is not None else 1:]
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids):
        return "".join(self.pieces.get(i) or chr(i) for i in ids)


def test_training_on_a_model_template_trains_the_answer_and_its_end():
    from minillm.data.chat_template import JinjaTemplate
    from minillm.data.instruct import IGNORE, Example, tokenize_example

    tok, t = CharTokenizer(), TEMPLATES["smollm2"]

    ex = Example("alpaca", "x:1", instruction="What is 2+2?", output="4.")
    got = tokenize_example(ex, tok, JinjaTemplate(t["source"]), 512)
    assert tok.decode(got.ids) == render_chat_template(
        t["source"], [{"role": "user", "content": "What is 2+2?"},
                      {"role": "assistant", "content": "4."}], False, t["bos_token"],
        t["eos_token"])
    assert tok.decode([i for i in got.labels if i != IGNORE]) == "4.<|im_end|>"
    chatml = tokenize_example(ex, tok, "chatml", 512)  # the built-in: no system turn
    assert tok.decode(chatml.ids) == ("<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                                      "<|im_start|>assistant\n4.<|im_end|>\n")
    assert tok.decode([i for i in chatml.labels if i != IGNORE]) == "4.<|im_end|>"


def test_chat_ids_end_with_the_generation_prompt():
    from minillm.data.chat_template import JinjaTemplate
    from minillm.data.templates import chat_token_ids

    tok, t = CharTokenizer(), TEMPLATES["smollm2"]
    messages = CONVERSATIONS["multi-turn"]
    ids = chat_token_ids(tok, JinjaTemplate(t["source"]), messages)
    assert tok.decode(ids) == render_chat_template(t["source"], messages, True, t["bos_token"],
                                                   t["eos_token"])
    # <|im_start|> opens the system turn, the five messages and the generation prompt
    assert ids[-2:] == [ord("t"), ord("\n")] and ids.count(1) == 7


def test_the_record_keeps_a_model_template(tmp_path):
    from minillm.data.chat_template import JinjaTemplate
    from minillm.data.templates import read_template_record, write_template_record

    write_template_record(tmp_path, JinjaTemplate(TEMPLATES["qwen2"]["source"]))
    got = read_template_record(tmp_path)
    assert isinstance(got, JinjaTemplate) and got.source == TEMPLATES["qwen2"]["source"]


def test_export_ships_the_checkpoints_own_template(tmp_path):
    from minillm.ship.convert import ExportConfig, chat_template

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": TEMPLATES["llama3"]["source"]}))
    cfg = ExportConfig(checkpoint=str(tmp_path), out=str(tmp_path / "x.gguf"))
    assert chat_template(cfg) == TEMPLATES["llama3"]["source"]
    cfg = ExportConfig(checkpoint=str(tmp_path), out=str(tmp_path / "x.gguf"), template="vicuna")
    assert chat_template(cfg).startswith("{%- if messages and messages[0]['role'] == 'system'")
