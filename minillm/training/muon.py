"""Muon for the hidden weight matrices, AdamW for everything else: one optimizer, one learning rate.

Muon (Keller Jordan 2024, https://kellerjordan.github.io/posts/muon/) replaces a matrix's update by
the nearest semi-orthogonal matrix to its momentum. The update is scaled as in "Muon is Scalable for
LLM Training" (Liu et al. 2025, https://arxiv.org/abs/2502.16982) to have AdamW's size, so both
kinds of parameter share the loop's learning rate, schedule and weight decay. For a weight
W (out, in) with gradient G, momentum β:

    M ← β·M + (1−β)·G                       momentum buffer
    U ← G + β·(M − G)                       Nesterov: look one momentum step ahead
    O ← newton_schulz(U) ≈ U (UᵀU)^(-1/2)   every singular value of U pushed to ≈ 1
    W ← W·(1 − lr·wd) − lr · 0.2·√max(out, in) · O

Why: a matrix's gradient is dominated by a few directions; flattening its singular values gives the
rare directions as large a step as the common ones. O's entries have RMS ≈ 1/√max(out, in), so the
factor 0.2·√max(out, in) gives the update RMS ≈ 0.2, about what AdamW's has.

The embedding, lm_head and the 1-D norm gains keep AdamW, as in every Muon recipe: an embedding row
is a lookup, not a linear map of the residual stream, and a vector has no singular values. Cost:
5 Newton–Schulz iterations per matrix per step, each three small matmuls on the (min, min) Gram
matrix.
"""

from __future__ import annotations

import math

import torch

# Jordan's quintic: the largest slope at 0 that still converges
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(G: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """G (out, in), or a stack (n, out, in) of same-shape matrices → ≈ U·Vᵀ of each, where
    G = U·S·Vᵀ, in float32.

    Scaled by its Frobenius norm (≥ the spectral norm) every singular value s starts in (0, 1]; each
    step X ← a·X + (b·A + c·A²)·X with A = X·Xᵀ maps s ↦ a·s + b·s³ + c·s⁵, which drives s into
    roughly [0.7, 1.2] after 5 steps (not exactly 1: this quintic trades precision for speed, which
    does not hurt training). Works on the wide orientation so that A is the smaller Gram matrix.
    """
    a, b, c = NS_COEFFICIENTS
    X = G.float()
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)  # each matrix by its own Frobenius norm
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        X = X.mT  # (in, out): now rows ≤ columns
    for _ in range(steps):
        A = X @ X.mT  # (rows, rows)
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if tall else X


def is_hidden_matrix(name: str, p: torch.Tensor) -> bool:
    """The projections inside the blocks (attention and MLP weights): what Muon updates. LoRA's
    small lora_A / lora_B factors are not among them and keep AdamW."""
    return p.dim() == 2 and name.startswith("layers.") and name.endswith("_proj.weight")


class MuonAdamW(torch.optim.Optimizer):
    """Param groups with muon=True get the Muon update above, the others AdamW (decoupled decay,
    bias correction). Every group's "lr" is set by the loop; state_dict / load_state_dict resume
    both.

    Matrices of one shape (every layer's q_proj, say) are orthogonalized together, as one stack: the
    same arithmetic in a few batched matmuls instead of 15 small ones per matrix, which takes the
    main job's Muon step from 1.16x to 1.09x the time of a fused AdamW step (2-core CPU). A stack
    holds at most STACK_ELEMENTS values, so a large model's matrices go a few at a time."""

    STACK_ELEMENTS = 1 << 26  # 256 MiB of float32 per Newton–Schulz batch

    def __init__(self, groups, lr: float, betas: tuple[float, float], eps: float,
                 momentum: float = 0.95, ns_steps: int = 5):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=0.0, momentum=momentum,
                        ns_steps=ns_steps, muon=False)
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not group["muon"]:
                for p in params:
                    self._adamw(p, self.state[p], group)
                continue
            by_shape: dict[torch.Size, list[torch.Tensor]] = {}
            for p in params:
                by_shape.setdefault(p.shape, []).append(p)
            for same in by_shape.values():
                n = max(1, self.STACK_ELEMENTS // same[0].numel())
                for i in range(0, len(same), n):
                    self._muon(same[i:i + n], group)

    def _muon(self, params: list[torch.Tensor], group: dict):
        """The Muon update of same-shape matrices, orthogonalized as one stack (n, out, in)."""
        lr, beta = group["lr"], group["momentum"]
        lookahead = []
        for p in params:
            state = self.state[p]
            if not state:
                state["momentum"] = torch.zeros_like(p)
            m = state["momentum"]
            m.lerp_(p.grad, 1 - beta)  # M ← β·M + (1−β)·G
            lookahead.append(p.grad.lerp(m, beta))  # Nesterov: G + β·(M − G)
        updates = newton_schulz(torch.stack(lookahead), group["ns_steps"])  # (n, out, in)
        for p, update in zip(params, updates, strict=True):
            p.mul_(1 - lr * group["weight_decay"])
            p.add_(update.to(p.dtype), alpha=-lr * 0.2 * math.sqrt(max(p.shape)))

    def _adamw(self, p: torch.Tensor, state: dict, group: dict):
        lr, (beta1, beta2) = group["lr"], group["betas"]
        if not state:
            state["step"] = 0
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
        state["step"] += 1
        m, v, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
        m.lerp_(p.grad, 1 - beta1)  # first moment
        v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)  # second moment
        denom = (v / (1 - beta2**t)).sqrt_().add_(group["eps"])
        p.mul_(1 - lr * group["weight_decay"])
        p.addcdiv_(m, denom, value=-lr / (1 - beta1**t))


def muon_adamw(model: torch.nn.Module, weight_decay: float, lr: float, betas: tuple[float, float],
               eps: float) -> MuonAdamW:
    """Muon on the hidden matrices (decayed), AdamW on embeddings and lm_head (decayed) and on the
    1-D norm gains (not decayed), like training/loop.py's configure_optimizer's AdamW groups."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    hidden = [p for n, p in named if is_hidden_matrix(n, p)]
    other_2d = [p for n, p in named if p.dim() >= 2 and not is_hidden_matrix(n, p)]
    vectors = [p for n, p in named if p.dim() < 2]
    groups = [dict(params=hidden, weight_decay=weight_decay, muon=True),
              dict(params=other_2d, weight_decay=weight_decay),
              dict(params=vectors, weight_decay=0.0)]
    return MuonAdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps)
