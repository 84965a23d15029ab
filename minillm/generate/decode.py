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


def prefill(model: Llama, ids: torch.Tensor, input_pos: torch.Tensor, left_pad=None) -> torch.Tensor:
    """Run the prompt ids (B, T) through the model, filling the KV cache → last logits (B, V).
    left_pad (B,): padding slots before each row's prompt (batched generation)."""
    logits, _ = model(ids, input_pos=input_pos, left_pad=left_pad)
    return logits[:, -1]


def decode_one_token(model: Llama, token: torch.Tensor, input_pos: torch.Tensor, left_pad=None) -> torch.Tensor:
    """One step: token (B, 1) at position input_pos (1,) → logits (B, V). Fixed shapes, so this is the
    function worth `torch.compile`-ing (mode="reduce-overhead" captures it as a CUDA graph)."""
    logits, _ = model(token, input_pos=input_pos, left_pad=left_pad)
    return logits[:, -1]


def sampling_generator(cfg: SamplingConfig, device) -> torch.Generator | None:
    """The random generator a generation draws from: seeded by cfg.seed (reproducible), or None (torch's)."""
    return None if cfg.seed is None else torch.Generator(device=device).manual_seed(cfg.seed)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0  # the first comes from the prefill, each later one from one decode step
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0  # all decode steps
    first_step_seconds: float = 0.0  # the first decode step alone: it compiles the step under --compile
    drafted: int = 0  # speculative decoding: draft tokens proposed, and how many the target accepted
    accepted: int = 0

    def summary(self) -> str:
        """Prefill and decode rates. The decode rate leaves out the first step when there are others: with
        torch.compile that step includes compilation and CUDA graph capture (seconds), which is reported
        on its own rather than folded into tokens/s."""
        pf = self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0
        steps, seconds = self.new_tokens - 1, self.decode_seconds
        if steps > 1 and self.first_step_seconds:
            steps, seconds = steps - 1, seconds - self.first_step_seconds
        dc = steps / seconds if steps > 0 and seconds > 0 else 0.0
        first = ""
        if self.new_tokens > 2 and self.first_step_seconds:
            first = f" (first step {self.first_step_seconds:.2f} s)"
        spec = ""
        if self.drafted:
            spec = f" | draft tokens accepted: {self.accepted}/{self.drafted} ({self.accepted / self.drafted:.0%})"
        return (f"prefill: {self.prompt_tokens} tokens at {pf:.1f} tok/s | "
                f"decode: {self.new_tokens} tokens at {dc:.1f} tok/s{first}{spec}")


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# inference_mode, not no_grad: no version counters or autograd metadata on any tensor; 1.5x the decode
# tok/s of the tiny model on a CPU (bench/cpu.py), where per-op overhead is most of a decode step
@torch.inference_mode()
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
    generator = sampling_generator(cfg, device)
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


# -----------------------------------------------------------------------------------------------------
# Batched generation: B prompts of different lengths decoded together in one static KV cache.
#
#     prompt 0:  <s> a b c d e        slots 0..5                     left_pad 0
#     prompt 1:  ·  ·  ·  <s> f g     slots 3..5 (0..2 padding)      left_pad 3
#
# Prompts are right-aligned (left padding), so every row's next token goes to the same slot and one
# decode step serves the whole batch. The model hides the padding slots from each row and counts the
# row's RoPE positions from its first real token (Llama.forward, left_pad), so each row computes what it
# would alone.


