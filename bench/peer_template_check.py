"""Throwaway peer check: the chat templates minillm ships render, in transformers and in llama.cpp,
exactly the strings minillm's own renderer (templates.render_chat) produces, and tokenize to the
training ids.

    # needs transformers, llama-cpp-python
    /path/to/peer-venv/bin/python bench/peer_template_check.py
    PYTHONPATH=/tmp/d1/llpy /work/peers/venv/bin/python bench/peer_template_check.py  # as run

A tiny random Llama with a SentencePiece tokenizer trained on a few stdlib files is exported by
export.py as an HF directory and as a GGUF, each with the alpaca and then the vicuna template. Then:

1. transformers: the renderer behind `apply_chat_template(messages, tokenize=False,
   add_generation_prompt=...)` (transformers.utils.chat_template_utils.render_jinja_template, given
   the tokenizer_config.json's chat_template and special tokens exactly as apply_chat_template
   passes them; loading the tokenizer itself would need protobuf in the peer venv) ==
   render_chat(...), for a one-turn and a multi-turn conversation, and one with a system message for
   vicuna.
2. llama-cpp-python: the Jinja2ChatFormatter its Llama object builds from the GGUF's
   tokenizer.chat_template (with the vocabulary's <s> / </s> as bos_token / eos_token) renders the
   same string; and llama.cpp's tokenizer (special tokens parsed, no extra BOS) turns it into
   exactly templates.chat_token_ids, the ids training saw. End to end: the Llama object picks the
   GGUF's template (chat_format "chat_template.default", no built-in format guessed), and the prompt
   ids that `create_chat_completion` hands to the model are the training ids. Also the ids llama-cli
   / llama-server `--jinja` would use (emulated: their C++ common/chat.cpp, not in llama-cpp-python,
   cuts the rendered leading "<s>" when tokenizer.ggml.add_bos_token is true, then tokenizes with
   BOS added).
3. For information: llama.cpp's built-in, non-Jinja template detection (llama_chat_apply_template,
   used by llama-cli / llama-server without --jinja) is printed beside ours.
Exit status 1 if any equality fails. Not a test: neither peer is a dependency of minillm.
"""

from __future__ import annotations

import ctypes
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from tiny import tiny_tokenizer, write_hf_checkpoint  # noqa: E402

from minillm.config import ModelConfig  # noqa: E402
from minillm.data.templates import chat_token_ids, render_chat  # noqa: E402
from minillm.ship.convert import ExportConfig, export  # noqa: E402

CONVERSATIONS = {
    "one turn": [{"role": "user", "content": "Which module defines `dumps`?"}],
    "multi-turn": [{"role": "user", "content": "What is 2+2?"},
                   {"role": "assistant", "content": "4"},
                   {"role": "user", "content": "And \"3+3\"? It's\n\tsix?"}],
    "system": [{"role": "system", "content": "Be terse."},
               {"role": "user", "content": "def f(x):"}],
}
failures = 0


def check(what: str, got, want):
    global failures
    ok = got == want
    failures += not ok
    print(f"  {'ok  ' if ok else 'FAIL'} {what}"
          + ("" if ok else f"\n       got  {got!r}\n       want {want!r}"))


