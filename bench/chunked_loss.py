"""Peak memory and time of the loss head: the plain loss (the full (B, T, V) logits, then
F.cross_entropy) against training/loss.py's chunked_cross_entropy, forward and backward.

Each case runs in a fresh process (peak RSS, or CUDA's peak allocation, is a high-water mark that
cannot be reset on the CPU), on SmolLM2-135M's head: C = 576, V = 49,152, the lm_head tied to a
float32 embedding that is trained (full fine-tuning) or frozen (LoRA), at batch 16 × 256 by default.

    python bench/chunked_loss.py [--batch 16] [--seq 256] [--device cpu] [--prompt-frac 0.5]

--prompt-frac marks that share of each row's targets -100 (an instruction's prompt): the chunked
loss skips those rows before lm_head, the plain one computes and discards their logits.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from minillm.training.loss import IGNORE, chunked_cross_entropy


def one(kind: str, train_head: bool, args) -> dict:
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    C, V, B, T = 576, 49152, args.batch, args.seq
    head = nn.Linear(C, V, bias=False).to(device)
    head.weight.requires_grad_(train_head)
    h = torch.randn(B, T, C, generator=g).to(device).requires_grad_()
    targets = torch.randint(V, (B, T), generator=g).to(device)
    targets[:, :int(T * args.prompt_frac)] = IGNORE
    base = peak(device)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        if kind == "plain":
            logits = head(h).float()  # (B, T, V)
            loss = F.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=IGNORE,
                                   reduction="sum")
            del logits
        else:
            loss = chunked_cross_entropy(head, h, targets)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        h.grad = head.weight.grad = None
    return {"peak_mb": (peak(device) - base) / 2**20, "s": min(times), "loss": loss.item()}


def peak(device: torch.device) -> int:
    """Bytes: CUDA's peak allocation, or this process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompt-frac", type=float, default=0.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--one", nargs=2, metavar=("KIND", "TRAIN_HEAD"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], args.one[1] == "1", args)))
        return
    rows = []
    for train_head in (False, True):
        for kind in ("plain", "chunked"):
            out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one", kind,
                                  str(int(train_head))], capture_output=True, text=True, check=True)
            rows.append((kind, train_head, json.loads(out.stdout)))
    what = "peak RSS above the inputs" if args.device == "cpu" else "peak CUDA allocation"
    print(f"loss head, C=576, V=49152, batch {args.batch} x {args.seq}, "
          f"{args.prompt_frac:.0%} of targets -100, {args.device}, "
          f"{torch.get_num_threads()} threads")
    print(f"\n| loss | lm_head | {what} (MB) | fwd+bwd (s) | loss |")
    print("|---|---|---:|---:|---:|")
    for kind, train_head, r in rows:
        print(f"| {kind} | {'trained' if train_head else 'frozen'} | {r['peak_mb']:.0f} | "
              f"{r['s']:.3f} | {r['loss']:.2f} |")


if __name__ == "__main__":
    main()
