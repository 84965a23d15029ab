"""Prompt templates: the one place that turns an instruction
(or a conversation) into the text a model sees.

Training data (instruct.py) and generation (`generate.py --template`) both call `format_prompt`, so
the prompt a fine-tuned model is queried with is byte for byte the prompt it was trained on.

Templates:

    none     the instruction as is (plus "\\n\\n" + input when there is one): plain completion
    alpaca   Stanford Alpaca's prompt, exactly as tloen/alpaca-lora's templates/alpaca.json:
             prompt_input    "Below is an instruction that describes a task, paired with an input
                             that provides further context. Write a response that appropriately
                             completes the request.\\n\\n### Instruction:\\n{instruction}\\n\\n
                             ### Input:\\n{input}\\n\\n### Response:\\n"
             prompt_no_input "Below is an instruction that describes a task. Write a response that
                             appropriately completes the request.\\n\\n### Instruction:\\n
                             {instruction}\\n\\n### Response:\\n"
             (https://github.com/tloen/alpaca-lora/blob/main/templates/alpaca.json)
    vicuna   multi-turn chat, FastChat's "vicuna_v1.1" conversation template (the format ShareGPT
             data was trained in by Vicuna, https://lmsys.org/blog/2023-03-30-vicuna/):
                 "{system} USER: {human_1} ASSISTANT: {gpt_1}</s>"
                 "USER: {human_2} ASSISTANT: {gpt_2}</s>"
             Chosen because it needs no new special tokens (LLaMA's vocabulary has only <s>, </s>,
             <unk>), so it works on any base checkpoint; "</s>" is the tokenizer's EOS id, never the
             literal text.
    chatml   OpenAI's ChatML, as Qwen2 and SmolLM2 use it, for models that ship no template (their
             vocabulary should hold <|im_start|> and <|im_end|>, e.g. via finetune.new_tokens):
                 "<|im_start|>{role}\n{content}<|im_end|>\n" per message, then
                 "<|im_start|>assistant\n"
             It is Jinja only (CHATML_JINJA), rendered and masked like a model's own template
             (chat_template.py): the answer and its <|im_end|> are trained.

The response is never part of a template: it is appended after the prompt (with EOS), so that the
prompt's tokens at training time are exactly the tokens `generate` is given (see instruct.py, where
each segment is tokenized on its own).
"""

from __future__ import annotations

import json
from pathlib import Path

from minillm.data.chat_template import JinjaTemplate, render_chat_template, template_token_ids
from minillm.util.fileio import atomic_write_bytes, read_json_object

TEMPLATES = ("none", "alpaca", "vicuna", "chatml")

ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that "
    "provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
VICUNA_USER, VICUNA_ASSISTANT = "USER:", "ASSISTANT:"


def _check(template_name: str):
    if template_name not in TEMPLATES:
        raise ValueError(f"unknown template {template_name!r}; expected one of {list(TEMPLATES)}")


def format_prompt(template_name: str, instruction: str, input: str | None = None) -> str:
    """The prompt text for one instruction (+ optional input) in `template_name`; the model's answer
    follows it directly. An empty input counts as no input (as in alpaca-lora)."""
    _check(template_name)
    if template_name == "chatml":
        user = f"{instruction}\n\n{input}" if input else instruction
        return render_chat_template(CHATML_JINJA, [{"role": "user", "content": user}])
    if template_name == "alpaca":
        if input:
            return ALPACA_PROMPT_INPUT.format(instruction=instruction, input=input)
        return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
    user = f"{instruction}\n\n{input}" if input else instruction
    if template_name == "vicuna":
        return f"{VICUNA_SYSTEM} {VICUNA_USER} {user} {VICUNA_ASSISTANT}"
    return user


def conversation_segments(turns: list[tuple[str, str]], template_name: str = "vicuna",
                          system: str | None = None) -> list[tuple[str, bool]]:
    """A conversation [(role, text)], roles alternating "human", "gpt" (human first, gpt last), →
    the segments [(text, is_response)] to tokenize one by one; an EOS follows every response
    segment.

    Vicuna v1.1: "{system} USER: {h1} ASSISTANT:" | "{g1}" </s> |
                 "USER: {h2} ASSISTANT:" | "{g2}" </s>
    The response text carries no leading space: SentencePiece's dummy prefix supplies it ("▁Paris").
    """
    if template_name != "vicuna":
        raise ValueError("conversations need the multi-turn template 'vicuna', "
                         f"found {template_name!r}")
    system = VICUNA_SYSTEM if system is None else system
    segments = []
    for i, (role, text) in enumerate(turns):
        if role == "human":
            head = f"{system} " if i == 0 and system else ""
            segments.append((f"{head}{VICUNA_USER} {text} {VICUNA_ASSISTANT}", False))
        elif role == "gpt":
            segments.append((text, True))
        else:
            raise ValueError(f"conversation turn {i}: role {role!r}; expected 'human' or 'gpt'")
    return segments


