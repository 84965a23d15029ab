"""The preference losses, as pure functions of per-sequence log-probs: DPO (with cDPO's label
smoothing), IPO, hinge (RSO), SimPO, ORPO, and the Bradley–Terry loss of a reward model.

Inputs are, per pair, the log-probs of the chosen and the rejected response tokens only (the prompt
adds nothing), each summed over its tokens, with the token counts n_c, n_r for the losses that
average per token. The reference log-probs come from the frozen starting model (the base with its
adapters switched off, a frozen copy, or a precomputed table: training/preference.py). TRL's
conventions, so numbers compare with a DPOTrainer run (trl/trainer/dpo_trainer.py `_compute_loss`,
trl/experimental/cpo, trl/experimental/orpo):

    π_c = logp_θ(chosen) − logp_ref(chosen),   π_r likewise          (the log-ratios)
    rewards/chosen = β·π_c,  rewards/rejected = β·π_r,  rewards/margins = β(π_c − π_r)
    rewards/accuracies = mean[β·π_c > β·π_r]

and each function returns (per-pair losses (B,), chosen rewards (B,), rejected rewards (B,)), the
rewards detached. The reference-free losses (SimPO, ORPO) report their own rewards as TRL's CPO and
ORPO trainers do: β·(average log-prob) for SimPO, β·log p̄ for ORPO.

Why step 0 of DPO is ln 2: the policy starts as the reference, so π_c = π_r = 0 and the loss is
−log σ(0) = ln 2 for every pair (tests/test_preference.py checks it through the whole loop).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("dpo", "ipo", "hinge", "simpo", "orpo")


def dpo_loss(logp_c, logp_r, ref_c, ref_r, beta: float = 0.1, label_smoothing: float = 0.0):
    """DPO, the sigmoid loss (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290, eq. 7):

        L = −log σ(β(π_c − π_r))

    with cDPO's label smoothing ε, the probability that a label is flipped
    (https://ericmitchell.ai/cdpo.pdf): L = −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ).
    logp_* (B,) summed response log-probs of the policy, ref_* the reference's."""
    pi_c, pi_r = logp_c - ref_c, logp_r - ref_r  # (B,) log-ratios
    logits = beta * (pi_c - pi_r)
    losses = (-(1 - label_smoothing) * F.logsigmoid(logits)
              - label_smoothing * F.logsigmoid(-logits))
    return losses, (beta * pi_c).detach(), (beta * pi_r).detach()


def ipo_loss(logp_c, logp_r, ref_c, ref_r, n_c, n_r, beta: float = 0.1):
    """IPO (Azar et al. 2023, https://arxiv.org/abs/2310.12036, eq. 17), with β as the paper's τ:

        L = ((π_c / n_c − π_r / n_r) − 1 / (2β))²

    the log-ratios averaged per response token (TRL's form, agreed with the authors: a summed
    log-ratio would make the squared loss grow with the response length). n_* (B,) token counts."""
    pi_c, pi_r = logp_c - ref_c, logp_r - ref_r
    delta = pi_c / n_c.clamp(min=1) - pi_r / n_r.clamp(min=1)
    losses = (delta - 1 / (2 * beta)) ** 2
    return losses, (beta * pi_c).detach(), (beta * pi_r).detach()


def hinge_loss(logp_c, logp_r, ref_c, ref_r, beta: float = 0.1):
    """Hinge loss on the DPO margin, as in RSO / SLiC (Liu et al. 2023,
    https://arxiv.org/abs/2309.06657, eq. 8 with γ = 1/β): L = max(0, 1 − β(π_c − π_r))."""
    pi_c, pi_r = logp_c - ref_c, logp_r - ref_r
    losses = torch.relu(1 - beta * (pi_c - pi_r))
    return losses, (beta * pi_c).detach(), (beta * pi_r).detach()


def simpo_loss(logp_c, logp_r, n_c, n_r, beta: float = 2.0, gamma: float = 0.5,
               label_smoothing: float = 0.0):
    """SimPO (Meng et al. 2024, https://arxiv.org/abs/2405.14734, eq. 6): reference-free, the
    reward is the length-normalised log-prob, and γ is the target margin:

        L = −log σ(β·(logp_c / n_c − logp_r / n_r) − γ)

    (TRL's CPOTrainer with loss_type="simpo", cpo_alpha=0 and simpo_gamma=γ, which smooths labels as
    cDPO does). Rewards: β·logp_* / n_*."""
    avg_c, avg_r = logp_c / n_c.clamp(min=1), logp_r / n_r.clamp(min=1)
    logits = beta * (avg_c - avg_r) - gamma
    losses = (-(1 - label_smoothing) * F.logsigmoid(logits)
              - label_smoothing * F.logsigmoid(-logits))
    return losses, (beta * avg_c).detach(), (beta * avg_r).detach()


def orpo_loss(logp_c, logp_r, n_c, n_r, beta: float = 0.1):
    """ORPO's odds-ratio term (Hong et al. 2024, https://arxiv.org/abs/2403.07691, eq. 6–7),
    reference-free, with β as the paper's λ; the SFT term (the NLL of the chosen tokens) is added by
    the caller, which knows the token count of the whole step:

        p̄ = exp(logp / n),   log odds = log p̄ − log(1 − p̄)
        L_OR = −β · log σ(log odds_c − log odds_r)

    log(1 − p̄) is computed as log1p(−exp(log p̄)), as TRL does. Rewards: β·log p̄_*."""
    avg_c, avg_r = logp_c / n_c.clamp(min=1), logp_r / n_r.clamp(min=1)
    log_odds = (avg_c - avg_r) - (torch.log1p(-torch.exp(avg_c)) - torch.log1p(-torch.exp(avg_r)))
    losses = -beta * F.logsigmoid(log_odds)
    return losses, (beta * avg_c).detach(), (beta * avg_r).detach()


def bradley_terry_loss(score_c, score_r):
    """A reward model's loss (Bradley & Terry 1952; Ouyang et al. 2022,
    https://arxiv.org/abs/2203.02155, eq. 1): P(chosen ≻ rejected) = σ(r_c − r_r), so

        L = −log σ(r_c − r_r)

    score_* (B,) the scalar head's outputs; they are the rewards (TRL's RewardTrainer)."""
    return -F.logsigmoid(score_c - score_r), score_c.detach(), score_r.detach()
