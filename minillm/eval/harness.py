"""Benchmark-style evaluation, scored the way lm-evaluation-harness scores HellaSwag and ARC:
`python3 run.py eval --checkpoint X --task T` (= `python -m minillm.eval.harness`).

Three kinds of task, one table:

    FILE.jsonl      multiple choice: {"context": str, "choices": [str, ...], "answer": int} per line
    stdlib-modules  the embedded multiple-choice task:
                    "Which module defines `X`?" on held-out symbols
    any other FILE  perplexity over the file's text

Multiple choice by log-likelihood (no generation). Each choice c is scored as the log-probability of
its tokens given the context:

    ll(c)    = Σ_t log p(cont_t | context, cont_<t),   cont = target_delimiter + c
                                                        (delimiter " " by default)
    acc      = [argmax_c ll(c) == answer]
    acc_norm = [argmax_c ll(c) / len(c) == answer]      len in characters of c
                                                        (without the delimiter)

As the harness does (`_encode_pair`): spaces at the end of the context move to the start of the
continuation, then the continuation's tokens are those of tokenize(context + continuation) after the
first len(tokenize(context)) — so a SentencePiece "▁word" piece is scored as one token, not split at
the seam. acc_norm divides by characters (`completion_len = len(choice)` in the harness): a
per-token normalisation would depend on the tokenizer. A sequence longer than max_seq_len loses
tokens from the left of its context.

Perplexity over a text: the ids ([BOS] + text) are cut into windows of max_seq_len + 1 tokens that
overlap by one, so every token after the BOS is predicted exactly once, from the tokens before it in
its window (the harness's rolling log-likelihood does the same):

    nll = Σ_i −log p(x_i | window context) / N,   ppl = exp(nll),
    bits_per_byte = Σ_i −log p / (ln 2 · bytes)

bits per byte does not depend on the tokenizer, so it compares models with different vocabularies.
"""

from __future__ import annotations

import math
import random
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from minillm.training.loss import held_out_loss
from minillm.util.fileio import read_jsonl, read_text

STDLIB_TASK = "stdlib-modules"


@dataclass
class MCExample:
    context: str
    choices: list[str]
    answer: int  # index of the right choice
    target_delimiter: str = " "  # put between the context and each choice (the harness's default)


def read_mc_task(path: str | Path) -> list[MCExample]:
    """A JSONL multiple-choice file → examples; every bad line raises one error naming file:line."""
    path = Path(path)
    examples = []
    for where, r in read_jsonl(path, "multiple-choice task file"):
        if not isinstance(r, dict):
            raise ValueError(f"{where}: expected a JSON object, found {type(r).__name__}")
        ctx, choices, answer = r.get("context"), r.get("choices"), r.get("answer")
        if not isinstance(ctx, str):
            raise ValueError(f"{where}: 'context' must be a string, found {ctx!r}")
        if not (isinstance(choices, list) and len(choices) >= 2
                and all(isinstance(c, str) and c for c in choices)):
            raise ValueError(f"{where}: 'choices' must be a list of at least 2 non-empty strings, "
                             f"found {choices!r}")
        if not (isinstance(answer, int) and 0 <= answer < len(choices)):
            raise ValueError(f"{where}: 'answer' must be an index into the {len(choices)} choices, "
                             f"found {answer!r}")
        delim = r.get("target_delimiter", " ")
        if not isinstance(delim, str):
            raise ValueError(f"{where}: 'target_delimiter' must be a string, found {delim!r}")
        examples.append(MCExample(ctx, choices, answer, delim))
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples


# --------------------------------------------------------------------------------------------------
# log-likelihood scoring


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, with the BOS a tokenizer adds, continuation ids), split as the harness's
    _encode_pair does."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation)  # a BOS if the tokenizer adds one
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx):]