# --------------------------------------------------------------------------------------------------
# Chat: the same templates over a list of messages,
# as Jinja for llama.cpp / transformers and in Python
#
# A chat template turns [{"role": "system" | "user" | "assistant", "content": str}, …] into one
# string. HF's tokenizer_config.json "chat_template" and GGUF's `tokenizer.chat_template` hold it as
# Jinja, which transformers' `apply_chat_template` and llama.cpp render with `messages`,
# `add_generation_prompt`, `bos_token` and `eos_token`. The Jinja below is built from the same
# constants as `format_prompt`, and `render_chat` is its Python twin (tests pin both to the same
# strings).
#
# Training tokenizes each segment on its own, so every response gets SentencePiece's dummy-prefix
# "▁"; the single-string form writes that as a space before the response. llama.cpp re-adds the
# space prefix after every special token (</s>), so tokenizing the rendered string with special
# tokens parsed gives exactly the training token ids (`chat_token_ids`; see
# tests/test_templates.py).
#
#     alpaca   <s>{alpaca prompt, no input}### Response:\n {answer}</s>
#              {next alpaca prompt}…### Response:\n
#     vicuna   <s>{system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT:

CHAT_TEMPLATES = ("alpaca", "vicuna", "chatml")
# {"template": name}, written beside a fine-tuned model / adapter
TEMPLATE_RECORD = "prompt_template.json"

# tail "\n\n### Response:\n"
_ALPACA_HEAD, _ALPACA_TAIL = ALPACA_PROMPT_NO_INPUT.split("{instruction}")
_ALPACA_SEP, _ALPACA_RESPONSE = "\n\n", "### Response:\n"
assert _ALPACA_TAIL == _ALPACA_SEP + _ALPACA_RESPONSE


