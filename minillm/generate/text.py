"""Text in, text out: the one prompt → text helper every caller uses (generate.py, chat, the
trainer's samples, evaluation's answers), and the incremental detokenizer behind streaming.

`TextStream` turns ids back into text as they come, for any tokenizer: a character split over
several tokens (SentencePiece's byte-fallback pieces `<0xE2>`, or byte-level BPE's) is held until
complete. Stop strings end a generation; text that could still become a stop string is held back
from the stream until it is known not to.
"""

from __future__ import annotations

from minillm.generate.batched import generate_tokens_batch
from minillm.generate.decode import GenerationStats, decode_one_token, generate_tokens
from minillm.generate.sampling import SamplingConfig
from minillm.generate.speculative import speculative_generate_tokens
from minillm.model import Llama


class TextStream:
    """Incremental detokenizer over any tokenizer's `decode(ids) -> str`, the way HF tokenizers'
    DecodeStream works: what `push(id)` returns, joined,
    is exactly decode(all ids pushed), piece by piece.

    Each push decodes only the ids since the last emitted text plus the ones just before them, and
    returns the difference, so it costs O(1) per token. The ids before give the context decoding
    needs: SentencePiece drops the dummy-prefix space of a text's first piece, so a piece shows its
    space only after another piece. `prefix` ids (the prompt's last token) make the first new piece
    a continuation, space included; without them it starts a text (an answer, shown without its
    leading space). A character split over byte-fallback tokens decodes to U+FFFD until it is
    complete, so text ending in U+FFFD is held back until a later token completes it; `flush()`
    returns whatever is left.
    """

    def __init__(self, tokenizer, prefix: list[int] | tuple[int, ...] = ()):
        self.decode = tokenizer.decode
        self.ids = [int(i) for i in prefix]
        self.start = 0  # ids[start:done] decode to the context; ids[done:] are not shown yet
        self.done = len(self.ids)

    def _new_text(self) -> str:
        before = self.decode(self.ids[self.start:self.done])
        return self.decode(self.ids[self.start:])[len(before):]

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        new = self._new_text()
        if not new or new.endswith("\ufffd"):
            return ""  # nothing to show yet (a control token, or a character still incomplete)
        self.start, self.done = self.done, len(self.ids)
        return new

    def flush(self) -> str:
        new = self._new_text()
        self.start = self.done = len(self.ids)
        return new


def stop_index(text: str, stop: list[str]) -> int:
    """Where the earliest stop string starts in text, or -1."""
    return min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)


def generate_text(model: Llama, tokenizer, prompt: str | list[int], cfg: SamplingConfig,
                  stream=None, stats: GenerationStats | None = None, decode_fn=decode_one_token,
                  draft: Llama | None = None, speculate_k: int = 5,
                  continues_prompt: bool | None = None) -> str:
    """The continuation of `prompt` (without the prompt), decoded until EOS, a stop string or
    cfg.max_new_tokens.

    prompt: a text (encoded with a BOS if the tokenizer adds one, as in training), or the token
    ids themselves (e.g. a chat conversation from its template). continues_prompt: the text goes
    on from the prompt's, so its first piece keeps its space, as decoding prompt + continuation
    would (default: for a non-empty text prompt; not for ids, e.g. a chat answer, which starts a
    text of its own).
    stream: optional callable receiving text pieces as they are produced. Stop strings end
    generation; the text is cut before the stop string. draft: a small model sharing the tokenizer,
    for speculative decoding with `speculate_k` proposals per target pass.
    """
    is_text = isinstance(prompt, str)
    ids = tokenizer.encode(prompt) if is_text else list(prompt)  # BOS as the file says
    continues = (is_text and bool(prompt)) if continues_prompt is None else continues_prompt
    detok = TextStream(tokenizer, prefix=ids[-1:] if continues and len(ids) > 1 else ())
    hold = max((len(s) for s in cfg.stop), default=1) - 1
    out, emitted = "", 0
    if draft is None:
        tokens = generate_tokens(model, ids, cfg, eos_id=tokenizer.eos_id, stats=stats,
                                 decode_fn=decode_fn)
    else:
        tokens = speculative_generate_tokens(model, draft, ids, cfg, speculate_k, tokenizer.eos_id,
                                             stats)
    for tok in tokens:
        out += detok.push(tok)
        cut = stop_index(out, cfg.stop)
        if cut >= 0:
            out = out[:cut]
            tokens.close()  # frees the KV cache now, not when the generator is collected
            break
        if stream is not None and len(out) - hold > emitted:
            stream(out[emitted:len(out) - hold])
            emitted = len(out) - hold
    else:
        out += detok.flush()
    if stream is not None and len(out) > emitted:
        stream(out[emitted:])
    return out


def generate_text_batch(model: Llama, tokenizer, prompts: list[str], cfg: SamplingConfig,
                        on_done=None, stats: GenerationStats | None = None,
                        decode_fn=None) -> list[str]:
    """Continuations of several prompts decoded together (generate_tokens_batch)
    → one text per prompt.

    on_done(row, text): optional callable, called as each row finishes (EOS, a stop string, or the
    token limit), so a caller can print rows in the order they complete. Stop strings cut each row
    as in generate_text.
    """
    ids = [tokenizer.encode(p) for p in prompts]
    detoks = [TextStream(tokenizer, prefix=i[-1:] if p and len(i) > 1 else ())
              for p, i in zip(prompts, ids, strict=True)]
    outs = [""] * len(prompts)
    stopped = [False] * len(prompts)
    done = []
    step = {} if decode_fn is None else {"decode_fn": decode_fn}
    for row, tok in generate_tokens_batch(model, ids, cfg, tokenizer.eos_id, stats, stopped,
                                          **step):
        if tok is None:  # EOS or the token limit
            outs[row] += detoks[row].flush()
        else:
            outs[row] += detoks[row].push(tok)
            cut = stop_index(outs[row], cfg.stop)
            if cut < 0:
                continue
            outs[row] = outs[row][:cut]
            stopped[row] = True
        done.append(row)
        if on_done is not None:
            on_done(row, outs[row])
    for row in range(len(prompts)):
        if row not in done and on_done is not None:  # max_new_tokens = 0: no step ran
            on_done(row, outs[row])
    return outs
