"""Autoregressive decoding with a KV cache, as small functions (the gpt-fast shape):

    prompt ids ──prefill──▶ logits of the last position ──sample──▶ token t
    token t ──decode_one_token (cache at position p)──▶ logits ──sample──▶ token t+1 …

`prefill` and `decode_one_token` are the model calls; `decode_one_token` has fixed shapes, so it is
the function worth `torch.compile`-ing. `decoding` is the scaffold every decode loop shares (this
file's batch-1 loop, batched.py's and speculative.py's): it sets up each model's KV cache for the
run, puts the models in eval mode, and undoes both when the loop ends or is abandoned; `Clock` times
the prefill, the first decode step and the rest into `GenerationStats`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from minillm.generate.sampling import SamplingConfig, sample, sampling_generator
from minillm.model import Llama
from minillm.util.device import check_fits


def prefill(model: Llama, ids: torch.Tensor, input_pos: torch.Tensor, **row_args) -> torch.Tensor:
    """Run the prompt ids (B, T) through the model at cache slots input_pos (T,), filling the KV
    cache → the last position's logits (B, V). row_args: batched.py's per-row `positions` and
    `mask`."""
    logits, _ = model(ids, input_pos=input_pos, **row_args)
    return logits[:, -1]


def decode_one_token(model: Llama, token: torch.Tensor, input_pos: torch.Tensor,
                     **row_args) -> torch.Tensor:
    """One step: token (B, 1) at cache slot input_pos (1,) → logits (B, V). Fixed shapes, so this is
    the function worth `torch.compile`-ing (mode="reduce-overhead" captures it as a CUDA graph)."""
    logits, _ = model(token, input_pos=input_pos, **row_args)
    return logits[:, -1]


# --------------------------------------------------------------------------------------------------
# what every decode loop shares


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0  # the first comes from the prefill, each later one from one decode step
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0  # all decode steps
    # the first decode step alone: it compiles the step under --compile
    first_step_seconds: float = 0.0
    # speculative decoding: draft tokens proposed, and how many the target accepted
    drafted: int = 0
    accepted: int = 0

    def summary(self) -> str:
        """Prefill and decode rates. The decode rate leaves out the first step when there are
        others: with torch.compile that step includes compilation and CUDA graph capture (seconds),
        which is reported on its own rather than folded into tokens/s."""
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
            spec = (f" | draft tokens accepted: {self.accepted}/{self.drafted} "
                    f"({self.accepted / self.drafted:.0%})")
        return (f"prefill: {self.prompt_tokens} tokens at {pf:.1f} tok/s | "
                f"decode: {self.new_tokens} tokens at {dc:.1f} tok/s{first}{spec}")


class Clock:
    """Times one generation into stats: `prefill_done()` after the prefill, `step_done()` after each
    decode step (the first one is also recorded alone), `decode_done()` at the end. A CUDA device is
    synchronized before each reading, so the times are those of the kernels, not of their launch."""

    def __init__(self, stats: GenerationStats, device: torch.device):
        self.stats, self.device, self.steps = stats, device, 0
        self.t0 = time.perf_counter()

    def _elapsed(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - self.t0

    def prefill_done(self):
        self.stats.prefill_seconds = self._elapsed()
        self.t0 = time.perf_counter()

    def step_done(self):
        self.steps += 1
        if self.steps == 1:
            self.stats.first_step_seconds = self._elapsed()

    def decode_done(self):
        self.stats.decode_seconds = self._elapsed()


@contextmanager
def decoding(models: list[Llama], batch_size: int, total: int):
    """A KV cache of `total` slots for `batch_size` rows in each model, eval mode, for the duration
    of one generation; the caches are freed and the training flags restored however the loop ends (a
    consumer that stops iterating early closes the generator, which runs this exit too)."""
    was_training = [m.training for m in models]
    for m in models:
        c, w = m.config, m.embed_tokens.weight
        kv_bytes = 2 * c.n_layers * batch_size * total * c.n_kv_heads * c.head_dim  # k and v
        kv_bytes *= w.element_size()
        check_fits(kv_bytes, w.device, f"a KV cache of {batch_size} x {total} positions",
                   "lower --max-new-tokens (or the batch size), or shorten the prompt")
    for m in models:
        m.eval()
        m.setup_caches(batch_size=batch_size, max_seq_len=total)
    try:
        yield
    finally:
        for m, flag in zip(models, was_training, strict=True):
            m.clear_caches()
            m.train(flag)


def check_prompt_length(T: int, max_seq_len: int):
    if T == 0:
        raise ValueError("the prompt must hold at least one token (a BOS at least)")
    if T >= max_seq_len:
        raise ValueError(f"prompt of {T} tokens leaves no room in max_seq_len={max_seq_len}")


# --------------------------------------------------------------------------------------------------
# the batch-1 loop


# inference_mode, not no_grad: no version counters or autograd metadata on any tensor;
# 1.5x the decode tok/s of the tiny model on a CPU (bench/cpu.py), where per-op overhead is most of
# a decode step
@torch.inference_mode()
def generate_tokens(model: Llama, prompt_ids: list[int], cfg: SamplingConfig,
                    eos_id: int | None = None, stats: GenerationStats | None = None,
                    decode_fn=decode_one_token) -> Iterator[int]:
    """Yield new token ids one at a time (batch 1) until max_new_tokens or EOS
    (EOS is not yielded)."""
    device = model.embed_tokens.weight.device
    T = len(prompt_ids)
    check_prompt_length(T, model.config.max_seq_len)
    total = min(T + cfg.max_new_tokens, model.config.max_seq_len)
    generator = sampling_generator(cfg, device)
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = T
    with decoding([model], 1, total):
        clock = Clock(stats, device)
        context = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, T)
        token = sample(prefill(model, context, torch.arange(T, device=device)), context, cfg,
                       generator)
        clock.prefill_done()
        for pos in range(T, total):
            tok = int(token)  # (1, 1) → int
            if eos_id is not None and tok == eos_id:
                break
            stats.new_tokens += 1
            yield tok
            if pos + 1 >= total:
                break
            context = torch.cat([context, token], dim=1)  # (1, pos + 1)
            logits = decode_fn(model, token, torch.tensor([pos], device=device))  # (1, V)
            token = sample(logits, context, cfg, generator)
            clock.step_done()
        clock.decode_done()
