"""Multi-turn chat with a fine-tuned model (`generate.py --chat`),
in the template it was trained with.

Each turn re-tokenizes the whole conversation the way training did (templates.chat_token_ids: BOS,
then every segment on its own, EOS after each answer), so the model sees exactly the token ids of
its training conversations, not a re-tokenized string. The answer is decoded until the model emits
EOS (or the token budget runs out), then appended to the conversation:

    messages = [user q1]                → ids(<s> … USER: q1 ASSISTANT:)            → a1 </s>
    messages = [user q1, asst a1, user q2] → ids(… a1 </s> USER: q2 ASSISTANT:)     → a2 </s>

The same conversation rendered as one string (templates.render_chat) is what llama.cpp and
transformers produce from the Jinja shipped in the GGUF / tokenizer_config.json.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from minillm.data.templates import chat_token_ids
from minillm.generate.decode import GenerationStats
from minillm.generate.sampling import SamplingConfig
from minillm.generate.text import generate_text
from minillm.model import Llama


def reply(model: Llama, tokenizer, template: str, messages: list[dict], cfg: SamplingConfig,
          stream: Callable[[str], None] | None = None, stats: GenerationStats | None = None) -> str:
    """The assistant's answer to `messages` (ending with a user message), streamed piece by piece.
    Raises ValueError when the conversation no longer fits in the model's context."""
    ids = chat_token_ids(tokenizer, template, messages)
    return generate_text(model, tokenizer, ids, cfg, stream=stream, stats=stats)


def _write_stdout(text: str):
    sys.stdout.write(text)
    sys.stdout.flush()


def fit_context(messages: list[dict], n_tokens: Callable[[list[dict]], int], room: int,
                max_seq_len: int) -> tuple[list[dict], int]:
    """The conversation with its oldest user/assistant exchanges dropped (a system message stays)
    until n_tokens(messages) + room fits in max_seq_len; also returns how many exchanges went. A
    last user message that does not fit even alone is an error naming its length."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns, dropped = messages[len(system):], 0
    while n_tokens(system + turns) + room > max_seq_len and len(turns) > 1:
        turns, dropped = turns[2:], dropped + 1  # one user message and the answer to it
    if n_tokens(system + turns) + room > max_seq_len:
        raise ValueError(f"this message takes {n_tokens(system + turns)} tokens of the model's "
                         f"{max_seq_len}, leaving less than the {room} asked for the answer: "
                         f"shorten it (or lower --max-new-tokens)")
    return system + turns, dropped


def chat_loop(model: Llama, tokenizer, template: str, cfg: SamplingConfig,
              read: Callable[[str], str] = input, write: Callable[[str], None] = _write_stdout,
              system: str | None = None) -> list[dict]:
    """Read user turns with `read` (prompt "> ") until EOF or an empty line, stream each answer to
    `write`; returns the conversation. When the conversation outgrows the model's context, the
    oldest exchanges are dropped (fit_context) and a note says so."""
    messages = [] if system is None else [{"role": "system", "content": system}]
    n_tokens = lambda msgs: len(chat_token_ids(tokenizer, template, msgs))
    room = min(cfg.max_new_tokens, model.config.max_seq_len // 4)  # kept free for the answer
    while True:
        try:
            text = read("> ")
        except EOFError:
            break
        if not text.strip():
            break
        try:
            messages, dropped = fit_context(messages + [{"role": "user", "content": text}],
                                            n_tokens, room, model.config.max_seq_len)
        except ValueError as e:  # this one message is too long: say so, and keep the session
            write(f"[{e}]\n")
            continue
        if dropped:
            write(f"[the conversation outgrew the model's {model.config.max_seq_len}-token "
                  f"context: dropped the oldest {dropped} exchange(s)]\n")
        answer = reply(model, tokenizer, template, messages, cfg, stream=write)
        write("\n")
        messages.append({"role": "assistant", "content": answer})
    return messages
