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
from minillm.util.cli import ArgumentParser, run_cli
from minillm.util.device import pick_device

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


def main(argv=None) -> dict:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/tour",
                   help="folder for every artifact of the tour (default: out/tour)")
    p.add_argument("--quick", action="store_true",
                   help="shrink every stage (small corpus, tens of steps): "
                        "checks the path in a minute or two")
    p.add_argument("--base", default=None,
                   help="skip pretraining and start from this checkpoint directory (e.g. out/tiny)")
    p.add_argument("--device", default="cpu",
                   help="cpu (default), cuda, auto: where every stage runs")
    p.add_argument("--eval-examples", type=int, default=None,
                   help="held-out examples scored for loss (default: all of them; 64 with --quick)")
    p.add_argument("--short-answers", type=int, default=None,
                   help="short-answer questions decoded greedily per model "
                        "(default 40; 4 with --quick)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n_eval = args.eval_examples if args.eval_examples is not None else (64 if args.quick else None)
    n_short = args.short_answers if args.short_answers is not None else (4 if args.quick else 40)
    times: dict[str, float] = {}
    t_start = time.perf_counter()

    # ---- 1. pretrain -----------------------------------------------------------------------------
    t0 = time.perf_counter()
    if args.base is None:
        banner(1, "pretrain the tiny Llama on the Python standard library "
                  "(docs/03-training-from-scratch.md)")
        over = pretrain_overrides(out, args.quick, args.device)
        print(command_line("train.py", over), flush=True)
        pre = train(load_config(None, over))
        base = Path(over["out_dir"])
        pretrain_val = pre.val_losses[max(pre.val_losses)]
    else:
        banner(1, f"pretraining skipped: starting from {args.base}")
        base, pretrain_val = Path(args.base), float("nan")
    times["pretrain"] = time.perf_counter() - t0

    # ---- 2. + 3. LoRA and QLoRA on the stdlib instruction data -----------------------------------
    data = build_stdlib_dataset(out / "stdlib_instruct")
    print(f"\ninstruction data: {data.train_path} ({data.meta['n_train']:,d} train) | "
          f"{data.test_path} ({data.meta['n_test']:,d} held-out, "
          "on symbols never seen in training)", flush=True)
    for n, method in ((2, "lora"), (3, "qlora")):
        banner(n, f"{method.upper()}-tune on the stdlib instructions (docs/04-instruction-data.md, "
                  "docs/05-lora-and-qlora.md)")
        t0 = time.perf_counter()
        over = finetune_overrides(out, base, method, data.train_path, args.quick, args.device)
        print(command_line("train.py", over), flush=True)
        train(load_config(None, over))
        times[method] = time.perf_counter() - t0

    # ---- 4. evaluate -----------------------------------------------------------------------------
    banner(4, "evaluate on held-out symbols: loss, short answers, side-by-side report "
              "(docs/06-evaluation.md)")
    t0 = time.perf_counter()
    device = pick_device(args.device)
    tokenizer = load_tokenizer(base)
    test = read_examples(data.test_path)
    scored = test if n_eval is None else test[:n_eval]
    tokenized = [tokenize_example(ex, tokenizer, TEMPLATE, 256) for ex in scored]
    short = short_answer_subset(test)[:n_short]
    # `run.py eval`'s task
    mc_task = stdlib_module_task(out / "stdlib_instruct")[:16 if args.quick else None]
    models = {"base": base, "lora": out / "lora", "qlora": out / "qlora"}
    results: dict[str, dict] = {}
    for name, path in models.items():
        model = Llama.from_pretrained(path, device=device)
        loss = held_out_loss(model, iter_batches(tokenized, 16, tokenizer.pad_id))
        acc = short_answer_accuracy(model, tokenizer, short, TEMPLATE, max_new_tokens=24)
        mc = score_multiple_choice(model, tokenizer, mc_task)
        results[name] = dict(loss=loss["loss"], ppl=loss["ppl"], tokens=loss["tokens"],
                             exact=acc["exact"], contains=acc["contains"], n_short=acc["n"],
                             answers=acc, mc_acc=mc["acc"], mc_acc_norm=mc["acc_norm"])
        print(f"{name:6s} held-out loss {loss['loss']:.4f} "
              f"(ppl {loss['ppl']:.1f}, {loss['tokens']:,d} tokens) | "
              f"short answers: exact {acc['exact']:.0%}, contains {acc['contains']:.0%} "
              f"of {acc['n']} | "
              f"module multiple choice: acc {mc['acc']:.0%}, acc_norm {mc['acc_norm']:.0%} "
              f"of {mc['n']}", flush=True)
    reports = {}
    for tuned in ("lora", "qlora"):
        rows = side_by_side(results["base"]["answers"], results[tuned]["answers"])
        metrics = {"held-out loss": (results["base"]["loss"], results[tuned]["loss"]),
                   "exact match": (results["base"]["exact"], results[tuned]["exact"]),
                   "contains": (results["base"]["contains"], results[tuned]["contains"])}
        reports[tuned] = write_report(out / f"report_{tuned}.md", rows,
                                      f"Base vs {tuned.upper()} on held-out stdlib questions",
                                      metrics)
    times["evaluate"] = time.perf_counter() - t0

    # ---- 5. export -------------------------------------------------------------------------------
    banner(5, "merge the LoRA adapter and export GGUF q8_0 and q4_0 (docs/07-shipping.md)")
    t0 = time.perf_counter()
    ggufs = {}
    for outtype in ("q8_0", "q4_0"):
        cfg = ExportConfig(checkpoint=str(base), adapter=str(out / "lora" / "adapter"),
                           outtype=outtype, out=str(out / f"tour-lora-{outtype}.gguf"))
        print(f"python export.py --checkpoint {cfg.checkpoint} --adapter {cfg.adapter} "
              f"--outtype {outtype} --out {cfg.out}", flush=True)
        ggufs[outtype] = export(cfg)
        print(f"wrote {ggufs[outtype]} ({ggufs[outtype].stat().st_size / 1e6:.2f} MB)", flush=True)
    times["export"] = time.perf_counter() - t0

    # ---- 6. generate from the GGUF files ---------------------------------------------------------
    banner(6, "load each GGUF back into minillm and answer a held-out question (docs/02, docs/07)")
    t0 = time.perf_counter()
    question = short[0] if short else test[0]
    prompt = format_prompt(TEMPLATE, question.instruction, question.input)
    for outtype, path in ggufs.items():
        model = Llama.from_pretrained(path, device=device)
        tok = load_tokenizer(path)  # rebuilt from the GGUF's tokenizer.ggml.* metadata
        mc = score_multiple_choice(model, tok, mc_task)
        results[f"gguf_{outtype}"] = dict(
            loss=held_out_loss(model, iter_batches(tokenized, 16, tok.pad_id))["loss"],
            mc_acc=mc["acc"], mc_acc_norm=mc["acc_norm"])
        answer = generate_text(model, tok, prompt,
                               SamplingConfig(max_new_tokens=24, temperature=0.0, top_k=None))
        results[f"gguf_{outtype}"]["answer"] = answer
        print(f"python generate.py --checkpoint {path} --template {TEMPLATE} --temperature 0 "
              f"--max-new-tokens 24 --prompt {question.instruction!r}\n"
              f"  → {answer!r}   (reference: {question.output!r})", flush=True)
    print(f"in llama.cpp: llama-cli -m {ggufs['q8_0']} -p {prompt!r} -n 64", flush=True)
    times["generate"] = time.perf_counter() - t0

    # ---- 7. the fidelity ledger ------------------------------------------------------------------
    banner(7, "the fidelity ledger: what each step from adapter to GGUF costs "
              "(docs/07-shipping.md)")
    t0 = time.perf_counter()
    ledger = fidelity_ledger(base, out / "lora" / "adapter", tokenized, tokenizer.pad_id, out)
    print(f"python3 run.py ledger --base {base} --adapter {out / 'lora' / 'adapter'} "
          f"--data {data.test_path}\n{format_ledger(ledger)}", flush=True)
    times["ledger"] = time.perf_counter() - t0
    times["total"] = time.perf_counter() - t_start

    # ---- summary ---------------------------------------------------------------------------------
    summary = dict(
        quick=args.quick, pretrain_val_loss=pretrain_val, seconds=times,
        n_eval_examples=len(tokenized),
        ledger=[dataclasses.asdict(r) for r in ledger],
        models={k: {m: v for m, v in r.items() if m != "answers"} for k, r in results.items()},
        artifacts=dict(base=str(base), lora=str(out / "lora"),
                       lora_adapter=str(out / "lora" / "adapter"), qlora=str(out / "qlora"),
                       qlora_adapter=str(out / "qlora" / "adapter"),
                       report_lora=str(reports["lora"]), report_qlora=str(reports["qlora"]),
                       gguf_q8_0=str(ggufs["q8_0"]), gguf_q4_0=str(ggufs["q4_0"])),
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n{'=' * 100}\nartifacts")
    for k, v in summary["artifacts"].items():
        print(f"  {k:14s} {v}")
    print(f"  {'summary':14s} {out / 'summary.json'}\n")
    rows = [("base (pretrained on code)", "base"), ("LoRA r=16", "lora"),
            ("QLoRA r=16 (NF4 base)", "qlora"),
            ("LoRA merged → GGUF q8_0", "gguf_q8_0"), ("LoRA merged → GGUF q4_0", "gguf_q4_0")]
    print(f"held-out loss on {len(tokenized):,d} examples about unseen stdlib symbols "
          f"(response tokens only); short answers: {n_short} greedy answers per model; module MC: "
          f"{len(mc_task)} held-out \"which module defines X?\" questions, "
          "4 choices (chance 25%)\n")
    print("| model | held-out loss | perplexity | exact | contains | module MC acc | acc_norm |\n"
          "|---|---|---|---|---|---|---|")
    for label, key in rows:
        r = results[key]
        exact = f"{r['exact']:.0%}" if "exact" in r else "–"
        has = f"{r['contains']:.0%}" if "contains" in r else "–"
        print(f"| {label} | {r['loss']:.4f} | {math.exp(r['loss']):.1f} | {exact} | {has} | "
              f"{r['mc_acc']:.0%} | {r['mc_acc_norm']:.0%} |")
    print("\nseconds: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    return summary


if __name__ == "__main__":
    sys.exit(run_cli(main))
