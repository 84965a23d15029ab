"""Evaluating a fine-tuned model: held-out loss and perplexity, short-answer accuracy by greedy
decoding, and a Markdown side-by-side report of base vs fine-tuned generations.

Loss and perplexity over a test split are training/loss.py's `held_out_loss` over the examples'
batches (`held_out_loss(model, iter_batches(examples, 16, pad_id))`), weighted by tokens:

    loss = Σ_t CE(logits_t, y_t) / N,  the sum over every position t with y_t != -100, N their count
    ppl  = exp(loss)

Short answers (e.g. stdlib_qa's "Which module defines `X`?"): generate greedily from the templated
prompt until EOS or max_new_tokens (generate/text.py's `generate_text`), then compare with the
reference after normalizing whitespace (`" ".join(s.split())`):
    exact     normalize(prediction) == normalize(reference)
    contains  normalize(reference) is a substring of normalize(prediction)
"""

from __future__ import annotations

from pathlib import Path

from minillm.data.instruct import prompt_text, reference_text
from minillm.generate.sampling import SamplingConfig
from minillm.generate.text import generate_text, generate_text_batch
from minillm.util.fileio import atomic_write_bytes


def normalize(s: str) -> str:
    return " ".join(s.split())


def exact_match(prediction: str, reference: str) -> bool:
    return normalize(prediction) == normalize(reference)


def contains(prediction: str, reference: str) -> bool:
    return normalize(reference) in normalize(prediction)


def short_answer_accuracy(model, tokenizer, examples, template=None, max_new_tokens: int = 32,
                          batch_size: int = 1) -> dict:
    """Greedy answers for instruct Examples → {"exact", "contains", "n", "rows": [prompt, reference,
    prediction, exact, contains]}; exact and contains are fractions in [0, 1]. Answers are greedy
    (the templated prompt, as in training) until EOS or max_new_tokens, stripped. batch_size > 1
    decodes that many prompts together, left-padded (generate_text_batch): faster, and the same
    answers up to float rounding."""
    greedy = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0, top_k=None)
    prompts = [prompt_text(ex, template) for ex in examples]
    if batch_size > 1:
        preds = [p for i in range(0, len(prompts), batch_size)
                 for p in generate_text_batch(model, tokenizer, prompts[i:i + batch_size],
                                              greedy)]
    else:
        preds = [generate_text(model, tokenizer, p, greedy) for p in prompts]
    rows = []
    for ex, prompt, pred in zip(examples, prompts, preds, strict=True):
        ref, pred = reference_text(ex), pred.strip()
        rows.append(dict(instruction=ex.instruction or prompt, prompt=prompt, reference=ref,
                         prediction=pred, exact=exact_match(pred, ref),
                         contains=contains(pred, ref)))
    n = len(rows)
    if n == 0:
        raise ValueError("short_answer_accuracy: no examples")
    return {"exact": sum(r["exact"] for r in rows) / n,
            "contains": sum(r["contains"] for r in rows) / n, "n": n, "rows": rows}


# --------------------------------------------------------------------------------------------------
# the side-by-side report


def _cell(s: str) -> str:
    """Markdown table cell: pipes escaped, newlines as <br>."""
    return s.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def side_by_side(base: dict, tuned: dict) -> list[dict]:
    """The rows of write_report from two short_answer_accuracy results on the same examples:
    [{instruction, reference, base, tuned}], the base and the fine-tuned model's answers side by
    side."""
    return [dict(instruction=b["instruction"], reference=b["reference"], base=b["prediction"],
                 tuned=t["prediction"])
            for b, t in zip(base["rows"], tuned["rows"], strict=True)]


def write_report(path: str | Path, rows: list[dict], title: str = "Base vs fine-tuned",
                 metrics: dict | None = None) -> Path:
    """A Markdown file: optional metrics table, then one row per prompt | reference | base |
    fine-tuned, with ✓ marking exact matches. Written to a temp name and renamed (atomic)."""
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
