"""Learning-rate schedules: pure functions of the step, written out so the formulas can be read.

Every schedule here is `lr = f(step)` with no state, in the style of nanoGPT's `get_lr`: the
training loop asks for the lr of step `step` and writes it into each param group. Being pure is what
makes resuming exact: a checkpoint only has to store the step.

Shared conventions (the tests pin every one of them):

- `step` is 0-indexed: a run of `total_steps` steps uses steps 0 .. total_steps-1.
- Warmup climbs linearly over steps 0 .. W-1 (W = warmup_steps):

      lr(step) = max_lr * (step + 1) / W            for step < W

  so step 0 already trains (lr = max_lr / W, not 0: a step at lr 0 is a wasted forward/backward) and
  the last warmup step W-1 is exactly max_lr. W = 0 and W = 1 are therefore the same schedule.
- The *peak* is step P = max(W - 1, 0), where lr == max_lr. Decaying schedules fall from max_lr at P
  to exactly min_lr at the last step total_steps-1, through the progress fraction

      p = (step - P) / (total_steps - 1 - P)        in [0, 1]

- Past the end (step >= total_steps) a decaying schedule stays at min_lr; constant stays at max_lr.
  Inverse square root is the exception: it has no horizon (that is its point) and keeps following
  its formula, floored at min_lr.

Schedules (name -> function):
    constant  warmup, then max_lr forever
    linear    warmup, then a straight line to min_lr
    cosine    warmup, then half a cosine to min_lr
              (Loshchilov & Hutter 2016, https://arxiv.org/abs/1608.03983)
    wsd       warmup-stable-decay: warmup, flat max_lr, then a "1 - sqrt" cooldown over the last
              `decay_frac` of the steps (Hägele et al. 2024, https://arxiv.org/abs/2405.18392)
    inv_sqrt  warmup, then max_lr * sqrt(W / (step + 1)) (Vaswani et al. 2017, "Noam" schedule)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULE_NAMES = ("constant", "linear", "cosine", "wsd", "inv_sqrt")


def _warmup(step: int, max_lr: float, warmup_steps: int) -> float:
    # 1) linear warmup: step 0 -> max_lr / W, step W-1 -> max_lr
    return max_lr * (step + 1) / warmup_steps


def _progress(step: int, start: int, total_steps: int) -> float:
    """Fraction of the way from `start` (p = 0) to the last step total_steps-1 (p = 1)."""
    return (step - start) / (total_steps - 1 - start)


def constant_lr(step: int, max_lr: float, warmup_steps: int) -> float:
    """lr = max_lr * (step+1)/W during warmup, then max_lr for every later step (past the end
    too)."""
    if step < warmup_steps:
        return _warmup(step, max_lr, warmup_steps)
    return max_lr


def linear_lr(
    step: int, max_lr: float, min_lr: float, warmup_steps: int, total_steps: int
) -> float:
    """Warmup, then lr = max_lr - p * (max_lr - min_lr): a straight line from the peak to the last
    step."""
    # 1) linear warmup
    if step < warmup_steps:
        return _warmup(step, max_lr, warmup_steps)
    # 2) past the end: hold the floor
    if step >= total_steps - 1:
        return min_lr
    # 3) in between: straight line from max_lr (p = 0) down to min_lr (p = 1)
    p = _progress(step, max(warmup_steps - 1, 0), total_steps)
    return max_lr - p * (max_lr - min_lr)


def cosine_lr(
    step: int, max_lr: float, min_lr: float, warmup_steps: int, total_steps: int
) -> float:
    """Warmup, then lr = min_lr + (1 + cos(pi * p)) / 2 * (max_lr - min_lr).

    The coefficient (1 + cos(pi p)) / 2 goes 1 -> 0 as p goes 0 -> 1: slow at both ends, fastest in
    the middle, where it equals 1/2 (so the midpoint lr is the mean of max_lr and min_lr).
    """
    # 1) linear warmup
    if step < warmup_steps:
        return _warmup(step, max_lr, warmup_steps)
    # 2) past the end: hold the floor
    if step >= total_steps - 1:
        return min_lr
    # 3) in between: cosine from max_lr down to min_lr
    p = _progress(step, max(warmup_steps - 1, 0), total_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * p))  # 1 -> 0
    return min_lr + coeff * (max_lr - min_lr)


def wsd_decay_start(total_steps: int, decay_frac: float) -> int:
    """The last step at max_lr before the WSD cooldown: the final round(decay_frac * total_steps)
    steps are strictly below max_lr and the last of them is exactly min_lr."""
    return total_steps - 1 - round(decay_frac * total_steps)


def wsd_lr(
    step: int, max_lr: float, min_lr: float, warmup_steps: int, total_steps: int, decay_frac: float
) -> float:
    """Warmup-stable-decay: warmup, max_lr until step S, then
    lr = min_lr + (1 - sqrt(q)) * (max_lr - min_lr).

    S = wsd_decay_start(total_steps, decay_frac) and q = (step - S) / (total_steps - 1 - S) is the
    progress through the cooldown. "1 - sqrt" drops fast at first and flattens near the end; Hägele
    et al. found it beats a linear cooldown. The flat phase does not depend on total_steps, so a run
    can be extended and cooled down from any earlier checkpoint: the reason to use WSD.
    """
    # 1) linear warmup
    if step < warmup_steps:
        return _warmup(step, max_lr, warmup_steps)
    # 2) past the end: hold the floor
    if step >= total_steps - 1:
        return min_lr
    # 3) stable phase at the peak
    start = wsd_decay_start(total_steps, decay_frac)
    if step <= start:
        return max_lr
    # 4) cooldown: 1 - sqrt(q) goes 1 -> 0
    q = _progress(step, start, total_steps)
    return min_lr + (1.0 - math.sqrt(q)) * (max_lr - min_lr)


def inv_sqrt_lr(step: int, max_lr: float, min_lr: float, warmup_steps: int) -> float:
    """Warmup, then lr = max(min_lr, max_lr * sqrt(max(W, 1) / (step + 1))).

    At the peak (step + 1 = W) the ratio is 1, so the curve joins the warmup with no jump; it halves
    each time the step count quadruples. It never reaches a planned end, so it ignores total_steps.
    """
    # 1) linear warmup
    if step < warmup_steps:
        return _warmup(step, max_lr, warmup_steps)
    # 2) inverse square root decay, floored at min_lr
    return max(min_lr, max_lr * math.sqrt(max(warmup_steps, 1) / (step + 1)))


@dataclass
class ScheduleConfig:
    name: str = "cosine"  # one of SCHEDULE_NAMES
    max_lr: float = 3e-4  # peak lr, reached at the last warmup step
    min_lr: float = 3e-5  # floor: the lr of the last step (nanoGPT/Chinchilla use max_lr / 10)
    warmup_steps: int = 100  # steps 0 .. warmup_steps-1 climb linearly to max_lr
    total_steps: int = 10_000  # length of the run; decaying schedules reach min_lr at total_steps-1
    decay_frac: float = 0.2  # wsd only: fraction of total_steps spent in the cooldown

    def __post_init__(self):
        if self.name not in SCHEDULE_NAMES:
            raise ValueError(
                f"ScheduleConfig.name: unknown schedule {self.name!r}; "
                f"expected one of {SCHEDULE_NAMES}"
            )
        if not self.max_lr > 0.0:  # also refuses NaN
            raise ValueError(f"ScheduleConfig.max_lr must be > 0, found {self.max_lr!r}")
        if not 0.0 <= self.min_lr <= self.max_lr:
            raise ValueError(
                f"ScheduleConfig: need 0 <= min_lr <= max_lr, found min_lr={self.min_lr}, "
                f"max_lr={self.max_lr}"
            )
        if self.warmup_steps < 0 or self.total_steps < 1:
            raise ValueError(
                f"ScheduleConfig: need warmup_steps >= 0 and total_steps >= 1, found "
                f"warmup_steps={self.warmup_steps}, total_steps={self.total_steps}"
            )
        if self.name in ("linear", "cosine", "wsd") and self.warmup_steps >= self.total_steps:
            raise ValueError(
                f"ScheduleConfig: schedule {self.name!r} needs warmup_steps < total_steps to "
                f"leave room to decay, found warmup_steps={self.warmup_steps}, "
                f"total_steps={self.total_steps}"
            )
        if self.name == "wsd":
            if not 0.0 < self.decay_frac <= 1.0:
                raise ValueError(
                    f"ScheduleConfig.decay_frac must be in (0, 1], found {self.decay_frac}"
                )
            if round(self.decay_frac * self.total_steps) < 1:
                raise ValueError(
                    f"ScheduleConfig: wsd cooldown of round(decay_frac * total_steps) = "
                    f"round({self.decay_frac} * {self.total_steps}) steps is empty; expected >= 1"
                )
            start, peak = (wsd_decay_start(self.total_steps, self.decay_frac),
                           max(self.warmup_steps - 1, 0))
            if start < peak:
                raise ValueError(
                    f"ScheduleConfig: wsd cooldown would start at step {start}, "
                    f"before the warmup peak at step {peak} "
                    f"(warmup_steps={self.warmup_steps}, total_steps={self.total_steps}, "
                    f"decay_frac={self.decay_frac})"
                )


def get_lr(step: int, cfg: ScheduleConfig) -> float:
    """The learning rate for 0-indexed `step` under `cfg` (see the module docstring for the
    conventions)."""
    if step < 0:
        raise ValueError(f"get_lr: step must be >= 0, found {step}")
    if cfg.name == "constant":
        return constant_lr(step, cfg.max_lr, cfg.warmup_steps)
    if cfg.name == "linear":
        return linear_lr(step, cfg.max_lr, cfg.min_lr, cfg.warmup_steps, cfg.total_steps)
    if cfg.name == "cosine":
        return cosine_lr(step, cfg.max_lr, cfg.min_lr, cfg.warmup_steps, cfg.total_steps)
    if cfg.name == "wsd":
        return wsd_lr(step, cfg.max_lr, cfg.min_lr, cfg.warmup_steps, cfg.total_steps,
                      cfg.decay_frac)
    if cfg.name == "inv_sqrt":
        return inv_sqrt_lr(step, cfg.max_lr, cfg.min_lr, cfg.warmup_steps)
    # a config mutated after construction skips __post_init__, so check again here
    raise ValueError(f"get_lr: unknown schedule {cfg.name!r}; expected one of {SCHEDULE_NAMES}")
