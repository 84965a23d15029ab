"""Benchmark: one fine-tuning step — full, LoRA or QLoRA — step time, tokens/s and peak memory.

    python bench/finetune.py --preset openllama-7b --methods lora,qlora --seq 512,1024  # GPU
    python bench/finetune.py --preset openllama-7b --peer  # + transformers/peft/bitsandbytes rows
    python bench/finetune.py --preset tiny --methods full,lora,qlora --seq 128 \
        --device cpu  # smoke run

Settings match the peer rows in the README (transformers + peft [+ bitsandbytes]): LoRA r=16 on all
seven projections, activation checkpointing, batch 1, AdamW, bf16 on GPU. Weights are random (speed
does not depend on their values); QLoRA quantizes the projections to NF4 with double quantization,
as quantize-on-load does with `finetune.double_quant = true`. Peak memory is
torch.cuda.max_memory_allocated on GPU (not reported on CPU). `--peer` adds, under each minillm row,
the same step in transformers + peft (+ bitsandbytes NF4 with double quantization for QLoRA; see
bench/peers.py), measured in the same process on the same device.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/peers.py

from minillm.config import ModelConfig  # noqa: E402
from minillm.finetune.adapters import apply_lora, mark_only_lora_trainable  # noqa: E402
from minillm.finetune.nf4_linear import quantize_model_  # noqa: E402
from minillm.model import Llama  # noqa: E402
from minillm.training.loop import configure_optimizer  # noqa: E402
from minillm.util.device import pick_device  # noqa: E402


def build(cfg: ModelConfig, method: str, device, dtype, r: int):
    torch.manual_seed(0)
    with torch.device(device):
        model = Llama(cfg).to(dtype)
    if method == "qlora":
        # as the peer
        quantize_model_(model, skip=("lm_head",), compute_dtype=dtype, double_quant=True)
    if method in ("lora", "qlora"):
        apply_lora(model, r=r, alpha=2 * r, dropout=0.05)
        mark_only_lora_trainable(model)
        model.embed_tokens.weight.requires_grad_(False)
        model.lm_head.weight.requires_grad_(False)
    model.activation_checkpointing = True
    return model.train()


def step_time(model, device, seq: int, steps: int):
    opt = configure_optimizer(model, 0.0, 1e-4, (0.9, 0.999), 1e-8, fused=device.type == "cuda")
    x = torch.randint(0, model.config.vocab_size, (1, seq + 1), device=device)
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[len(times[1:]) // 2]  # median after the first (warm-up) step


def measure(device, step_time_fn, *args) -> tuple[float, str]:
    """(seconds per step, peak memory text) of step_time_fn(*args) on a freshly reset peak-memory
    counter."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t = step_time_fn(*args)
    peak = f"{torch.cuda.max_memory_allocated() / 1e9:.1f} GB" if device.type == "cuda" else "n/a"
    return t, peak


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="openllama-7b", help="model shape (see minillm/config.py)")
    p.add_argument("--methods", default="lora,qlora", help="comma list of full, lora, qlora")
    p.add_argument("--seq", default="512,1024", help="comma list of sequence lengths")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--steps", type=int, default=6,
                   help="steps per row (median of all but the first)")
    p.add_argument("--device", default="auto", help="auto (cuda if there is a GPU), cuda or cpu")
    p.add_argument("--peer", action="store_true",
                   help="also time transformers + peft (+ bitsandbytes)")
    args = p.parse_args()
    device = pick_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = ModelConfig.from_name(args.preset)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{args.preset}, {dtype}, batch 1, activation checkpointing, AdamW, "
          f"LoRA r={args.rank} on 7 projections — {name}")
    if args.peer:
        import peers

        needed = ["transformers", "peft"] + (["bitsandbytes"] if "qlora" in args.methods else [])
        print("peers:", peers.versions(*needed))
    print("| method | implementation | seq | s/step | tokens/s | peak memory |")
    print("|---|---|---|---|---|---|")
    seqs = [int(s) for s in args.seq.split(",")]
    for method in args.methods.split(","):
        rows = {}
        model = build(cfg, method, device, dtype, args.rank)
        for seq in seqs:
            rows[seq, "minillm"] = measure(device, step_time, model, device, seq, args.steps)
        del model
        if args.peer:
            model = peers.hf_finetune_model(cfg, method, device, dtype, args.rank)
            peer = {"full": "transformers", "lora": "transformers + peft",
                    "qlora": "transformers + peft + bnb"}[method]
            for seq in seqs:
                rows[seq, peer] = measure(device, peers.hf_step_time, model, device,
                                          cfg.vocab_size, seq, args.steps)
            del model
        for (seq, impl), (t, peak) in sorted(rows.items(), key=lambda kv: kv[0][0]):
            print(f"| {method} | {impl} | {seq} | {t:.3f} | {seq / t:,.0f} | {peak} |")
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
