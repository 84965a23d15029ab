"""The loss, once: next-token cross-entropy summed over the target tokens, and the held-out mean of
it that training's val loss, evaluation, the ledger and the harness's perplexity all report.

    token_loss_sum(model, x, y)   Σ_t CE(logits_t, y_t) over every t with y_t != -100  (float32)
    held_out_loss(model, batches) Σ over batches of that sum / the number of targets N,
                                  and exp of it

Weighting by tokens, not by batches or examples, makes the held-out loss that of the whole split as
one batch: a long response counts in proportion to its tokens, and so does a short last batch.
Training divides the same sum by the target count of the whole step (loop.forward_backward), so k
micro-batches give exactly the gradient of one batch k times larger.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F

IGNORE = -100  # a target that adds no loss: prompt tokens, padding


def token_loss_sum(model, x: torch.Tensor, y: torch.Tensor,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sum (not mean) of the cross-entropies of the targets in y (B, T) that are not -100, in
    float32. x (B, T) ids; mask: an optional (B, 1, T, T) attention mask (packed examples)."""
    logits, _ = model(x, mask=mask)  # (B, T, V)
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


@torch.no_grad()
def held_out_loss(model, batches, autocast=nullcontext, world_size: int = 1) -> dict:
    """{"loss", "ppl", "tokens"}: the token-weighted mean cross-entropy over (x, y) batches, summed
    over every rank's batches when world_size > 1 (each rank passes its own). The model runs in eval
    mode and is put back as it was. A set of batches with no target at all is an error, not a
    NaN."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of losses, count]
    try:
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            with autocast():
                total[0] += token_loss_sum(model, x, y).double()
            total[1] += (y != IGNORE).sum()
    finally:
        model.train(was_training)
    if world_size > 1:
        dist.all_reduce(total)
    loss, count = total.tolist()
    if count == 0:
        raise ValueError("held-out loss: no target tokens "
                         "(every label is -100, or there are no examples)")
    return {"loss": loss / count, "ppl": math.exp(min(loss / count, 700.0)), "tokens": int(count)}