def main():
    import json

    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    except ImportError:
        llama_cpp = None
        print("llama-cpp-python is not installed: the llama.cpp half is not run")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = tiny_tokenizer(tmp / "base" / "tokenizer.model")
        cfg = ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=96,
                          vocab_size=tok.vocab_size, max_seq_len=256)
        write_hf_checkpoint(tmp / "base", cfg, seed=1, fmt="safetensors", tokenizer=tok)
        for name in ("alpaca", "vicuna"):
            print(f"\n== {name}")
            hf_dir = export(ExportConfig(checkpoint=str(tmp / "base"), out=str(tmp / f"hf-{name}"),
                                         format="hf", template=name))
            gguf = export(ExportConfig(checkpoint=str(tmp / "base"), out=str(tmp / f"{name}.gguf"),
                                       outtype="f32", template=name))
            tok_cfg = json.loads((hf_dir / "tokenizer_config.json").read_text())
            special = {k: tok_cfg[k] for k in ("bos_token", "eos_token", "unk_token")}
            llm = llama_cpp.Llama(str(gguf), vocab_only=True, verbose=False) if llama_cpp else None
            # no built-in format guessed from the template: the GGUF's Jinja is used
            if llm is not None:
                check("llama-cpp-python's chat_format", llm.chat_format, "chat_template.default")
            for conv, messages in CONVERSATIONS.items():
                if name == "alpaca" and conv == "system":
                    continue  # alpaca has no system message (both renderers raise)
                for gen in (True, False):
                    want = render_chat(name, messages, add_generation_prompt=gen)
                    got = render_jinja_template([messages], chat_template=tok_cfg["chat_template"],
                                                add_generation_prompt=gen, **special)[0][0]
                    check(f"transformers {conv}, add_generation_prompt={gen}", got, want)
                    if llm is None:
                        continue
                    fmt = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"],
                                              bos_token=llm._model.token_get_text(llm.token_bos()),
                                              eos_token=llm._model.token_get_text(llm.token_eos()),
                                              add_generation_prompt=gen)
                    check(f"llama-cpp-python Jinja2ChatFormatter {conv}, "
                          f"add_generation_prompt={gen}", fmt(messages=messages).prompt, want)
                if llm is not None:
                    ids = llm.tokenize(render_chat(name, messages).encode(), add_bos=False,
                                       special=True)
                    check(f"llama.cpp tokens of the {conv} string == training ids", ids,
                          chat_token_ids(tok, name, messages))
                    check(f"Llama.create_chat_completion's prompt tokens ({conv}) == training ids",
                          chat_completion_prompt_ids(llm, messages),
                          chat_token_ids(tok, name, messages))
                    # llama-cli / llama-server --jinja (common/chat.cpp): the rendered leading
                    # "<s>" is cut because tokenizer.ggml.add_bos_token is true, then tokenized
                    # with BOS added
                    bos = llm._model.token_get_text(llm.token_bos())
                    jinja_ids = llm.tokenize(render_chat(name, messages).removeprefix(bos).encode(),
                                             add_bos=True, special=True)
                    check(f"--jinja's tokens (BOS text cut, BOS added) ({conv}) == training ids",
                          jinja_ids, chat_token_ids(tok, name, messages))
            if llm is not None:
                builtin_llama_cpp_template(llm, name)
    print(f"\n{'all equal' if not failures else f'{failures} FAILED'}")
    return 1 if failures else 0


def chat_completion_prompt_ids(llm, messages) -> list[int]:
    """The token ids `llm.create_chat_completion(messages)` evaluates: its chat handler renders the
    GGUF's template (add_generation_prompt=True) and tokenizes it (special tokens parsed, no extra
    BOS), then calls llm.create_completion(prompt=ids), which is intercepted here before any
    decoding."""
    class Captured(Exception):
        pass

    def capture(prompt, **_):
        raise Captured(prompt)

    llm.create_completion = capture
    try:
        llm.create_chat_completion(messages=messages, max_tokens=1)
    except Captured as c:
        return list(c.args[0])
    finally:
        del llm.create_completion
    raise AssertionError("create_chat_completion never called create_completion")


def builtin_llama_cpp_template(llm, name: str):
    """llama.cpp's C llama_chat_apply_template on our Jinja: it detects a built-in template by
    substrings (our vicuna Jinja contains "USER: " and "ASSISTANT: ", so it is taken for llama.cpp's
    own "vicuna", which is not FastChat's vicuna_v1.1: newlines instead of spaces, no default system
    message, no BOS)."""
    import llama_cpp

    for conv in ("multi-turn", "system") if name == "vicuna" else ("multi-turn",):
        messages = CONVERSATIONS[conv]
        arr = (llama_cpp.llama_chat_message * len(messages))(
            *[llama_cpp.llama_chat_message(role=m["role"].encode(), content=m["content"].encode())
              for m in messages])
        buf = ctypes.create_string_buffer(4096)
        n = llama_cpp.llama_chat_apply_template(llm.metadata["tokenizer.chat_template"].encode(),
                                                arr, len(messages), True, buf, len(buf))
        got = buf.raw[:n].decode() if n >= 0 else f"(not a built-in template: returned {n})"
        print(f"  info llama.cpp built-in (non-Jinja) rendering, {conv}: {got!r}\n"
              f"       ours: {render_chat(name, messages)!r}")

if __name__ == "__main__":
    sys.exit(main())
