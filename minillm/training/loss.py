"""The loss, once: next-token cross-entropy summed over the target tokens, and the held-out mean of
it that training's val loss, evaluation, the ledger and the harness's perplexity all report.

    token_loss_sum(model, x, y)   Σ_t CE(logits_t, y_t) over every t with y_t != -100  (float32)
    chunked_cross_entropy(...)    that sum from the final hidden states, one chunk at a time
    held_out_loss(model, batches) Σ over batches of that sum / the number of targets N,
                                  and exp of it

Weighting by tokens, not by batches or examples, makes the held-out loss that of the whole split as
one batch: a long response counts in proportion to its tokens, and so does a short last batch.
Training divides the same sum by the target count of the whole step (loop.forward_backward), so k
micro-batches give exactly the gradient of one batch k times larger.

The sum is computed without the (B, T, V) logits (chunked_cross_entropy, which the model calls on
its final hidden states): with SmolLM2's V = 49,152, a batch of 16 × 256 tokens would hold 805 MB of
float32 logits, and autograd as much again for the log-softmax. Rows whose target is -100 (a
prompt, padding) are dropped before the head runs at all, and the rest go through lm_head in chunks
of about CHUNK_ELEMENTS logits, each freed before the next: peak memory is one chunk, whatever the
vocabulary. The gradient is taken inside the same pass (the gradient of cross-entropy with respect
to the logits is softmax − one_hot(target)), so backward costs no second trip through lm_head.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE = -100  # a target that adds no loss: prompt tokens, padding
CHUNK_ELEMENTS = 1 << 23  # logits per chunk: 8M floats, 32 MB (170 rows of a 49,152 vocabulary)


def token_loss_sum(model, x: torch.Tensor, y: torch.Tensor,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sum (not mean) of the cross-entropies of the targets in y (B, T) that are not -100, in
    float32. x (B, T) ids; mask: an optional (B, 1, T, T) attention mask (packed examples)."""
    return model(x, y, mask=mask, loss_fn=chunked_cross_entropy)[1]


def chunked_cross_entropy(head: nn.Module, h: torch.Tensor, targets: torch.Tensor,
                          chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Σ CE(head(h_t), targets_t) over the t with targets_t != -100, in float32, chunk by chunk.

    head: the model's lm_head (V outputs); h (B, T, C) final hidden states; targets (B, T). Equal
    to F.cross_entropy(head(h).float().view(-1, V), targets.view(-1), ignore_index=-100,
    reduction="sum") in value and in gradient (tests/test_chunked_loss.py). A plain bias-free
    nn.Linear takes the fused path (_LinearCrossEntropy); any other head (a LoRA-wrapped lm_head,
    an FSDP unit of its own) runs per chunk under activation checkpointing, recomputing the
    chunk's logits in backward."""
    keep = targets.reshape(-1) != IGNORE  # (B*T,)
    h = h.reshape(-1, h.size(-1))[keep]  # (N, C): only the rows that carry a loss
    targets = targets.reshape(-1)[keep]  # (N,)
    rows = max(1, chunk_elements // head.out_features)
    grad = torch.is_grad_enabled() and (h.requires_grad
                                        or any(p.requires_grad for p in head.parameters()))
    if grad and type(head) is nn.Linear and head.bias is None:
        return _LinearCrossEntropy.apply(h, head.weight, targets, rows)
    total = h.new_zeros((), dtype=at_least_float32(h).dtype)
    for i in range(0, len(h), rows):
        hc, tc = h[i:i + rows], targets[i:i + rows]
        total = total + (checkpoint(_chunk_loss, head, hc, tc, use_reentrant=False) if grad
                         else _chunk_loss(head, hc, tc))
    return total


def _chunk_loss(head: nn.Module, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Σ CE over one chunk: h (n, C), targets (n,) → float32 scalar."""
    return F.cross_entropy(at_least_float32(head(h)), targets, reduction="sum")


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """float16 / bfloat16 (autocast's matmul outputs) → float32; float32 and float64 as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class _LinearCrossEntropy(torch.autograd.Function):
    """loss = Σ_i CE(h_i Wᵀ, t_i), the gradient computed in the forward pass, one chunk at a time.

    With z = h Wᵀ (n, V) and p = softmax(z): ∂loss/∂z = p − one_hot(t), so ∂loss/∂h = (p − 1_t) W
    and ∂loss/∂W = (p − 1_t)ᵀ h. Each chunk's z is freed as soon as its gradients are added up;
    backward only scales the stored gradients by the incoming one. Under autocast W is cast once,
    and the two matmuls with W run in autocast's dtype, as lm_head's forward and backward would;
    ∂loss/∂W accumulates in float32 (addmm_, no temporary of W's size)."""

    @staticmethod
    def forward(ctx, h, weight, targets, rows):
        # h (N, C), weight (V, C), targets (N,)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(h) if need_h else None  # (N, C)
        grad_w = torch.zeros_like(at_least_float32(weight)) if need_w else None  # (V, C)
        loss = torch.zeros((), dtype=at_least_float32(h).dtype, device=h.device)
        w = weight  # the matmul copy: autocast's dtype, cast once rather than once per chunk
        if torch.is_autocast_enabled(h.device.type):
            w = weight.to(torch.get_autocast_dtype(h.device.type))
        for i in range(0, len(h), rows):
            hc, tc = h[i:i + rows], targets[i:i + rows]  # (n, C), (n,)
            logp = torch.log_softmax(at_least_float32(hc @ w.t()), dim=-1)  # (n, V)
            loss -= logp.gather(1, tc[:, None]).sum()
            dz = logp.exp_()  # softmax, in place
            dz[torch.arange(len(tc), device=dz.device), tc] -= 1.0  # − one_hot(t)
            if need_h:
                grad_h[i:i + rows] = dz.to(hc.dtype) @ w  # (n, C)
            if need_w:
                grad_w.addmm_(dz.t().to(grad_w.dtype), hc.to(grad_w.dtype))  # (V, C)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_loss.to(grad_h.dtype) if grad_h is not None else None,
                (grad_w * grad_loss).to(ctx.weight_dtype) if grad_w is not None else None,
                None, None)


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
