"""FSDP2 on several GPUs: tokens/s, MFU and peak memory per rank of the 1B pretraining config and
the 7B LoRA config, each run a few steps under `distributed = "fsdp"` (GPU only).

    torchrun --standalone --nproc_per_node 8 bench/fsdp_gpu.py pretrain
    torchrun --standalone --nproc_per_node 8 bench/fsdp_gpu.py lora \
        --init_from /path/to/open_llama_7b_v2 --corpus alpaca_data.json
    torchrun ... bench/fsdp_gpu.py pretrain --cpu_offload     # shards and AdamW in host memory

pretrain: configs/1b.toml (1.1B parameters, 2048 context, bf16, compiled blocks, activation
checkpointing) on the stdlib corpus; lora: configs/openllama-7b-lora-fsdp.toml (r=16 on all seven
projections over a bf16 base). The steps run through training.train as any run does; each step's
time is recorded from the trainer's own logger, and the first `--warmup` steps (compilation, the
allocator growing) are left out of tokens/s. MFU = tokens/s per GPU × FLOPs/token (flops.py: 6N,
or 4N + 6N_adapter) / the GPU's bf16 peak (--peak-flops, default an H100's 989e12). Rank 0 prints
a Markdown table for docs/measured.md: one row per rank, with its peak allocated and reserved
memory next to the estimator's per-rank FSDP total.
"""

import argparse
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from minillm.training import log as training_log
from minillm.training.config import load_config
from minillm.training.flops import H100_BF16_PEAK_FLOPS, estimate, model_flops_per_token
from minillm.training.loop import train

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"pretrain": ROOT / "configs" / "1b.toml",
           "lora": ROOT / "configs" / "openllama-7b-lora-fsdp.toml"}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", choices=sorted(CONFIGS), help="which config to run")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps to run")
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of tokens/s")
    p.add_argument("--grad_accum_steps", type=int, default=1,
                   help="micro-steps per step (the config's own count is for a real run)")
    p.add_argument("--init_from", default=None, help="lora: the OpenLLaMA-7B directory")
    p.add_argument("--corpus", default=None, help="lora: Alpaca-format JSON/JSONL")
    p.add_argument("--cpu_offload", action="store_true", help="FSDP CPU offload")
    p.add_argument("--peak-flops", type=float, default=H100_BF16_PEAK_FLOPS,
                   help="the GPU's dense bf16 peak, for MFU")
    args = p.parse_args()
    if args.run == "lora" and not (args.init_from and args.corpus):
        p.error("lora needs --init_from (an OpenLLaMA-7B directory) and --corpus")
    out_dir = tempfile.mkdtemp(prefix="fsdp-bench-")
    over = {"distributed": "fsdp", "cpu_offload": args.cpu_offload, "max_steps": args.steps,
            "grad_accum_steps": args.grad_accum_steps, "out_dir": out_dir,
            "eval.interval": 0, "eval.iters": 1, "eval.sample_tokens": 0,
            "checkpoint.interval": 0, "checkpoint.export": False,
            "log.progress_bar": False, "log.tensorboard": False}
    if args.run == "lora":
        over.update({"init_from": args.init_from, "data.corpus": args.corpus})
    cfg = load_config(CONFIGS[args.run], over)

    seconds, tokens = [], []  # per step, from the trainer's logger
    real_step = training_log.Logger.step

    def timed_step(self, step, loss, lr, grad_norm, n_tokens, secs):
        seconds.append(secs)
        tokens.append(n_tokens)
        return real_step(self, step, loss, lr, grad_norm, n_tokens, secs)

    training_log.Logger.step = timed_step
    result = train(cfg)
    world = dist.get_world_size()
    timed = slice(min(args.warmup, len(seconds) - 1), None)
    tok_s = sum(tokens[timed]) / sum(seconds[timed])  # every rank's tokens
    flops_token = model_flops_per_token(result.model, cfg.block_size)
    mfu = tok_s / world * flops_token / args.peak_flops
    row = (dist.get_rank(), torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved())
    rows = [None] * world
    dist.all_gather_object(rows, row)
    est = estimate(result.model.config, cfg.finetune.method, cfg.batch_size // world,
                   cfg.block_size, cfg.finetune.lora_r, tuple(cfg.finetune.lora_targets))
    if dist.get_rank() == 0:
        gib = 2**30
        print(f"\n{args.run}: {CONFIGS[args.run].name}, {world} x {torch.cuda.get_device_name()}, "
              f"torch {torch.__version__}, {len(seconds)} steps ({args.warmup} warm-up), "
              f"{cfg.batch_size} x {cfg.block_size} tokens x {cfg.grad_accum_steps} per step, "
              f"cpu_offload {args.cpu_offload}")
        print(f"tokens/s {tok_s:,.0f} ({tok_s / world:,.0f} per GPU), MFU {100 * mfu:.1f}% "
              f"of {args.peak_flops:.3g} FLOP/s, estimator's FSDP per rank "
              f"{est.fsdp_per_rank(world, cfg.activation_checkpointing) / gib:.2f} GiB\n")
        print("| rank | peak allocated | peak reserved |")
        print("|---|---|---|")
        for rank, allocated, reserved in rows:
            print(f"| {rank} | {allocated / gib:.2f} GiB | {reserved / gib:.2f} GiB |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
