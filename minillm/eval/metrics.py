"""Evaluating a fine-tuned model: held-out loss and perplexity, short-answer accuracy by greedy decoding,
and a Markdown side-by-side report of base vs fine-tuned generations.

Loss and perplexity over a test split, weighted by tokens (not by batches or examples):

    loss = Σ_t CE(logits_t, y_t) / N,   the sum over every position t with y_t != -100, N their count
    ppl  = exp(loss)

so a long response counts in proportion to its tokens, exactly as if the whole split were one batch.

Short answers (e.g. stdlib_dataset's "Which module defines `X`?"): generate greedily from the templated
prompt until EOS or max_new_tokens, then compare with the reference after normalizing whitespace
(`" ".join(s.split())`):
    exact     normalize(prediction) == normalize(reference)
    contains  normalize(reference) is a substring of normalize(prediction)
Greedy decoding comes from generation.py (`generate_tokens` with temperature 0).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from minillm.data.instruct import (
    IGNORE,
    TokenizedExample,
    iter_batches,
    prompt_text,
    reference_text,
)
from minillm.generate.decode import SamplingConfig, generate_tokens
from minillm.util.fileio import atomic_write_bytes


@torch.no_grad()
def evaluate_loss(model, examples: list[TokenizedExample], batch_size: int, pad_id: int,
                  device=None) -> dict:
    """{"loss", "ppl", "tokens"} over the examples in order (token-weighted mean cross-entropy)."""
    if device is None:
        device = model.embed_tokens.weight.device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for x, y in iter_batches(examples, batch_size, pad_id):
            x, y = x.to(device), y.to(device)  # (B, T)
            logits, _ = model(x)  # (B, T, V)
            total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE,
                                     reduction="sum").item()
            count += int((y != IGNORE).sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("evaluate_loss: no target tokens (every label is -100)")
    loss = total / count
    return {"loss": loss, "ppl": math.exp(loss), "tokens": count}


def normalize(s: str) -> str:
    return " ".join(s.split())


def exact_match(prediction: str, reference: str) -> bool:
    return normalize(prediction) == normalize(reference)


def contains(prediction: str, reference: str) -> bool:
    return normalize(reference) in normalize(prediction)


@torch.no_grad()
def greedy_answer(model, tokenizer, prompt: str, max_new_tokens: int = 32) -> str:
    """Greedy continuation of `prompt` (BOS + prompt, as in training) until EOS, decoded and stripped."""
    was_training = model.training
    model.eval()
    try:
        ids = tokenizer.encode(prompt, bos=True)
        cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0, top_k=None)
        out = list(generate_tokens(model, ids, cfg, eos_id=tokenizer.eos_id))
    finally:
        model.train(was_training)
    return tokenizer.decode(out).strip()


def short_answer_accuracy(model, tokenizer, examples, template: str | None = None,
                          max_new_tokens: int = 32) -> dict:
    """Greedy answers for instruct Examples → {"exact", "contains", "n", "rows": [prompt, reference,
    prediction, exact, contains]}; exact and contains are fractions in [0, 1]."""
    rows = []
    for ex in examples:
        prompt, ref = prompt_text(ex, template), reference_text(ex)
        pred = greedy_answer(model, tokenizer, prompt, max_new_tokens)
        rows.append(dict(instruction=ex.instruction or prompt, prompt=prompt, reference=ref, prediction=pred,
                         exact=exact_match(pred, ref), contains=contains(pred, ref)))
    n = len(rows)
    if n == 0:
        raise ValueError("short_answer_accuracy: no examples")
    return {"exact": sum(r["exact"] for r in rows) / n, "contains": sum(r["contains"] for r in rows) / n,
            "n": n, "rows": rows}


# -----------------------------------------------------------------------------------------------------
# the side-by-side report


def _cell(s: str) -> str:
    """Markdown table cell: pipes escaped, newlines as <br>."""
    return s.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def side_by_side_rows(base_model, tuned_model, tokenizer, examples, template: str | None = None,
                      max_new_tokens: int = 64) -> list[dict]:
    """[{instruction, reference, base, tuned}] for held-out Examples. The two models may be the same LoRA
    model: pass `base_model=None` to use it with its adapters disabled (lora.lora_disabled)."""
    from minillm.finetune.lora import lora_disabled

    rows = []
    for ex in examples:
        prompt = prompt_text(ex, template)
        if base_model is None:
            with lora_disabled(tuned_model):
                base = greedy_answer(tuned_model, tokenizer, prompt, max_new_tokens)
        else:
            base = greedy_answer(base_model, tokenizer, prompt, max_new_tokens)
        tuned = greedy_answer(tuned_model, tokenizer, prompt, max_new_tokens)
        rows.append(dict(instruction=ex.instruction if ex.kind == "alpaca" else prompt,
                         reference=reference_text(ex), base=base, tuned=tuned))
    return rows


def write_report(path: str | Path, rows: list[dict], title: str = "Base vs fine-tuned",
                 metrics: dict | None = None) -> Path:
    """A Markdown file: optional metrics table, then one row per prompt | reference | base | fine-tuned,
    with ✓ marking exact matches. Written to a temp name and renamed (atomic)."""
    path = Path(path)
    lines = [f"# {title}", ""]
    if metrics:
        lines += ["| metric | base | fine-tuned |", "|---|---|---|"]
        for name, (b, t) in metrics.items():
            lines.append(f"| {_cell(name)} | {b:.4g} | {t:.4g} |")
        lines.append("")
    lines += ["| # | instruction | reference | base | fine-tuned |", "|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        mark = {k: " ✓" if exact_match(r[k], r["reference"]) else "" for k in ("base", "tuned")}
        lines.append(f"| {i} | {_cell(r['instruction'])} | {_cell(r['reference'])} | "
                     f"{_cell(r['base'])}{mark['base']} | {_cell(r['tuned'])}{mark['tuned']} |")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode("utf-8"))
    return path


if __name__ == "__main__":  # python -m minillm.eval.metrics: the fidelity ledger of a base + adapter (ledger.py)
    from minillm.eval.ledger import main

    main()
