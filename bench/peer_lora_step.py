"""The peer row of `bench/cpu.py --real`: one LoRA training step of transformers + peft on a real
GGUF model, timed, with its peak RSS. It runs alone in its own process (peak RSS is per process),
under the Python that has the peers (`--peer-python`), and imports nothing of minillm.

    python bench/peer_lora_step.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --batch batch.pt \\
        --dtype bf16 --steps 3

The model is `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` (transformers dequantizes
the GGUF to float32), with peft's LoRA (r, alpha, dropout 0, the seven projections), AdamW (fused,
as the Trainer uses on a CPU) and the gradient clipped to 1. `--dtype bf16` is what the Trainer's
`bf16=True` does on a CPU: float32 weights, the forward under torch.autocast(bfloat16). The batch
file holds (x, y) of token ids; the loss is transformers' own (labels = y, already shifted).
Prints one JSON line: tokens/s of the fastest step, peak RSS, the first step's loss.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from contextlib import nullcontext
from pathlib import Path

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", type=Path, required=True)
    p.add_argument("--batch", type=Path, required=True, help="torch.save'd (x, y)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--steps", type=int, default=3, help="timed steps, after one warm-up")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.gguf.parent, gguf_file=args.gguf.name,
                                                 dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.alpha,
                                             lora_dropout=0.0, target_modules=TARGETS))
    model.train()
    trainable = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0, fused=True)
    x, y = torch.load(args.batch)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.dtype == "bf16" \
        else nullcontext
    times, losses = [], []
    for _ in range(args.steps + 1):
        t = time.perf_counter()
        with autocast():
            loss = model(input_ids=x, labels=y, shift_labels=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"tok_s": x.numel() / min(times[1:]), "peak_rss": peak,
                      "loss0": losses[0], "losses": losses}))


if __name__ == "__main__":
    main()
