"""Throwaway peer check: transformers renders model chat templates; the strings are pinned in
tests/data/chat_template_goldens.json, which tests/test_chat_template.py compares with minillm's
renderer (data/chat_template.py) where no peer is needed.

    python3 run.py download smollm2-135m-instruct
    /work/peers/venv/bin/python bench/peer_chat_template_check.py      # transformers 5.x

The renderer is transformers' own, `render_jinja_template` (what `apply_chat_template(...,
tokenize=False)` calls), given bos_token / eos_token as the tokenizer passes them. The templates:
SmolLM2's (read from the GGUF by the gguf package), and inline those of Llama 3 Instruct, Qwen2
Instruct, Mistral Instruct v0.2 and a tool-style template using tojson, namespace and loop
controls. Not a test: transformers is not a dependency of minillm.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import transformers
from transformers.utils.chat_template_utils import render_jinja_template

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "chat_template_goldens.json"
CACHE = Path(os.environ.get("MINILLM_CACHE") or Path.home() / ".cache" / "minillm")
SMOLLM2 = CACHE / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim "
    "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
QWEN2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant "
    "roles are supported!') }}{% endif %}{% endfor %}")
TOOLISH = (
    "{%- set ns = namespace(n=0, sys='') -%}\n"
    "{%- for m in messages -%}\n"
    "  {%- if m.role == 'system' %}{% set ns.sys = m.content %}{% continue %}{% endif -%}\n"
    "  {%- set ns.n = ns.n + 1 -%}\n"
    "  {%- if ns.n > 3 %}{% break %}{% endif %}\n"
    "<{{ m.role }} n={{ ns.n }} meta={{ {'len': m.content | length, 'q': '\"<&>é'} | tojson }}>\n"
    "    {{ m.content }}\n"
    "{% endfor %}\n"
    "{%- if ns.sys %}[system: {{ ns.sys | tojson(indent=2) }}]{% endif %}\n"
    "{%- if add_generation_prompt %}<assistant>{% endif %}")

TEMPLATES = {  # name: (source, bos_token, eos_token)
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>"),
    "qwen2": (QWEN2, "", "<|im_end|>"),
    "mistral": (MISTRAL, "<s>", "</s>"),
    "toolish": (TOOLISH, "<s>", "</s>"),
}
CONVERSATIONS = {
    "one turn": [{"role": "user", "content": "What is 2+2?"}],
    "system": [{"role": "system", "content": "Be terse."},
               {"role": "user", "content": "  Name a prime.\n"}],
    "multi-turn": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                   {"role": "user", "content": "And \"3+3\"? It's\n\tsix?"},
                   {"role": "assistant", "content": "6."}, {"role": "user", "content": "ok"}],
}


def main():
    reader = gguf.GGUFReader(SMOLLM2)
    field = reader.fields["tokenizer.chat_template"]
    smollm2 = bytes(field.parts[field.data[0]]).decode()
    templates = {"smollm2": (smollm2, "<|im_start|>", "<|im_end|>"), **TEMPLATES}
    rows = []
    for name, (source, bos, eos) in templates.items():
        for conv, messages in CONVERSATIONS.items():
            if name == "mistral" and messages[0]["role"] == "system":
                continue  # refused by the template itself (checked in the tests)
            for gen in (True, False):
                text = render_jinja_template([messages], chat_template=source,
                                             add_generation_prompt=gen, bos_token=bos,
                                             eos_token=eos)[0][0]
                rows.append({"template": name, "conversation": conv, "add_generation_prompt": gen,
                             "rendered": text})
    out = {"transformers": transformers.__version__,
           "templates": {k: {"source": s, "bos_token": b, "eos_token": e}
                         for k, (s, b, e) in templates.items()},
           "conversations": CONVERSATIONS, "rendered": rows}
    OUT.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(f"{len(rows)} renderings of {len(templates)} templates -> {OUT}")


if __name__ == "__main__":
    main()
