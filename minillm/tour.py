"""The whole learner's path in one command, on a CPU, offline:
`python3 run.py tour` (= `python -m minillm.tour`).

    1. pretrain   the tiny Llama (the default train config) on the Python stdlib's source → OUT/base
    2. LoRA       instruction-tune it on the embedded stdlib Q&A dataset (Alpaca format) → OUT/lora
    3. QLoRA      the same, over an NF4-quantized frozen base → OUT/qlora
    4. evaluate   held-out loss, short-answer exact/contains, side-by-side Markdown reports
                  → OUT/report_*.md
                  and the benchmark-style "which module defines X?" multiple choice
                  (minillm.eval.harness)
    5. export     merge the LoRA adapter and write GGUF q8_0 and q4_0 (llama.cpp's format)
                  → OUT/*.gguf
    6. generate   greedy answers from each GGUF, loaded back by minillm
    7. ledger     held-out loss and KL vs the unquantized model along adapter → merged → f16 → q8_0
                  → … → q4_0, and the adapter over bf16 / LLM.int8 / NF4 bases
                  (minillm/eval/ledger.py)

Every stage calls the library, as the scripts do: minillm.training.config.load_config builds each
TrainConfig from a dict of dotted overrides (the same keys as
`python train.py --section.key value`), then minillm.training.loop.train runs it;
minillm.eval.metrics scores; minillm.ship.convert.export writes the GGUF; minillm.generate.decode
decodes. The numbers land in OUT/summary.json and in the table printed at the end. The chapters in
docs/ explain each stage; the command lines each stage corresponds to are printed as it runs.

`--real` walks the same path on a real pretrained model, SmolLM2-135M-Instruct, and measures what
its fine-tune changed (tour_real.py).

About 15 minutes on a 2-core CPU, most of it the 1000-step pretraining (`--base out/tiny` reuses the
model of `python train.py` instead); LoRA and QLoRA take under 2 minutes each. `--quick` shrinks
every stage (a small corpus, tens of steps) to check the path end to end in about a minute: its
numbers mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from minillm.data.instruct import iter_batches, read_examples, tokenize_example
from minillm.data.stdlib_qa import build_stdlib_dataset, short_answer_subset, stdlib_root
from minillm.data.templates import format_prompt
from minillm.eval.harness import score_multiple_choice, stdlib_module_task
from minillm.eval.ledger import fidelity_ledger, format_ledger
from minillm.eval.metrics import short_answer_accuracy, side_by_side, write_report
from minillm.finetune.adapters import DEFAULT_TARGETS
from minillm.formats.load import load_tokenizer
from minillm.generate.sampling import SamplingConfig
from minillm.generate.text import generate_text
from minillm.model import Llama
from minillm.ship.convert import ExportConfig, export
from minillm.training.config import load_config
from minillm.training.loop import train
from minillm.training.loss import held_out_loss
from minillm.util.cli import ArgumentParser, int_at_least, run_cli
from minillm.util.device import pick_device
from minillm.util.fileio import atomic_write_bytes, claim_directory

TEMPLATE = "alpaca"  # the stdlib dataset is Alpaca-format; generation must use the same template


def pretrain_overrides(out: Path, quick: bool, device: str) -> dict:
    """The default `python train.py` run (configs/tiny.toml), only its out_dir moved; --quick:
    a 2 MB corpus, a 1024-piece tokenizer and 40 steps."""
    o = {"out_dir": str(out / "base"), "device": device, "log.progress_bar": sys.stderr.isatty()}
    if quick:
        o.update({"data.corpus": str(stdlib_root() / "email"),
                  "data.cache_dir": str(out / "data_cache"),
                  "data.tokenizer_max_chars": 1_000_000, "model.vocab_size": 1024,
                  "schedule.total_steps": 40, "schedule.warmup_steps": 5, "eval.interval": 0,
                  "eval.iters": 2, "eval.sample_tokens": 16})
    return o


def finetune_overrides(out: Path, base: Path, method: str, train_file: Path, quick: bool,
                       device: str) -> dict:
    """LoRA/QLoRA on the stdlib instruction data: rank 16 on every projection of the frozen base."""
    o = {
        "out_dir": str(out / method), "init_from": str(base), "device": device,
        "finetune.method": method, "optim.name": "adamw", "finetune.lora_r": 16,
        "finetune.lora_alpha": 32.0,
        "finetune.lora_targets": list(DEFAULT_TARGETS),
        "data.format": "instruct", "data.corpus": str(train_file), "data.template": TEMPLATE,
        "data.val_frac": 0.02,
        "batch_size": 16, "block_size": 192,
        "schedule.max_lr": 3e-3, "schedule.min_lr": 3e-4, "schedule.warmup_steps": 20,
        "schedule.total_steps": 300,
        "eval.interval": 100, "eval.iters": 8, "eval.sample_tokens": 24,
        "eval.sample_prompt": "Which module defines `dumps`?",  # templated by train
        "eval.temperature": 0.5,
        "checkpoint.interval": 0, "log.progress_bar": sys.stderr.isatty(),
    }
    if quick:
        o.update({"schedule.total_steps": 12, "schedule.warmup_steps": 2, "eval.interval": 0,
                  "eval.iters": 2, "eval.sample_tokens": 0, "batch_size": 8, "block_size": 128})
    return o


def command_line(script: str, overrides: dict) -> str:
    """The `python train.py ...` line equivalent to a dict of overrides, printed for the reader (the
    progress bar and the device left out)."""
    def fmt(v):
        v = (",".join(v) if isinstance(v, list) else str(v).lower() if isinstance(v, bool)
             else str(v))
        return f"'{v}'" if any(c in v for c in " `#") else v

    skip = ("log.progress_bar", "device")
    return f"python {script} " + " ".join(f"--{k} {fmt(v)}" for k, v in overrides.items()
                                          if k not in skip)


def banner(n: int, title: str):
    print(f"\n{'=' * 100}\n[tour {n}/7] {title}\n{'=' * 100}", flush=True)


@dataclass
class Tour:
    """What the stages share: the flags, where things go, and what each stage found."""

    args: argparse.Namespace
    out: Path
    times: dict[str, float] = field(default_factory=dict)
    results: dict[str, dict] = field(default_factory=dict)  # model name -> its numbers
    artifacts: dict[str, str] = field(default_factory=dict)
    base: Path | None = None
    pretrain_val: float = float("nan")
    data = None  # the stdlib instruction set (data/stdlib_qa.py)
    tokenizer = None
    tokenized: list = field(default_factory=list)  # held-out examples, tokenized
    short: list = field(default_factory=list)  # held-out short-answer questions
    mc_task: list = field(default_factory=list)  # the "which module defines X?" task
    ggufs: dict[str, Path] = field(default_factory=dict)
    ledger: list = field(default_factory=list)

    def timed(self, name: str, stage, *args):
        t0 = time.perf_counter()
        stage(self, *args)
        self.times[name] = time.perf_counter() - t0


def pretrain(t: Tour):
    if t.args.base is not None:
        banner(1, f"pretraining skipped: starting from {t.args.base}")
        t.base = Path(t.args.base)
        return
    banner(1, "pretrain the tiny Llama on the Python standard library "
              "(docs/03-training-from-scratch.md)")
    over = pretrain_overrides(t.out, t.args.quick, t.args.device)
    print(command_line("train.py", over), flush=True)
    pre = train(load_config(None, over))
    t.base, t.pretrain_val = Path(over["out_dir"]), pre.val_losses[max(pre.val_losses)]


def finetune(t: Tour, n: int, method: str):
    banner(n, f"{method.upper()}-tune on the stdlib instructions (docs/04-instruction-data.md, "
              "docs/05-lora-and-qlora.md)")
    over = finetune_overrides(t.out, t.base, method, t.data.train_path, t.args.quick,
                              t.args.device)
    print(command_line("train.py", over), flush=True)
    train(load_config(None, over))
    t.artifacts[method] = str(t.out / method)
    t.artifacts[f"{method}_adapter"] = str(t.out / method / "adapter")


def score(t: Tour, name: str, model, tokenizer, answers: bool):
    """Held-out loss and the module task (and with `answers`, the greedy short answers) of one
    model, into t.results[name]."""
    loss = held_out_loss(model, iter_batches(t.tokenized, 16, tokenizer.pad_id))
    mc = score_multiple_choice(model, tokenizer, t.mc_task)
    r = t.results[name] = dict(loss=loss["loss"], ppl=loss["ppl"], tokens=loss["tokens"],
                               mc_acc=mc["acc"], mc_acc_norm=mc["acc_norm"])
    if answers:
        acc = short_answer_accuracy(model, tokenizer, t.short, TEMPLATE, max_new_tokens=24)
        r |= dict(exact=acc["exact"], contains=acc["contains"], n_short=acc["n"], answers=acc)
        print(f"{name:6s} held-out loss {loss['loss']:.4f} "
              f"(ppl {loss['ppl']:.1f}, {loss['tokens']:,d} tokens) | "
              f"short answers: exact {acc['exact']:.0%}, contains {acc['contains']:.0%} "
              f"of {acc['n']} | "
              f"module multiple choice: acc {mc['acc']:.0%}, acc_norm {mc['acc_norm']:.0%} "
              f"of {mc['n']}", flush=True)


def evaluate(t: Tour):
    banner(4, "evaluate on held-out symbols: loss, short answers, side-by-side report "
              "(docs/06-evaluation.md)")
    device = pick_device(t.args.device)
    for name, path in (("base", t.base), ("lora", t.out / "lora"), ("qlora", t.out / "qlora")):
        score(t, name, Llama.from_pretrained(path, device=device), t.tokenizer, answers=True)
    for tuned in ("lora", "qlora"):
        base, r = t.results["base"], t.results[tuned]
        metrics = {"held-out loss": (base["loss"], r["loss"]),
                   "exact match": (base["exact"], r["exact"]),
                   "contains": (base["contains"], r["contains"])}
        report = write_report(t.out / f"report_{tuned}.md",
                              side_by_side(base["answers"], r["answers"]),
                              f"Base vs {tuned.upper()} on held-out stdlib questions", metrics)
        t.artifacts[f"report_{tuned}"] = str(report)


def export_gguf(t: Tour):
    banner(5, "merge the LoRA adapter and export GGUF q8_0 and q4_0 (docs/08-shipping.md)")
    for outtype in ("q8_0", "q4_0"):
        cfg = ExportConfig(checkpoint=str(t.base), adapter=str(t.out / "lora" / "adapter"),
                           outtype=outtype, out=str(t.out / f"tour-lora-{outtype}.gguf"))
        print(f"python export.py --checkpoint {cfg.checkpoint} --adapter {cfg.adapter} "
              f"--outtype {outtype} --out {cfg.out}", flush=True)
        path = t.ggufs[outtype] = export(cfg)
        t.artifacts[f"gguf_{outtype}"] = str(path)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)", flush=True)


def generate_from_gguf(t: Tour):
    banner(6, "load each GGUF back into minillm and answer a held-out question (docs/02, docs/07)")
    device = pick_device(t.args.device)
    question = t.short[0]
    prompt = format_prompt(TEMPLATE, question.instruction, question.input)
    for outtype, path in t.ggufs.items():
        model = Llama.from_pretrained(path, device=device)
        tok = load_tokenizer(path)  # rebuilt from the GGUF's tokenizer.ggml.* metadata
        score(t, f"gguf_{outtype}", model, tok, answers=False)
        answer = generate_text(model, tok, prompt,
                               SamplingConfig(max_new_tokens=24, temperature=0.0, top_k=None))
        t.results[f"gguf_{outtype}"]["answer"] = answer
        print(f"python generate.py --checkpoint {path} --template {TEMPLATE} --temperature 0 "
              f"--max-new-tokens 24 --prompt {question.instruction!r}\n"
              f"  → {answer!r}   (reference: {question.output!r})", flush=True)
    print(f"in llama.cpp: llama-cli -m {t.ggufs['q8_0']} -p {prompt!r} -n 64", flush=True)


def fidelity(t: Tour):
    banner(7, "the fidelity ledger: what each step from adapter to GGUF costs "
              "(docs/08-shipping.md)")
    adapter = t.out / "lora" / "adapter"
    t.ledger = fidelity_ledger(t.base, adapter, t.tokenized, t.tokenizer.pad_id, t.out)
    print(f"python3 run.py ledger --base {t.base} --adapter {adapter} "
          f"--data {t.data.test_path}\n{format_ledger(t.ledger)}", flush=True)


def print_summary(t: Tour) -> dict:
    summary = dict(
        quick=t.args.quick, pretrain_val_loss=t.pretrain_val, seconds=t.times,
        n_eval_examples=len(t.tokenized), ledger=[dataclasses.asdict(r) for r in t.ledger],
        models={k: {m: v for m, v in r.items() if m != "answers"} for k, r in t.results.items()},
        artifacts=dict(base=str(t.base), **t.artifacts),
    )
    atomic_write_bytes(t.out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    print(f"\n{'=' * 100}\nartifacts")
    for k, v in summary["artifacts"].items():
        print(f"  {k:14s} {v}")
    print(f"  {'summary':14s} {t.out / 'summary.json'}\n")
    rows = [("base (pretrained on code)", "base"), ("LoRA r=16", "lora"),
            ("QLoRA r=16 (NF4 base)", "qlora"),
            ("LoRA merged → GGUF q8_0", "gguf_q8_0"), ("LoRA merged → GGUF q4_0", "gguf_q4_0")]
    print(f"held-out loss on {len(t.tokenized):,d} examples about unseen stdlib symbols "
          f"(response tokens only); short answers: {len(t.short)} greedy answers per model; "
          f"module MC: {len(t.mc_task)} held-out \"which module defines X?\" questions, "
          "4 choices (chance 25%)\n")
    print("| model | held-out loss | perplexity | exact | contains | module MC acc | acc_norm |\n"
          "|---|---|---|---|---|---|---|")
    for label, key in rows:
        r = t.results[key]
        exact = f"{r['exact']:.0%}" if "exact" in r else "–"
        has = f"{r['contains']:.0%}" if "contains" in r else "–"
        print(f"| {label} | {r['loss']:.4f} | {math.exp(r['loss']):.1f} | {exact} | {has} | "
              f"{r['mc_acc']:.0%} | {r['mc_acc_norm']:.0%} |")
    print("\nseconds: " + ", ".join(f"{k} {v:.0f}" for k, v in t.times.items()))
    return summary


def parse_args(argv) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/tour",
                   help="folder for every artifact of the tour (default: out/tour): new, empty, "
                        "or an earlier tour's; a folder of anything else is refused")
    p.add_argument("--quick", action="store_true",
                   help="shrink every stage (small corpus, tens of steps): "
                        "checks the path in a minute or two")
    p.add_argument("--base", default=None,
                   help="skip pretraining and start from this checkpoint directory (e.g. out/tiny)")
    p.add_argument("--device", default="cpu",
                   help="cpu (default), cuda, auto: where every stage runs")
    p.add_argument("--eval-examples", type=int_at_least(1), default=None,
                   help="held-out examples scored for loss (default: all of them; 64 with --quick)")
    p.add_argument("--real", action="store_true",
                   help="the real-model tour instead: SmolLM2-135M-Instruct from download to "
                        "llama.cpp, measured before and after (tour_real.py; its own --help)")
    p.add_argument("--short-answers", type=int_at_least(1), default=None,
                   help="short-answer questions decoded greedily per model "
                        "(default 40; 4 with --quick)")
    return p.parse_args(argv)


def held_out(t: Tour):
    """The held-out sets every evaluation stage scores, built once."""
    args = t.args
    t.tokenizer = load_tokenizer(t.base)
    test = read_examples(t.data.test_path)
    n_eval = args.eval_examples if args.eval_examples is not None else (64 if args.quick else None)
    n_short = args.short_answers if args.short_answers is not None else (4 if args.quick else 40)
    t.tokenized = [tokenize_example(ex, t.tokenizer, TEMPLATE, 256) for ex in test[:n_eval]]
    t.short = short_answer_subset(test)[:n_short] or test[:1]
    t.mc_task = stdlib_module_task(t.out / "stdlib_instruct")[:16 if args.quick else None]


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--real" in argv:  # the same path on a real pretrained model: tour_real.py
        from minillm import tour_real

        return tour_real.main(argv)
    args = parse_args(argv)
    t = Tour(args, claim_directory(args.out, "tour", legacy=("summary.json",)))
    t_start = time.perf_counter()
    t.timed("pretrain", pretrain)
    t.data = build_stdlib_dataset(t.out / "stdlib_instruct")
    print(f"\ninstruction data: {t.data.train_path} ({t.data.meta['n_train']:,d} train) | "
          f"{t.data.test_path} ({t.data.meta['n_test']:,d} held-out, "
          "on symbols never seen in training)", flush=True)
    t.timed("lora", finetune, 2, "lora")
    t.timed("qlora", finetune, 3, "qlora")
    held_out(t)
    t.timed("evaluate", evaluate)
    t.timed("export", export_gguf)
    t.timed("generate", generate_from_gguf)
    t.timed("ledger", fidelity)
    t.times["total"] = time.perf_counter() - t_start
    return print_summary(t)


if __name__ == "__main__":
    sys.exit(run_cli(main))