def left_pad_prompts(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists → ids (B, T) right-aligned, T the longest prompt, and left_pad (B,) = T − len.

    Padding repeats each row's first token (its BOS): the model never attends to a padding slot, and a
    repetition penalty, which reads the context, finds no token that is not already in the prompt.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt must hold at least one token (a BOS at least)")
    T = max(len(p) for p in prompts)
    ids = torch.tensor([[p[0]] * (T - len(p)) + list(p) for p in prompts], dtype=torch.long)  # (B, T)
    return ids, torch.tensor([T - len(p) for p in prompts], dtype=torch.long)  # (B,)


@torch.inference_mode()
def generate_tokens_batch(
    model: Llama,
    prompts: list[list[int]],
    cfg: SamplingConfig,
    eos_id: int | None = None,
    stats: GenerationStats | None = None,
    stopped: list[bool] | None = None,
    decode_fn=decode_one_token,
) -> Iterator[tuple[int, int | None]]:
    """Decode B prompts together; yield (row, token id) as each step produces them, and (row, None) when
    a row ends (EOS, which is not yielded, or max_new_tokens). Greedy rows equal their batch-1 runs.

    stopped: optional list of B flags the caller may set while iterating (e.g. on a stop string) to end
    a row; no more events come for it. A finished row keeps its slot in the batch (its tokens are
    computed and dropped) until every row has ended: this is static batching, not continuous batching.
    Rows share one cache: when max_seq_len binds, the longest prompt limits every row's new tokens.
    With sampling, a row's draws depend on the batch (one generator serves all rows).
    """
    device = model.embed_tokens.weight.device
    ids, pad = left_pad_prompts(prompts)
    ids, pad = ids.to(device), pad.to(device)  # (B, T), (B,)
    B, T = ids.shape
    if T >= model.config.max_seq_len:
        raise ValueError(f"prompt of {T} tokens leaves no room in max_seq_len={model.config.max_seq_len}")
    if stopped is None:
        stopped = [False] * B
    if len(stopped) != B:
        raise ValueError(f"stopped has {len(stopped)} flags for {B} prompts")
    total = min(T + cfg.max_new_tokens, model.config.max_seq_len)
    generator = sampling_generator(cfg, device)
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = sum(len(p) for p in prompts)
    model.setup_caches(batch_size=B, max_seq_len=total)
    try:
        t0 = time.perf_counter()
        logits = prefill(model, ids, torch.arange(T, device=device), pad)  # (B, V)
        token = sample(logits, ids, cfg, generator)  # (B, 1)
        _sync(device)
        stats.prefill_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        context = ids
        for pos in range(T, total):
            for row, tok in enumerate(token[:, 0].tolist()):
                if stopped[row]:
                    continue
                if tok == eos_id:
                    stopped[row] = True
                    yield row, None
                    continue
                stats.new_tokens += 1
                yield row, tok
            if all(stopped):
                break
            if pos + 1 >= total:
                for row in range(B):
                    if not stopped[row]:
                        stopped[row] = True
                        yield row, None
                break
            context = torch.cat([context, token], dim=1)  # (B, pos + 1)
            logits = decode_fn(model, token, torch.tensor([pos], device=device), pad)  # (B, V)
            token = sample(logits, context, cfg, generator)  # (B, 1)
        _sync(device)
        stats.decode_seconds = time.perf_counter() - t0
    finally:
        model.clear_caches()


# -----------------------------------------------------------------------------------------------------
# Speculative decoding (Leviathan et al. 2023, https://arxiv.org/abs/2211.17192; Chen et al. 2023,
# https://arxiv.org/abs/2302.01318; gpt-fast's --speculate_k). A small draft model proposes k tokens one
# at a time; the target scores all of them in one forward pass over k + 1 positions; a rejection rule
# keeps a prefix of the proposals plus one token of its own, so every target pass yields 1 … k + 1
# tokens whose distribution is exactly the target's.


def next_token_probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """logits (N, V) → the distribution `sample` draws from (N, V); temperature 0 gives the argmax one-hot,
    so the rejection rule below reduces to "keep the draft tokens while they are the target's argmax"."""
    if cfg.temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.size(-1)).float()
    return logits_to_probs(logits, cfg.temperature, cfg.top_k, cfg.top_p)


def speculative_accept(p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor, generator=None) -> list[int]:
    """The rejection rule. p (k+1, V) target probabilities at the k+1 verified positions, q (k, V) the
    draft's, draft (k,) the proposed ids (draft[i] ~ q[i]) → the tokens to keep (1 … k+1 of them).

    For i = 0, 1, …: keep draft[i] with probability min(1, p_i(x) / q_i(x)), x = draft[i]. At the first
    rejection, draw the replacement from the residual norm(max(0, p_i − q_i)) and stop. If all k are kept,
    draw one more from p_k. Each kept-or-replaced token is then distributed exactly as p_i:
        P(x) = q(x)·min(1, p(x)/q(x)) + (1 − Σ_y min(p(y), q(y))) · max(0, p(x) − q(x)) / Σ_y max(0, p(y) − q(y))
             = min(p(x), q(x)) + max(0, p(x) − q(x)) = p(x).
    """
    k = draft.numel()
    rows = torch.arange(k, device=draft.device)
    ratio = p[rows, draft] / q[rows, draft]  # (k,); q > 0 where the draft sampled
    r = torch.rand(k, generator=generator, device=p.device)  # (k,) uniform in [0, 1)
    n = int((r < ratio).long().cumprod(0).sum())  # the number of leading accepted proposals
    if n == k:
        last = p[k]
    else:
        last = (p[n] - q[n]).clamp(min=0)
        last = last / last.sum()
    extra = int(torch.multinomial(last, 1, generator=generator))
    return draft[:n].tolist() + [extra]


