"""Autoregressive generation as small pure functions (the gpt-fast shape): logits → probabilities →
sample; prefill the KV cache with the prompt; decode one token at a time.

    prompt ids ──prefill──▶ logits of the last position ──sample──▶ token t
    token t ──decode_one_token (cache at position p)──▶ logits ──sample──▶ token t+1 …

Sampling knobs, applied in this order to the last position's logits (B, V):
  1. repetition penalty (CTRL, Keskar et al. 2019): a token already in the context has its logit divided
     by the penalty when positive, multiplied when negative (HF's convention).
  2. temperature 0 → greedy argmax; otherwise logits / temperature.
  3. top-k keeps the k largest logits; top-p (nucleus, Holtzman et al. 2019) keeps the smallest set of
     tokens whose probability mass reaches p (the token that crosses p is kept).

`TextStream` turns ids back into text incrementally: SentencePiece byte-fallback pieces (`<0xE2>`) can
split one character over several tokens, so bytes are held until they form complete UTF-8.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from minillm.model import Llama


@dataclass
class SamplingConfig:
    max_new_tokens: int = 128
    temperature: float = 0.8  # 0 means greedy
    top_k: int | None = 200
    top_p: float | None = None
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)  # stop when any of these strings appears
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, found {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, found {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], found {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, found {self.repetition_penalty}")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, found {self.max_new_tokens}")


def apply_repetition_penalty(logits: torch.Tensor, context: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (B, V), context (B, S) ids already seen → penalized logits (B, V)."""
    if penalty == 1.0:
        return logits
    seen = torch.gather(logits, 1, context)  # (B, S)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, context, seen)


