"""AdamW8bit against AdamW on the tiny model: the loss curves, the val loss and the optimizer-state
bytes, from one script.

    python bench/adamw8bit.py                    # 1000 steps of the main job's data and model
    python bench/adamw8bit.py --steps 300        # shorter
    python bench/adamw8bit.py --plot docs/img/adamw8bit-tiny.png

Both runs are the default `python train.py` (the tiny preset on the standard library, its WSD
schedule), with optim.name = "adamw" and "adamw8bit" in place of Muon, the same seed and data
order, one thread (so another busy process does not stall OpenMP). The state bytes are those of
each optimizer built for the trained model: AdamW's exp_avg + exp_avg_sq, AdamW8bit's codes +
absmax (+ its float32 moments for tensors under 4096 values). Prints a Markdown table for
docs/measured.md.
"""

import argparse
import platform
import tempfile
from pathlib import Path

import torch

from minillm.training.config import load_config
from minillm.training.loop import configure_optimizer, train
from minillm.training.plot import line_chart


def state_bytes(model, name: str) -> int:
    """Bytes of the optimizer state (the step counters aside) that `name` holds for this model's
    trained parameters: built as the loop builds it, stepped once on zero gradients."""
    opt = configure_optimizer(model, 0.1, 1e-3, (0.9, 0.95), 1e-8, fused=False, name=name)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    return sum(t.numel() * t.element_size() for state in opt.state.values()
               for k, t in state.items() if isinstance(t, torch.Tensor) and k != "step")


def run(name: str, steps: int, out_dir: Path) -> dict:
    cfg = load_config(overrides={"optim.name": name, "out_dir": str(out_dir / name),
                                 "max_steps": steps, "cpu_threads": 1, "eval.interval": 100,
                                 "eval.sample_tokens": 0, "checkpoint.interval": 0,
                                 "checkpoint.export": False, "log.tensorboard": False,
                                 "log.progress_bar": False})
    result = train(cfg)
    return dict(result=result, state=state_bytes(result.model, name),
                tokens_per_s=result.tokens_per_s)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps per run")
    p.add_argument("--plot", default=None, help="write the two train-loss curves to this PNG")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = {name: run(name, args.steps, Path(tmp)) for name in ("adamw", "adamw8bit")}
    a, b = runs["adamw"]["result"], runs["adamw8bit"]["result"]
    window = lambda r, end: sum(r.losses[s] for s in range(end - 50, end)) / 50
    print(f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread; "
          f"the tiny preset, {args.steps} steps, train loss = mean of the 50 steps before\n")
    print("| step | AdamW train | AdamW8bit train | AdamW val | AdamW8bit val | val Δ |")
    print("|---|---|---|---|---|---|")
    for step in sorted(a.val_losses):
        if step < 50:
            continue
        va, vb = a.val_losses[step], b.val_losses[step]
        print(f"| {step} | {window(a, step):.4f} | {window(b, step):.4f} | {va:.4f} | {vb:.4f} "
              f"| {100 * (vb - va) / va:+.2f}% |")
    sa, sb = runs["adamw"]["state"], runs["adamw8bit"]["state"]
    print(f"\noptimizer state: AdamW {sa / 1e6:.2f} MB, AdamW8bit {sb / 1e6:.2f} MB "
          f"({sb / sa:.1%}); tokens/s {runs['adamw']['tokens_per_s']:.0f} vs "
          f"{runs['adamw8bit']['tokens_per_s']:.0f}")
    if args.plot:
        steps = sorted(a.losses)
        line_chart(args.plot, [("AdamW", steps, [a.losses[s] for s in steps]),
                               ("AdamW8bit", steps, [b.losses[s] for s in steps])],
                   title="tiny model, train loss: AdamW vs AdamW8bit")
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
