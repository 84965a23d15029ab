"""Preference tuning inside the training loop: the response log-probs, the reference model, the
reward model's head, and `PreferencePairs`, the data source loop.py draws [chosen; rejected]
batches from (the same interface as its TokenStream and InstructExamples).

    batch      x, y (2B, T) = [chosen; rejected] with −100 off the responses, index (B,)
    policy     logp (2B,) = Σ_t log p_θ(y_t | x_≤t) over response tokens: ONE forward
    reference  the same sums from the starting model, in no_grad:
                 LoRA / DoRA / QLoRA / lora8   the base itself, adapters switched off
                                               (adapters.lora_disabled): no second model
                 full fine-tuning              a frozen copy, or (preference.precompute_ref) a
                                               table computed once at step 0 into data.cache_dir,
                                               written atomically and reused on resume
                 simpo, orpo, reward           none (reference-free)
    loss       preference_loss.py, mean over the step's pairs (ORPO adds the chosen tokens' NLL,
               a mean over the step's chosen tokens, as TRL does)

The reward model (preference.loss = "reward") is the same Llama with a scalar head `score`
(dim → 1, HF's LlamaForSequenceClassification name) read at each sequence's last position: the
one that predicts its EOS, i.e. after the whole response. It trains with the Bradley–Terry loss;
its held-out pair accuracy is `rewards/accuracies`.

Metrics carry TRL's names (rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins,
logps/chosen, logps/rejected): means over the step's pairs on every rank, in tensorboard as
train/… and eval/… like a TRL run's.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import io
import itertools
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from minillm.data.preference import (
    IGNORE,
    PreferenceData,
    get_preference_batch,
    iter_pair_batches,
)
from minillm.data.pretrain import CACHE_FILES
from minillm.finetune.adapters import lora_disabled
from minillm.training.loss import CHUNK_ELEMENTS, at_least_float32
from minillm.training.preference_loss import (
    bradley_terry_loss,
    dpo_loss,
    hinge_loss,
    ipo_loss,
    orpo_loss,
    simpo_loss,
)
from minillm.util.fileio import atomic_write_bytes, claim_directory

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected")
REFERENCE_FREE = ("simpo", "orpo", "reward")

# --------------------------------------------------------------------------------------------------
# log-probs of the response tokens, chunked over rows


def response_logps(head: nn.Module, h: torch.Tensor, targets: torch.Tensor,
                   chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Σ_t log softmax(head(h_t))[targets_t] per row over the t with targets_t != −100 → (B,)
    float32. A `loss_fn` for Llama.forward: h (B, T, C) final hidden states, targets (B, T).

    Only the response rows go through the head, about chunk_elements logits at a time, each chunk
    under activation checkpointing (its (n, V) log-softmax is recomputed in backward), so the
    (B, T, V) log-softmax never exists: one chunk's does."""
    B, T = targets.shape
    keep = targets.reshape(-1) != IGNORE  # (B*T,)
    row = torch.arange(B, device=h.device).repeat_interleave(T)[keep]  # (N,) the row of each
    h = h.reshape(-1, h.size(-1))[keep]  # (N, C)
    t = targets.reshape(-1)[keep]  # (N,)
    rows = max(1, chunk_elements // head.out_features)
    grad = torch.is_grad_enabled()
    parts = [checkpoint(_chunk_logps, head, h[i:i + rows], t[i:i + rows], use_reentrant=False)
             if grad else _chunk_logps(head, h[i:i + rows], t[i:i + rows])
             for i in range(0, len(t), rows)]
    per_token = torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)  # (N,)
    return per_token.new_zeros(B).index_add(0, row, per_token)


