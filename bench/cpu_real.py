"""`bench/cpu.py --real`: the LoRA training step on a real model (SmolLM2-135M-Instruct), minillm
next to transformers + peft, on the same batch, in the same run. One Markdown table.

    python bench/cpu.py --real --peer-python /path/to/peers/venv/bin/python
    python bench/cpu.py --real --steps 5 --rounds 2 --batch-size 16 --seq 128

Each row runs in a process of its own, because peak RSS (the most resident memory a process ever
had, what the kernel's OOM killer weighs) is per process; the rows take turns, round after round, so
that the load of a shared CPU falls on all of them alike, and the best round of each is reported.
Each implementation runs at float32 and under bfloat16 autocast ("each at its best dtype" is the
faster of its two rows).

    minillm   the training loop's own pieces: build_model (the GGUF dequantized, LoRA on the seven
              projections; the frozen base held in the compute dtype), configure_optimizer (fused
              AdamW), forward_backward (the chunked loss), the gradient clipped to 1
    peer      bench/peer_lora_step.py under --peer-python: transformers' from_pretrained(gguf_file)
              + peft's LoRA, the same rank, alpha, targets, optimizer, clip and batch

The batch is random token ids (the speed and memory of a step do not depend on which tokens), drawn
once and given to every row through a file, so the first step's losses must agree: the table shows
them, a check that both run the same model.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def minillm_step(args):
    """One row: minillm's LoRA step, timed; prints the JSON line the peer prints too."""
    from minillm.training.config import TrainConfig, apply_overrides
    from minillm.training.loop import build_model, configure_optimizer, forward_backward

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = apply_overrides(TrainConfig(), {
        "init_from": str(args.gguf), "finetune.method": "lora", "finetune.lora_r": args.rank,
        "finetune.lora_alpha": float(args.alpha), "finetune.lora_targets": TARGETS}, "bench")
    dtype = DTYPES[args.dtype]
    model = build_model(cfg, torch.device("cpu"), dtype)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = configure_optimizer(model, 0.0, args.lr, (0.9, 0.999), 1e-8, fused=True)
    x, y = torch.load(args.batch)
    autocast = ((lambda: torch.autocast("cpu", dtype=dtype)) if dtype != torch.float32
                else nullcontext)
    times, losses = [], []
    for _ in range(args.steps + 1):
        t = time.perf_counter()
        loss_sum = forward_backward(model, [(x, y)], y.numel(), autocast=autocast)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(loss_sum.item() / y.numel())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"tok_s": x.numel() / min(times[1:]), "peak_rss": peak,
                      "loss0": losses[0], "losses": losses}))


def run_row(impl: str, dtype: str, args, batch: Path) -> dict:
    common = ["--gguf", str(args.gguf), "--batch", str(batch), "--dtype", dtype,
              "--steps", str(args.steps), "--rank", str(args.rank), "--alpha", str(args.alpha),
              "--lr", str(args.lr), "--threads", str(args.threads)]
    cmd = ([sys.executable, str(HERE / "cpu_real.py"), "--worker"] if impl == "minillm"
           else [args.peer_python, str(HERE / "peer_lora_step.py")])
    done = subprocess.run(cmd + common, capture_output=True, text=True)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{impl} {dtype} row failed (exit {done.returncode}):\n"
                         f"{done.stderr[-2000:]}")
    return json.loads(lines[-1])


def table(best: dict, args) -> str:
    rows = ["| implementation | dtype | tokens/s | peak RSS | first loss |",
            "|---|---|---|---|---|"]
    for (impl, dtype), r in best.items():
        rows.append(f"| {impl} | {dtype} | {r['tok_s']:,.0f} | {r['peak_rss'] / 1e9:.2f} GB | "
                    f"{r['loss0']:.5f} |")
    fastest = {impl: max((r for (i, _), r in best.items() if i == impl), key=lambda r: r["tok_s"])
               for impl, _ in best}
    lines = ["\n".join(rows), ""]
    for name, pick in (("float32 vs float32", lambda i: best[(i, "fp32")]),
                       ("each at its best dtype", lambda i: fastest[i])):
        if ("minillm", "fp32") in best and ("peer", "fp32") in best:
            m, p = pick("minillm"), pick("peer")
            lines.append(f"{name}: minillm {m['tok_s'] / p['tok_s']:.2f}x the tokens/s of "
                         f"transformers + peft, at {m['peak_rss'] / p['peak_rss']:.2f}x its "
                         f"peak RSS")
    head = (f"LoRA step on {args.gguf.name}: batch {args.batch_size} x {args.seq} tokens, r "
            f"{args.rank}, alpha {args.alpha}, seven projections, fused AdamW, best of "
            f"{args.rounds} round(s) of {args.steps} step(s), {torch.get_num_threads()} threads")
    return head + "\n\n" + "\n".join(lines)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", type=Path, required=True, help="the real model's GGUF")
    p.add_argument("--peer-python", help="a Python with transformers, peft and gguf (no peer row "
                   "without it)")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed steps per row, after one warm-up")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    if args.worker:
        return minillm_step(args)
    from minillm.formats.load import load_pretrained

    vocab = load_pretrained(args.gguf, dtype=None).config.vocab_size
    impls = ["minillm"] + (["peer"] if args.peer_python else [])
    dtypes = args.dtypes.split(",")
    best: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        batch = Path(tmp) / "batch.pt"
        ids = torch.randint(0, vocab, (args.batch_size, args.seq + 1),
                            generator=torch.Generator().manual_seed(0))
        torch.save((ids[:, :-1].contiguous(), ids[:, 1:].contiguous()), batch)
        for _ in range(args.rounds):
            for dtype in dtypes:
                for impl in impls:
                    r = run_row(impl, dtype, args, batch)
                    if (impl, dtype) not in best or r["tok_s"] > best[(impl, dtype)]["tok_s"]:
                        best[(impl, dtype)] = r
    print(table(best, args))


if __name__ == "__main__":
    main()
