"""From the logits of the last position to the next token:
the sampling knobs, as small pure functions.

Applied in this order to the logits (B, V) of each row's last position:
  1. repetition penalty (CTRL, Keskar et al. 2019, https://arxiv.org/abs/1909.05858): a token
     already in the context has its logit divided by the penalty when positive, multiplied when
     negative (HF's convention);
  2. temperature 0 → greedy argmax; otherwise logits / temperature;
  3. top-k keeps the k largest logits; top-p (nucleus, Holtzman et al. 2019,
     https://arxiv.org/abs/1904.09751) keeps the smallest set of tokens whose probability mass
     reaches p (the token that crosses p is kept).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


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
        # written as "not (ok)": NaN fails every comparison, so it must fail each of these checks
        if not 0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be a finite number >= 0, found {self.temperature}")
        if self.top_k is not None and not self.top_k >= 1:
            raise ValueError(f"top_k must be >= 1, found {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], found {self.top_p}")
        if not 0 < self.repetition_penalty < math.inf:
            raise ValueError(f"repetition_penalty must be a finite number > 0, found "
                             f"{self.repetition_penalty}")
        if not self.max_new_tokens >= 0:
            raise ValueError(f"max_new_tokens must be >= 0, found {self.max_new_tokens}")


def apply_repetition_penalty(logits: torch.Tensor, context: torch.Tensor,
                             penalty: float) -> torch.Tensor:
    """logits (B, V), context (B, S) ids already seen → penalized logits (B, V)."""
    if penalty == 1.0:
        return logits
    seen = torch.gather(logits, 1, context)  # (B, S)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, context, seen)


def logits_to_probs(logits: torch.Tensor, temperature: float, top_k: int | None,
                    top_p: float | None):
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


def next_token_probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """logits (N, V) → the distribution `sample` draws from (N, V), repetition penalty aside;
    temperature 0 gives the argmax one-hot (what speculative decoding's rejection rule compares)."""
    if cfg.temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.size(-1)).float()
    return logits_to_probs(logits, cfg.temperature, cfg.top_k, cfg.top_p)


def sample(logits: torch.Tensor, context: torch.Tensor, cfg: SamplingConfig,
           generator=None) -> torch.Tensor:
    """logits (B, V) of the last position → next ids (B, 1)."""
    logits = apply_repetition_penalty(logits, context, cfg.repetition_penalty)
    if cfg.temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = logits_to_probs(logits, cfg.temperature, cfg.top_k, cfg.top_p)
    return torch.multinomial(probs, 1, generator=generator)


def sampling_generator(cfg: SamplingConfig, device) -> torch.Generator | None:
    """The random generator a generation draws from:
    seeded by cfg.seed (reproducible), or None (torch's)."""
    return None if cfg.seed is None else torch.Generator(device=device).manual_seed(cfg.seed)
