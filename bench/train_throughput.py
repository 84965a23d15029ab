"""Training throughput (tokens/s) and MFU of the training step train.py runs, on random tokens.

    python bench/train_throughput.py  # GPU: 125M @1024 and 1B @2048 (bf16, compile)
                                      # CPU: the default tiny config
    python bench/train_throughput.py --config configs/1b.toml --seq 2048 --batch 4 --steps 20

One optimizer step = forward_backward over one micro-batch + clip + AdamW
(minillm/training/loop.py), timed after `--warmup` steps (torch.compile traces during those). Random
token ids cost the model the same as text, and skip data preparation.

    MFU = tokens/s × (6N + 12·L·C·T) / peak,   peak = 989e12 (H100 SXM dense bf16) on CUDA

On CPU there is no meaningful peak, so MFU is left blank. Results go to stdout as a table.
"""

import argparse
import time
from contextlib import nullcontext

import torch

from minillm.model import Llama
from minillm.training.config import TrainConfig, apply_overrides, load_config
from minillm.training.flops import H100_BF16_PEAK_FLOPS, model_flops_per_token, model_params
from minillm.training.loop import configure_optimizer, forward_backward
from minillm.util.device import pick_device, pick_dtype


def measure(cfg: TrainConfig, device: torch.device, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    dtype = pick_dtype(cfg.dtype, device, training=True, width=cfg.model.dim)
    if device.type == "cpu" and cfg.cpu_threads > 0:
        torch.set_num_threads(cfg.cpu_threads)
    model = Llama(cfg.model).to(device)
    model.activation_checkpointing = cfg.activation_checkpointing
    flops_per_token = model_flops_per_token(model, cfg.block_size)
    optimizer = configure_optimizer(model, 0.1, 1e-4, (0.9, 0.95), 1e-8,
                                    fused=device.type == "cuda")
    step_model = torch.compile(model) if cfg.compile else model
    autocast = ((lambda: torch.autocast(device.type, dtype=dtype)) if dtype != torch.float32
                else nullcontext)
    g = torch.Generator(device=device).manual_seed(0)
    V, B, T = cfg.model.vocab_size, cfg.batch_size, cfg.block_size
    x = torch.randint(0, V, (B, T + 1), device=device, generator=g)  # (B, T+1)
    batch = [(x[:, :-1].contiguous(), x[:, 1:].contiguous())]  # (B, T), (B, T)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup + steps):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
        forward_backward(step_model, batch, cfg.batch_size * cfg.block_size, autocast=autocast)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    tokens_per_s = steps * cfg.batch_size * cfg.block_size / dt
    peak = H100_BF16_PEAK_FLOPS if device.type == "cuda" else 0.0
    return dict(
        params=model_params(model)[0], seq=cfg.block_size, batch=cfg.batch_size,
        dtype=str(dtype).removeprefix("torch."), compile=cfg.compile, tokens_per_s=tokens_per_s,
        mfu=tokens_per_s * flops_per_token / peak if peak else None,
        mem_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=None,
                        help="train TOML to measure (repeatable); default: see above")
    parser.add_argument("--seq", type=int, default=None, help="override block_size")
    parser.add_argument("--batch", type=int, default=None,
                        help="override the micro-batch size (batch_size)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed steps first (compilation happens here)")
    parser.add_argument("--no-compile", action="store_true", help="measure without torch.compile")
    args = parser.parse_args()
    device = pick_device("auto")
    if args.config:
        runs = [(path, load_config(path)) for path in args.config]
    elif device.type == "cuda":  # micro-batches that fit an 80 GB GPU
        runs = [("configs/small-125m.toml @1024",
                 apply_overrides(load_config("configs/small-125m.toml"),
                                 {"batch_size": 16}, "bench")),
                ("configs/small-125m.toml @2048",
                 apply_overrides(load_config("configs/small-125m.toml"),
                                 {"batch_size": 8, "block_size": 2048, "model.max_seq_len": 2048},
                                 "bench")),
                ("configs/1b.toml @1024",
                 apply_overrides(load_config("configs/1b.toml"),
                                 {"batch_size": 8, "block_size": 1024}, "bench")),
                ("configs/1b.toml @2048",
                 apply_overrides(load_config("configs/1b.toml"), {"batch_size": 4}, "bench"))]
    else:
        runs = [("default tiny (CPU)", TrainConfig())]
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}")
    print(f"{'config':32s} {'params':>9s} {'seq':>5s} {'batch':>5s} {'dtype':>9s} "
          f"{'compile':>7s} {'tokens/s':>11s} {'MFU':>6s} {'peak mem':>9s}")
    for name, cfg in runs:
        over = {"block_size": args.seq, "batch_size": args.batch}
        over = {k: v for k, v in over.items() if v is not None}
        if args.no_compile:
            over["compile"] = False
        if "block_size" in over and over["block_size"] > cfg.model.max_seq_len:
            over["model.max_seq_len"] = over["block_size"]
        cfg = apply_overrides(cfg, over, "command line") if over else cfg
        r = measure(cfg, device, args.steps, args.warmup)
        mfu = f"{100 * r['mfu']:5.1f}%" if r["mfu"] is not None else "     -"
        mem = f"{r['mem_gib']:7.1f}G" if r["mem_gib"] is not None else "        -"
        print(f"{name:32s} {r['params'] / 1e6:8.1f}M {r['seq']:5d} {r['batch']:5d} "
              f"{r['dtype']:>9s} {str(r['compile']):>7s} {r['tokens_per_s']:11,.0f} {mfu} {mem}",
              flush=True)


if __name__ == "__main__":
    main()