def _lit(s: str) -> str:
    """A Jinja string literal for s (double-quoted; backslash, quote and newline escaped)."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _alternation_check(name: str) -> str:
    return ("{%- if m['role'] != ('user' if loop.index0 % 2 == 0 else 'assistant') -%}"
            "{{ raise_exception("
            + _lit(f"{name}: roles must alternate user, assistant, user, …") + ") }}"
            "{%- endif -%}")


ALPACA_JINJA = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{ raise_exception('alpaca: the template has no system message') }}"
    "{%- endif -%}"
    "{{ bos_token }}"
    "{%- for m in messages -%}"
    + _alternation_check("alpaca") +
    "{%- if m['role'] == 'user' -%}"
    "{{ " + _lit(_ALPACA_HEAD) + " + m['content'] + " + _lit(_ALPACA_SEP) + " }}"
    "{%- else -%}"
    "{{ " + _lit(_ALPACA_RESPONSE + " ") + " + m['content'] + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ " + _lit(_ALPACA_RESPONSE) + " }}{%- endif -%}"
)

VICUNA_JINJA = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system = " + _lit(VICUNA_SYSTEM) + " -%}{%- set turns = messages -%}"
    "{%- endif -%}"
    "{{ bos_token }}"
    "{%- if system -%}{{ system + ' ' }}{%- endif -%}"
    "{%- for m in turns -%}"
    + _alternation_check("vicuna") +
    "{%- if m['role'] == 'user' -%}"
    "{{ " + _lit(VICUNA_USER + " ") + " + m['content'] }}"
    "{%- else -%}"
    "{{ " + _lit(f" {VICUNA_ASSISTANT} ") + " + m['content'] + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ " + _lit(f" {VICUNA_ASSISTANT}") + " }}{%- endif -%}"
)

CHATML_JINJA = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

JINJA = {"alpaca": ALPACA_JINJA, "vicuna": VICUNA_JINJA, "chatml": CHATML_JINJA}


def as_jinja(template) -> JinjaTemplate | None:
    """The Jinja form a template is rendered and masked by (a model's own, or ChatML), or None for
    the built-ins written in Python here (alpaca, vicuna, none)."""
    if isinstance(template, JinjaTemplate):
        return template
    return JinjaTemplate(CHATML_JINJA, "chatml") if template == "chatml" else None


def _split_system(template_name: str, messages: list[dict]) -> tuple[str | None, list[dict]]:
    """(system text or None, the alternating user/assistant turns),
    checked as the Jinja checks them."""
    if template_name not in CHAT_TEMPLATES:
        raise ValueError(f"template {template_name!r} has no chat form; "
                         f"expected one of {list(CHAT_TEMPLATES)}")
    system = None
    if messages and messages[0]["role"] == "system":
        if template_name == "alpaca":
            raise ValueError("alpaca: the template has no system message")
        system, messages = messages[0]["content"], messages[1:]
    for i, m in enumerate(messages):
        if m["role"] != ("user" if i % 2 == 0 else "assistant"):
            raise ValueError(f"{template_name}: roles must alternate user, assistant, user, …; "
                             f"message {i} (after any system message) has role {m['role']!r}")
    return system, messages


def render_chat(template_name: str, messages: list[dict], add_generation_prompt: bool = True,
                bos_token: str = "<s>", eos_token: str = "</s>") -> str:
    """The string JINJA[template_name] renders for these messages (the Python twin of the Jinja;
    a Jinja template is rendered itself)."""
    if (jinja := as_jinja(template_name)) is not None:
        return render_chat_template(jinja.source, messages, add_generation_prompt, bos_token,
                                    eos_token, jinja.where)
    system, turns = _split_system(template_name, messages)
    out = bos_token
    if template_name == "vicuna":
        system = VICUNA_SYSTEM if system is None else system
        out += f"{system} " if system else ""
    for m in turns:
        if template_name == "alpaca":
            out += (_ALPACA_HEAD + m["content"] + _ALPACA_SEP if m["role"] == "user"
                    else _ALPACA_RESPONSE + " " + m["content"] + eos_token)
        else:
            out += (f"{VICUNA_USER} {m['content']}" if m["role"] == "user"
                    else f" {VICUNA_ASSISTANT} {m['content']}{eos_token}")
    if add_generation_prompt:
        out += _ALPACA_RESPONSE if template_name == "alpaca" else f" {VICUNA_ASSISTANT}"
    return out


def chat_segments(template_name: str, messages: list[dict]) -> list[tuple[str, bool]]:
    """A conversation ending with a user message → [(text, is_response)] exactly as training
    segments it (format_prompt per user turn for alpaca, conversation_segments for vicuna), ready
    for the answer."""
    system, turns = _split_system(template_name, messages)
    if not turns or turns[-1]["role"] != "user":
        raise ValueError(f"{template_name}: a chat prompt must end with a user message")
    if template_name == "vicuna":
        roles = {"user": "human", "assistant": "gpt"}
        return conversation_segments([(roles[m["role"]], m["content"]) for m in turns], "vicuna",
                                     system)
    return [(format_prompt("alpaca", m["content"]), False) if m["role"] == "user"
            else (m["content"], True)
            for m in turns]


def chat_token_ids(tokenizer, template_name, messages: list[dict]) -> list[int]:
    """BOS + each segment tokenized on its own, EOS after every response: the ids training saw. A
    Jinja template (a model's own, ChatML) gives its rendering's ids, the generation prompt last
    (chat_template.template_token_ids), as training tokenized it too."""
    if (jinja := as_jinja(template_name)) is not None:
        return template_token_ids(tokenizer, jinja.source, messages, True, jinja.where)[0]
    ids = [tokenizer.bos_id]
    for text, is_response in chat_segments(template_name, messages):
        ids += tokenizer.encode(text, bos=False, eos=is_response)
    return ids


def trained_template(configured: str, kinds) -> str | None:
    """The template an instruction run trained with: `configured` if set, else the natural one of
    the examples' kind (alpaca → alpaca, sharegpt → vicuna, as instruct.example_segments picks);
    None for plain-completion data or a mix of kinds that trained with different templates."""
    if configured:
        return configured
    found = {{"alpaca": "alpaca", "sharegpt": "vicuna"}.get(k) for k in kinds}
    return found.pop() if len(found) == 1 else None


def write_template_record(dirpath, template):
    """Record the template a model was fine-tuned with, so export, adapters and
    `generate.py --chat` use it: {"template": name}, or for Jinja (a model's own)
    {"template": "jinja", "chat_template": source}."""
    if isinstance(template, JinjaTemplate):
        record = {"template": "jinja", "chat_template": template.source}
    else:
        _check(template)
        record = {"template": template}
    atomic_write_bytes(Path(dirpath) / TEMPLATE_RECORD, (json.dumps(record) + "\n").encode())


def read_template_record(*dirs) -> str | JinjaTemplate | None:
    """The template recorded in the first of `dirs` that holds a prompt_template.json (a name or a
    JinjaTemplate), or None."""
    for d in dirs:
        path = Path(d) / TEMPLATE_RECORD if d is not None else None
        if path is not None and path.is_file():
            record = read_json_object(path, "prompt template record")
            name = record.get("template")
            if name == "jinja" and isinstance(record.get("chat_template"), str):
                return JinjaTemplate(record["chat_template"], f"{path}: chat_template")
            if name not in TEMPLATES:
                raise ValueError(f"{path}: template {name!r} is not one of "
                                 f"{[*TEMPLATES, 'jinja']} (jinja with a chat_template string)")
            return name
    return None