@torch.inference_mode()
def speculative_generate_tokens(
    target: Llama,
    draft_model: Llama,
    prompt_ids: list[int],
    cfg: SamplingConfig,
    k: int = 5,
    eos_id: int | None = None,
    stats: GenerationStats | None = None,
) -> Iterator[int]:
    """Like generate_tokens for `target`, with `draft_model` proposing k tokens per target forward.

    Each round, with the last token `cur` at position pos, not yet in either cache:
      1. the draft decodes cur, d_0, …, d_{k-2} at pos … pos+k-1, sampling d_0 … d_{k-1} (and q);
      2. the target runs once over [cur, d_0 … d_{k-1}] at pos … pos+k → p (k+1, V);
      3. speculative_accept keeps n proposals plus one token; the next cur is that token, at pos+n+1.
    Rolling back a rejection costs nothing: the caches hold stale keys and values in the slots after
    pos+n, but the mask only shows a query the slots up to its own position, and every slot up to there
    is written again before any query can see it. When all k are accepted, the draft still lacks d_{k-1}
    in its cache and decodes it once more. Greedy output equals the target alone (up to float rounding
    between one k+1-token pass and k+1 single-token passes). The repetition penalty is not supported.
    """
    if cfg.repetition_penalty != 1.0:
        raise ValueError("speculative decoding does not support repetition_penalty (found "
                         f"{cfg.repetition_penalty}); use 1.0")
    if k < 1:
        raise ValueError(f"speculate k must be >= 1, found {k}")
    if draft_model.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"draft vocab_size={draft_model.config.vocab_size} differs from the target's "
                         f"{target.config.vocab_size}: the two models must share a tokenizer")
    device = target.embed_tokens.weight.device
    T = len(prompt_ids)
    max_len = min(target.config.max_seq_len, draft_model.config.max_seq_len)
    if T == 0 or T >= max_len:
        raise ValueError(f"prompt of {T} tokens: need 1 … {max_len - 1} (the models' max_seq_len)")
    total = min(T + cfg.max_new_tokens, max_len)
    generator = sampling_generator(cfg, device)
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = T
    target.setup_caches(batch_size=1, max_seq_len=total)
    draft_model.setup_caches(batch_size=1, max_seq_len=total)
    try:
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, T)
        t0 = time.perf_counter()
        prefill(draft_model, ids, torch.arange(T, device=device))
        p = next_token_probs(prefill(target, ids, torch.arange(T, device=device)), cfg)  # (1, V)
        cur = int(torch.multinomial(p[0], 1, generator=generator))
        _sync(device)
        stats.prefill_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        pos, new, ended = T, [cur] if total > T else [], False  # new[-1] is cur, at position pos
        while True:
            for tok in new:
                if tok == eos_id:
                    ended = True
                    break
                stats.new_tokens += 1
                yield tok
            if ended or pos >= total - 1:
                break
            kk = min(k, total - 1 - pos)  # the last round may have less room
            x, proposed, qs = cur, [], []
            for i in range(kk):  # 1. draft
                logits = decode_one_token(draft_model, torch.tensor([[x]], device=device),
                                          torch.tensor([pos + i], device=device))  # (1, V)
                q = next_token_probs(logits, cfg)[0]  # (V,)
                x = int(torch.multinomial(q, 1, generator=generator))
                proposed.append(x)
                qs.append(q)
            verify = torch.tensor([[cur] + proposed], device=device)  # (1, kk+1)
            logits, _ = target(verify, input_pos=torch.arange(pos, pos + kk + 1, device=device))  # 2. verify
            p = next_token_probs(logits[0], cfg)  # (kk+1, V)
            kept = speculative_accept(p, torch.stack(qs), torch.tensor(proposed, device=device), generator)
            n = len(kept) - 1
            stats.drafted += kk
            stats.accepted += n
            if n == kk:  # the draft never saw its own last proposal: write it into its cache
                decode_one_token(draft_model, torch.tensor([[proposed[-1]]], device=device),
                                 torch.tensor([pos + kk], device=device))
            new = kept[: total - 1 - pos]  # kept[i] lies at pos+1+i: a bonus token past the cache is dropped
            cur, pos = new[-1], pos + len(new)
        _sync(device)
        stats.decode_seconds = time.perf_counter() - t0
    finally:
        target.clear_caches()
        draft_model.clear_caches()