def _chunk_logps(head: nn.Module, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """h (n, C), t (n,) → log p(t) (n,) in float32."""
    logits = at_least_float32(head(h))  # (n, V)
    return logits.gather(1, t[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


def last_position(targets: torch.Tensor) -> torch.Tensor:
    """(B, T) targets → (B,) the index of each row's last target (the position predicting EOS)."""
    T = targets.size(1)
    has = (targets != IGNORE).long()  # (B, T)
    return (T - 1) - has.flip(1).argmax(1)


def add_reward_head(model: nn.Module) -> nn.Linear:
    """model.score: the reward model's scalar head, float32, trained (init N(0, 0.02²), HF's
    initializer_range)."""
    p = next(model.parameters())
    model.score = nn.Linear(model.config.dim, 1, bias=False, device=p.device, dtype=torch.float32)
    if p.device.type != "meta":
        nn.init.normal_(model.score.weight, std=0.02)
    model.score.weight.requires_grad_(True)
    return model.score


def reward_scores(score: nn.Module, head: nn.Module, h: torch.Tensor,
                  targets: torch.Tensor) -> torch.Tensor:
    """With `score` bound, a `loss_fn` for Llama.forward: r (B,) = score(h at each row's last
    position); lm_head (`head`) is not used."""
    last = last_position(targets)  # (B,)
    with torch.autocast(h.device.type, enabled=False):  # a float32 head: r is a fine difference
        return score(h[torch.arange(len(h), device=h.device), last].float()).squeeze(-1)


# --------------------------------------------------------------------------------------------------
# the losses of one batch


def pair_losses(cfg, logp, ref, n):
    """(per-pair losses (B,), chosen rewards, rejected rewards) for preference.loss; logp, ref, n
    (2B,) the policy's and the reference's summed log-probs and the token counts, [chosen;
    rejected]."""
    p = cfg.preference
    (lc, lr), (nc, nr) = logp.chunk(2), n.chunk(2)
    if p.loss in ("simpo", "orpo"):
        if p.loss == "simpo":
            return simpo_loss(lc, lr, nc, nr, p.beta, p.simpo_gamma, p.label_smoothing)
        return orpo_loss(lc, lr, nc, nr, p.beta)
    rc, rr = ref.chunk(2)
    if p.loss == "ipo":
        return ipo_loss(lc, lr, rc, rr, nc, nr, p.beta)
    if p.loss == "hinge":
        return hinge_loss(lc, lr, rc, rr, p.beta)
    return dpo_loss(lc, lr, rc, rr, p.beta, p.label_smoothing)


def metric_sums(logp, chosen_rewards, rejected_rewards) -> torch.Tensor:
    """(6,) sums over the batch's pairs, in METRICS order (divide by the pair count)."""
    lc, lr = logp.detach().chunk(2)
    return torch.stack([chosen_rewards.sum(), rejected_rewards.sum(),
                        (chosen_rewards > rejected_rewards).float().sum(),
                        (chosen_rewards - rejected_rewards).sum(), lc.sum(), lr.sum()]).double()


# --------------------------------------------------------------------------------------------------
# the data source


@dataclass
class PreferencePairs:
    """loop.py's data source for data.format = "preference": draws pairs, computes their loss
    against the reference, and keeps the step's and the held-out metrics."""

    cfg: object  # TrainConfig
    tokenizer: object
    data: PreferenceData
    baseline: float = float("nan")
    val_metrics: dict = field(default_factory=dict)  # after each val_loss: METRICS means
    step_sums: torch.Tensor | None = None  # this step's metric sums, (6,)
    ref_tables: dict | None = None  # split -> (N, 2) precomputed reference log-probs
    ref_model: nn.Module | None = None  # full fine-tuning's frozen copy
    policy: nn.Module | None = None  # the Llama (adapters off = the reference)
    reward_fn: object = None  # the reward model's scores, a loss_fn for Llama.forward

    @property
    def train(self):
        return self.data.train

    @property
    def val(self):
        return self.data.test

    def draw(self, generator: torch.Generator, rank: int, world_size: int):
        c = self.cfg
        # (2B/W, T) x2, (B/W,)
        return get_preference_batch(self.train, c.batch_size, generator, self.tokenizer.pad_id,
                                    c.block_size if c.compile else None, rank, world_size)

    def count(self, batch) -> list[int]:
        """[pairs, tokens, chosen response tokens]: summed over the step's micro-batches and
        ranks, the denominators of its loss."""
        x, y, index = batch
        return [len(index), x.numel(), int((y[:len(index)] != IGNORE).sum())]

    # ---- the reference ---------------------------------------------------------------------------

    def bind(self, model: nn.Module, initial, device, autocast, rank: int, world_size: int,
             start_step: int):
        """Set up the reference for `model` (the Llama being trained, before compile / DDP).
        initial(): a fresh copy of the starting model (build_model), for full fine-tuning when
        the run resumes (the trained model is no longer the reference)."""
        p, self.policy = self.cfg.preference, model
        if p.loss == "reward":  # one function object: torch.compile guards on it
            self.reward_fn = functools.partial(reward_scores, model.score)
        if p.loss in REFERENCE_FREE:
            return
        adapters = self.cfg.finetune.method != "full"
        if p.precompute_ref:
            self.ref_tables = self.load_or_compute_tables(model, initial, device, autocast,
                                                          rank, start_step)
        elif not adapters:
            ref = copy.deepcopy(model) if start_step == 0 else initial()
            self.ref_model = ref.eval().requires_grad_(False)

    @contextmanager
    def reference(self):
        """The model that computes reference log-probs: the base with adapters off, or the frozen
        copy."""
        if self.ref_model is not None:
            yield self.ref_model
            return
        with lora_disabled(self.policy):
            yield self.policy

    def ref_logps(self, x, y, index, split: str, autocast) -> torch.Tensor:
        """(2B,) the reference's summed response log-probs of a batch, [chosen; rejected]."""
        if self.ref_tables is not None:
            table = self.ref_tables[split].to(x.device)[index]  # (B, 2)
            return torch.cat([table[:, 0], table[:, 1]])
        with torch.no_grad(), self.reference() as ref, autocast():
            return ref(x, y, loss_fn=response_logps)[1]

    def table_path(self, model: nn.Module) -> Path:
        """data.cache_dir/ref_logps-<sha256[:16]>.pt, keyed by every pair's ids, the starting model
        and the precision, so a changed dataset or model never reads a stale table."""
        h = hashlib.sha256()
        for split in (self.train, self.val):
            for t in split:
                h.update(repr((t.prompt_ids, t.chosen_ids, t.rejected_ids)).encode())
        h.update(f"{self.cfg.init_from}|{self.cfg.dtype}|{self.cfg.finetune.method}".encode())
        for name, v in sorted(model.state_dict().items()):  # a fingerprint of the weights
            if v.device.type != "meta" and v.is_floating_point():
                h.update(f"{name}{tuple(v.shape)}".encode())
                h.update(v.detach().reshape(-1)[:256].float().cpu().numpy().tobytes())
        return Path(self.cfg.data.cache_dir) / f"ref_logps-{h.hexdigest()[:16]}.pt"

    def load_or_compute_tables(self, model, initial, device, autocast, rank, start_step) -> dict:
        """The precomputed reference: read when its file exists; else computed (from the model at
        step 0, from initial() on a resume) and written by rank 0, atomically."""
        start = model if start_step == 0 or self.cfg.finetune.method != "full" else initial()
        path = self.table_path(start)
        if path.is_file():
            return torch.load(path, map_location="cpu", weights_only=True)
        tables = {}
        with torch.no_grad(), (lora_disabled(start) if start is model else nullcontext()):
            was = start.training
            start.eval()
            for split, pairs in (("train", self.train), ("val", self.val)):
                rows = []
                for x, y, _ in iter_pair_batches(pairs, self.cfg.batch_size, self.tokenizer.pad_id):
                    with autocast():
                        lp = start(x.to(device), y.to(device), loss_fn=response_logps)[1].cpu()
                    rows.append(torch.stack(lp.chunk(2), dim=1))  # (b, 2)
                tables[split] = torch.cat(rows) if rows else torch.zeros(0, 2)
            start.train(was)
        if rank == 0:
            claim_directory(path.parent, "data cache", legacy=CACHE_FILES)
            buf = io.BytesIO()
            torch.save(tables, buf)
            atomic_write_bytes(path, buf.getvalue())
            print(f"reference log-probs of {len(self.train) + len(self.val):,} pairs -> {path}")
        return tables

    # ---- the loss --------------------------------------------------------------------------------

    def batch_loss(self, model, batch, split: str, autocast):
        """(per-pair losses (B,), chosen and rejected rewards, logp (2B,), n (2B,))."""
        x, y, index = batch
        n = (y != IGNORE).sum(1).float()  # (2B,) response tokens
        with autocast():
            if self.cfg.preference.loss == "reward":
                r = model(x, y, loss_fn=self.reward_fn)[1]
                return (*bradley_terry_loss(*r.chunk(2)), r, n)
            logp = model(x, y, loss_fn=response_logps)[1]  # (2B,)
        ref = (None if self.cfg.preference.loss in REFERENCE_FREE
               else self.ref_logps(x, y, index, split, autocast))
        losses, cr, rr = pair_losses(self.cfg, logp, ref, n)
        return losses, cr, rr, logp, n

    def loss_sum(self, model, batch, counts) -> torch.Tensor:
        """This micro-batch's share of the step loss, times the step's pair count (loop.py divides
        by counts[0]); the metric sums are kept for step_metrics."""
        losses, cr, rr, logp, n = self.batch_loss(model, batch, "train", nullcontext)
        total = losses.sum()
        if self.cfg.preference.loss == "orpo":  # + NLL of the chosen tokens, a token mean
            total = total - logp[:len(losses)].sum() * (counts[0] / counts[2])
        sums = metric_sums(logp, cr, rr)
        self.step_sums = sums if self.step_sums is None else self.step_sums + sums
        return total

    def step_metrics(self, n_pairs: int, world_size: int) -> dict:
        """The step's METRICS means over every rank's pairs (then reset)."""
        sums, self.step_sums = self.step_sums, None
        if world_size > 1:
            dist.all_reduce(sums)
        return dict(zip(METRICS, (sums / n_pairs).tolist(), strict=True))

    @torch.no_grad()
    def val_loss(self, model, autocast, rank: int, world_size: int) -> float:
        """The mean loss over the first eval.iters batches of held-out pairs (batch i on rank
        i % W; a rank one batch short repeats one with zero weight); val_metrics gets their
        METRICS means, rewards/accuracies being the held-out pair accuracy."""
        c = self.cfg
        batches = iter_pair_batches(self.val, c.batch_size, self.tokenizer.pad_id)
        first = list(itertools.islice(batches, c.eval.iters))
        mine = [(b, 1.0) for b in first[rank::world_size]]
        mine += [(b, 0.0) for b in first[:-(-len(first) // world_size) - len(mine)]]
        was = model.training
        model.eval()
        total = torch.zeros(8, dtype=torch.float64, device=next(model.parameters()).device)
        for (x, y, index), weight in mine:
            batch = (x.to(total.device), y.to(total.device), index)
            losses, cr, rr, logp, n = self.batch_loss(model, batch, "val", autocast)
            if c.preference.loss == "orpo":
                losses = losses - logp[:len(losses)] / n[:len(losses)].clamp(min=1)
            total += weight * torch.cat([losses.sum().double()[None], metric_sums(logp, cr, rr),
                                         torch.tensor([len(index)], device=total.device)])
        model.train(was)
        if world_size > 1:
            dist.all_reduce(total)
        count = total[7].item()
        if count == 0:
            raise ValueError("preference val loss: no held-out pairs; raise data.val_frac")
        self.val_metrics = dict(zip(METRICS, (total[1:7] / count).tolist(), strict=True))
        return total[0].item() / count

    def prompt(self, text: str) -> str:
        from minillm.data.templates import format_prompt

        template = self.data.template
        return text if template in ("none",) else format_prompt(template, text)

    def describe(self) -> str:
        return (f"{len(self.train):,} train / {len(self.val):,} val pairs, "
                f"loss {self.cfg.preference.loss}")