@torch.no_grad()
def continuation_logprobs(model, pairs: list[tuple[list[int], list[int]]],
                          batch_size: int = 16) -> list[float]:
    """Σ log p(continuation | context) for each (context ids, continuation ids) pair.

    One forward per batch over context + continuation[:-1], right-padded (causal attention: padding
    after a sequence cannot change it), log-softmax in float32, the continuation's targets gathered.
    """
    device = model.embed_tokens.weight.device
    L = model.config.max_seq_len
    out = []
    for i in range(0, len(pairs), batch_size):
        seqs, spans = [], []
        for ctx, cont in pairs[i:i + batch_size]:
            if not cont:
                raise ValueError("a continuation encodes to no tokens: "
                                 "every choice needs at least one")
            if len(cont) > L:
                raise ValueError(f"a continuation of {len(cont)} tokens exceeds max_seq_len={L}")
            s = (ctx + cont)[-(L + 1):]  # left truncation keeps the whole continuation
            seqs.append(s)
            spans.append(len(cont))
        T = max(len(s) for s in seqs) - 1
        x = torch.zeros(len(seqs), T, dtype=torch.long)  # (B, T) inputs, right-padded with 0
        # (B, T) targets, -100 where not scored
        y = torch.full((len(seqs), T), -100, dtype=torch.long)
        for b, (s, n) in enumerate(zip(seqs, spans, strict=True)):
            x[b, :len(s) - 1] = torch.tensor(s[:-1])
            y[b, len(s) - 1 - n:len(s) - 1] = torch.tensor(s[-n:])
        logits, _ = model(x.to(device))  # (B, T, V)
        logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
        y = y.to(device)
        picked = logp.gather(-1, y.clamp(min=0)[..., None])[..., 0]  # (B, T)
        out += (picked * (y != -100)).sum(-1).tolist()
    return out


def score_multiple_choice(model, tokenizer, examples: list[MCExample],
                          batch_size: int = 16) -> dict:
    """{"acc", "acc_norm", "n", "lls": one list of choice log-likelihoods per example}."""
    was_training = model.training
    model.eval()
    try:
        pairs = [encode_pair(tokenizer, ex.context, ex.target_delimiter + c)
                 for ex in examples for c in ex.choices]
        flat = continuation_logprobs(model, pairs, batch_size)
    finally:
        model.train(was_training)
    lls, acc, acc_norm, i = [], 0, 0, 0
    for ex in examples:
        ll = flat[i:i + len(ex.choices)]
        i += len(ex.choices)
        lls.append(ll)
        acc += max(range(len(ll)), key=lambda j: ll[j]) == ex.answer
        acc_norm += max(range(len(ll)), key=lambda j: ll[j] / len(ex.choices[j])) == ex.answer
    n = len(examples)
    return {"acc": acc / n, "acc_norm": acc_norm / n, "n": n, "lls": lls}


def perplexity(model, tokenizer, text: str, batch_size: int = 8) -> dict:
    """{"nll", "ppl", "bits_per_byte", "tokens"} of the text (see the module docstring): the
    windows' targets are scored by training/loss.py's held_out_loss, as every held-out loss in
    minillm is."""
    ids = tokenizer.encode(text)
    if len(ids) < 2:
        raise ValueError("perplexity: the text encodes to no tokens")
    L = model.config.max_seq_len
    windows = [ids[s:s + L + 1] for s in range(0, len(ids) - 1, L)]  # overlap by one token

    def batches():
        for i in range(0, len(windows), batch_size):
            rows = windows[i:i + batch_size]
            T = max(len(w) for w in rows) - 1
            x = torch.zeros(len(rows), T, dtype=torch.long)  # (B, T), right-padded with 0
            y = torch.full((len(rows), T), -100, dtype=torch.long)  # (B, T), -100 where not scored
            for b, w in enumerate(rows):
                x[b, :len(w) - 1], y[b, :len(w) - 1] = torch.tensor(w[:-1]), torch.tensor(w[1:])
            yield x, y

    nll = held_out_loss(model, batches())["loss"]
    n = len(ids) - 1
    return {"nll": nll, "ppl": math.exp(nll), "tokens": n,
            "bits_per_byte": nll * n / (math.log(2) * len(text.encode("utf-8")))}


# --------------------------------------------------------------------------------------------------
# the embedded task: which module defines X?


def module_choice_examples(test_records: list[dict], pool: list[str], n_choices: int = 4,
                           template="alpaca") -> list[MCExample]:
    """Multiple-choice questions from stdlib_dataset "module" records: the right module plus
    n_choices − 1 distractors drawn from `pool` (other modules), shuffled. The draws are seeded by
    crc32 of the symbol's qualified name, so the task is the same on every run. The context is the
    instruction in the fine-tuning template, and the choice follows the template's response marker
    directly (delimiter ""). `template`: a name from templates.py, or a model's own Jinja chat
    template (chat_template.JinjaTemplate): the context is then its rendered prompt."""
    from minillm.data.instruct import Example, prompt_text

    pool = sorted(set(pool))
    out = []
    for r in test_records:
        if r.get("kind") != "module":
            continue
        rng = random.Random(zlib.crc32(r["name"].encode()))
        choices = rng.sample([m for m in pool if m != r["output"]], n_choices - 1) + [r["output"]]
        rng.shuffle(choices)
        question = Example("alpaca", r["name"], instruction=r["instruction"])
        out.append(MCExample(prompt_text(question, template), choices,
                             choices.index(r["output"]), ""))
    return out