class TextStream:
    """Incremental detokenizer: feed ids, get the text they complete (multi-byte safe).

    Mirrors SentencePiece's decoding piece by piece: `▁` becomes a space, byte pieces `<0xNN>` are raw
    bytes fed through an incremental UTF-8 decoder (so a character split over tokens appears only when
    complete), control pieces (<s>, </s>) print nothing. `leading_space=False` drops the space of the
    very first piece that has text, as `decode` does at the start of a text; so does the piece after an
    added piece (Tokenizer.add_pieces), as `decode` decodes each stretch between them on its own. On
    invalid UTF-8 it writes one U+FFFD per maximal invalid run (Python's rule) where SentencePiece writes
    one per byte.
    """

    def __init__(self, tokenizer, leading_space: bool = True):
        self.sp = tokenizer.sp
        self.added = getattr(tokenizer, "added_ids", frozenset())
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.first = not leading_space

    def push(self, token_id: int) -> str:
        sp = self.sp
        if sp.IsControl(token_id):
            return ""
        if sp.IsByte(token_id):
            self.first = False  # a byte piece is text: a later piece's space is no longer the leading one
            return self.utf8.decode(bytes([int(sp.IdToPiece(token_id)[3:5], 16)]))
        text = self.utf8.decode(b"", final=True)  # flush a dangling partial sequence, if any
        piece = " \u2047 " if sp.IsUnknown(token_id) else sp.IdToPiece(token_id).replace("\u2581", " ")
        if self.first and piece.startswith(" "):
            piece = piece[1:]
        self.first = token_id in self.added
        return text + piece

    def flush(self) -> str:
        return self.utf8.decode(b"", final=True)


def stop_index(text: str, stop: list[str]) -> int:
    """Where the earliest stop string starts in text, or -1."""
    return min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)


def generate_text(model: Llama, tokenizer, prompt: str, cfg: SamplingConfig, stream=None,
                  stats: GenerationStats | None = None, decode_fn=decode_one_token,
                  draft: Llama | None = None, speculate_k: int = 5) -> str:
    """Generate a continuation of `prompt` and return it (without the prompt).

    stream: optional callable receiving text pieces as they are produced. Stop strings end generation;
    the text is cut before the stop string, and text that could still become a stop string is held back
    from the stream until it is known not to. draft: a small model sharing the tokenizer, for
    speculative decoding with `speculate_k` proposals per target pass.
    """
    ids = tokenizer.encode(prompt, bos=True)
    detok = TextStream(tokenizer, leading_space=bool(prompt))
    hold = max((len(s) for s in cfg.stop), default=1) - 1
    out, emitted = "", 0
    if draft is None:
        tokens = generate_tokens(model, ids, cfg, eos_id=tokenizer.eos_id, stats=stats, decode_fn=decode_fn)
    else:
        tokens = speculative_generate_tokens(model, draft, ids, cfg, speculate_k, tokenizer.eos_id, stats)
    for tok in tokens:
        out += detok.push(tok)
        cut = stop_index(out, cfg.stop)
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


def generate_text_batch(model: Llama, tokenizer, prompts: list[str], cfg: SamplingConfig, on_done=None,
                        stats: GenerationStats | None = None, decode_fn=decode_one_token) -> list[str]:
    """Continuations of several prompts decoded together (generate_tokens_batch) → one text per prompt.

    on_done(row, text): optional callable, called as each row finishes (EOS, a stop string, or the token
    limit), so a caller can print rows in the order they complete. Stop strings cut each row as in
    generate_text.
    """
    ids = [tokenizer.encode(p, bos=True) for p in prompts]
    detoks = [TextStream(tokenizer, leading_space=bool(p)) for p in prompts]
    outs = [""] * len(prompts)
    stopped = [False] * len(prompts)
    done = []
    for row, tok in generate_tokens_batch(model, ids, cfg, tokenizer.eos_id, stats, stopped, decode_fn):
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