def logits_to_probs(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None):
    """logits (B, V) → probabilities (B, V) after temperature, top-k and top-p filtering."""
    logits = logits.float() / max(temperature, 1e-5)
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = sorted_p.cumsum(-1) - sorted_p  # mass of the strictly more likely tokens
        sorted_p = sorted_p.masked_fill(mass_before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(logits: torch.Tensor, context: torch.Tensor, cfg: SamplingConfig, generator=None) -> torch.Tensor:
    """logits (B, V) of the last position → next ids (B, 1)."""
    logits = apply_repetition_penalty(logits, context, cfg.repetition_penalty)
    if cfg.temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = logits_to_probs(logits, cfg.temperature, cfg.top_k, cfg.top_p)
    return torch.multinomial(probs, 1, generator=generator)


def prefill(model: Llama, ids: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    """Run the prompt ids (B, T) through the model, filling the KV cache → last logits (B, V)."""
    logits, _ = model(ids, input_pos=input_pos)
    return logits[:, -1]


def decode_one_token(model: Llama, token: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    """One step: token (B, 1) at position input_pos (1,) → logits (B, V). Fixed shapes, so this is the
    function worth `torch.compile`-ing (mode="reduce-overhead" captures it as a CUDA graph)."""
    logits, _ = model(token, input_pos=input_pos)
    return logits[:, -1]


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0  # the first comes from the prefill, each later one from one decode step
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0  # all decode steps
    first_step_seconds: float = 0.0  # the first decode step alone: it compiles the step under --compile

    def summary(self) -> str:
        """Prefill and decode rates. The decode rate leaves out the first step when there are others: with
        torch.compile that step includes compilation and CUDA graph capture (seconds), which is reported
        on its own rather than folded into tokens/s."""
        pf = self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0
        steps, seconds = self.new_tokens - 1, self.decode_seconds
        if steps > 1:
            steps, seconds = steps - 1, seconds - self.first_step_seconds
        dc = steps / seconds if steps > 0 and seconds > 0 else 0.0
        first = f" (first step {self.first_step_seconds:.2f} s)" if self.new_tokens > 2 else ""
        return (f"prefill: {self.prompt_tokens} tokens at {pf:.1f} tok/s | "
                f"decode: {self.new_tokens} tokens at {dc:.1f} tok/s{first}")


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate_tokens(
    model: Llama,
    prompt_ids: list[int],
    cfg: SamplingConfig,
    eos_id: int | None = None,
    stats: GenerationStats | None = None,
    decode_fn=decode_one_token,
) -> Iterator[int]:
    """Yield new token ids one at a time (batch 1) until max_new_tokens or EOS (EOS is not yielded)."""
    device = model.embed_tokens.weight.device
    T = len(prompt_ids)
    if T == 0:
        raise ValueError("the prompt must hold at least one token (a BOS at least)")
    total = min(T + cfg.max_new_tokens, model.config.max_seq_len)
    if T >= model.config.max_seq_len:
        raise ValueError(f"prompt of {T} tokens leaves no room in max_seq_len={model.config.max_seq_len}")
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = T
    model.setup_caches(batch_size=1, max_seq_len=total)
    try:
        context = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, T)
        t0 = time.perf_counter()
        logits = prefill(model, context, torch.arange(T, device=device))
        token = sample(logits, context, cfg, generator)  # (1, 1)
        _sync(device)
        stats.prefill_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        for pos in range(T, total):
            tok = int(token)
            if eos_id is not None and tok == eos_id:
                break
            stats.new_tokens += 1
            yield tok
            if pos + 1 >= total:
                break
            context = torch.cat([context, token], dim=1)
            logits = decode_fn(model, token, torch.tensor([pos], device=device))
            token = sample(logits, context, cfg, generator)
            if pos == T:
                _sync(device)
                stats.first_step_seconds = time.perf_counter() - t0
        _sync(device)
        stats.decode_seconds = time.perf_counter() - t0
    finally:
        model.clear_caches()


class TextStream:
    """Incremental detokenizer: feed ids, get the text they complete (multi-byte safe).

    Mirrors SentencePiece's decoding piece by piece: `▁` becomes a space, byte pieces `<0xNN>` are raw
    bytes fed through an incremental UTF-8 decoder (so a character split over tokens appears only when
    complete), control pieces (<s>, </s>) print nothing. `leading_space=False` drops the space of the
    very first piece, as `decode` does at the start of a text.
    """

    def __init__(self, tokenizer, leading_space: bool = True):
        self.sp = tokenizer.sp
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.first = not leading_space

    def push(self, token_id: int) -> str:
        sp = self.sp
        if sp.IsControl(token_id):
            return ""
        if sp.IsByte(token_id):
            return self.utf8.decode(bytes([int(sp.IdToPiece(token_id)[3:5], 16)]))
        text = self.utf8.decode(b"", final=True)  # flush a dangling partial sequence, if any
        piece = " \u2047 " if sp.IsUnknown(token_id) else sp.IdToPiece(token_id).replace("\u2581", " ")
        if self.first and piece.startswith(" "):
            piece = piece[1:]
        self.first = False
        return text + piece

    def flush(self) -> str:
        return self.utf8.decode(b"", final=True)


def generate_text(model: Llama, tokenizer, prompt: str, cfg: SamplingConfig, stream=None,
                  stats: GenerationStats | None = None, decode_fn=decode_one_token) -> str:
    """Generate a continuation of `prompt` and return it (without the prompt).

    stream: optional callable receiving text pieces as they are produced. Stop strings end generation;
    the text is cut before the stop string, and text that could still become a stop string is held back
    from the stream until it is known not to.
    """
    ids = tokenizer.encode(prompt, bos=True)
    detok = TextStream(tokenizer, leading_space=bool(prompt))
    hold = max((len(s) for s in cfg.stop), default=1) - 1
    out, emitted = "", 0
    for tok in generate_tokens(model, ids, cfg, eos_id=tokenizer.eos_id, stats=stats, decode_fn=decode_fn):
        out += detok.push(tok)
        cut = min((i for i in (out.find(s) for s in cfg.stop) if i >= 0), default=-1)
        if cut >= 0:
            out = out[:cut]
            break
        if stream is not None and len(out) - hold > emitted:
            stream(out[emitted:len(out) - hold])
            emitted = len(out) - hold
    else:
        out += detok.flush()
    if stream is not None and len(out) > emitted:
        stream(out[emitted:])
    return out