def stdlib_module_task(cache_dir: str | Path, n_choices: int = 4,
                       template="alpaca") -> list[MCExample]:
    """The held-out "Which module defines `X`?" questions of the embedded dataset (the symbols the
    tour's fine-tuning never sees), with distractors from every module the dataset names."""
    from minillm.data.stdlib_qa import build_stdlib_dataset

    data = build_stdlib_dataset(cache_dir)
    read = [[r for _, r in read_jsonl(p)] for p in (data.train_path, data.test_path)]
    pool = [r["output"] for records in read for r in records if r.get("kind") == "module"]
    return module_choice_examples(read[1], pool, n_choices, template)


# --------------------------------------------------------------------------------------------------
# the command line


def run_task(model, tokenizer, task: str, cache_dir: str, limit: int | None,
             batch_size: int) -> dict:
    """One task spec (see the module docstring) → its metrics."""
    if task == STDLIB_TASK:
        return score_multiple_choice(model, tokenizer, stdlib_module_task(cache_dir)[:limit],
                                     batch_size)
    path = Path(task)  # the readers name a missing file, a directory, a device
    if path.suffix == ".jsonl":
        return score_multiple_choice(model, tokenizer, read_mc_task(path)[:limit], batch_size)
    return perplexity(model, tokenizer, read_text(path, "text file"), batch_size)


def format_table(rows: list[tuple[str, str, dict]]) -> str:
    """(checkpoint, task, metrics) rows → one Markdown table; "–" where a metric does not apply."""
    lines = ["| checkpoint | task | n | acc | acc_norm | ppl | bits/byte |",
             "|---|---|---|---|---|---|---|"]
    for ckpt, task, m in rows:
        if "acc" in m:
            cells = [str(m["n"]), f"{m['acc']:.4f}", f"{m['acc_norm']:.4f}", "–", "–"]
        else:
            cells = [f"{m['tokens']} tok", "–", "–", f"{m['ppl']:.3f}", f"{m['bits_per_byte']:.4f}"]
        lines.append(f"| {ckpt} | {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> list[tuple[str, str, dict]]:
    import argparse

    from minillm.formats.load import load_pretrained, load_tokenizer
    from minillm.util.cli import ArgumentParser, int_at_least
    from minillm.util.device import pick_device

    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append", required=True,
                   help="checkpoint directory (HF, minillm, Meta) or .gguf; "
                        "repeat to compare several")
    p.add_argument("--task", action="append", required=True,
                   help=f"{STDLIB_TASK}, a multiple-choice .jsonl file, or a text file for "
                        "perplexity; repeatable")
    p.add_argument("--limit", type=int_at_least(1), default=None,
                   help="score only the first N multiple-choice examples")
    p.add_argument("--batch-size", type=int_at_least(1), default=16,
                   help="sequences per forward pass")
    p.add_argument("--cache-dir", default="data_cache/stdlib_instruct",
                   help=f"where the embedded dataset behind {STDLIB_TASK} is built (once)")
    p.add_argument("--device", default=None,
                   help="cuda, cpu, … (default: cuda if available, else cpu)")
    args = p.parse_args(argv)
    for task in args.task:  # fail before loading any model
        if task != STDLIB_TASK and not Path(task).is_file():
            found = "is a directory" if Path(task).is_dir() else "no such file"
            p.error(f"--task {task}: {found} (a .jsonl multiple-choice file, a text file, or "
                    f"the embedded task {STDLIB_TASK!r})")
    device = pick_device(args.device or "auto")
    rows = []
    for ckpt in args.checkpoint:
        model = load_pretrained(ckpt, dtype=torch.float32, device=device)
        tokenizer = load_tokenizer(ckpt)
        for task in args.task:
            rows.append((ckpt, task, run_task(model, tokenizer, task, args.cache_dir, args.limit,
                                              args.batch_size)))
            print(f"scored {ckpt} on {task}", file=sys.stderr, flush=True)
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    from minillm.util.cli import run_cli

    sys.exit(run_cli(main))
