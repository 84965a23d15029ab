"""Peak host memory per rank while a checkpoint is loaded for training: FSDP2 (rank 0 reads it, each
rank keeps its shard) against every rank reading it whole (what DDP does), on 2 gloo processes.

    .venv/bin/python bench/fsdp_memory.py                  # a 220M-parameter float32 model
    .venv/bin/python bench/fsdp_memory.py --layers 4       # smaller

It writes a random-weight minillm checkpoint to a temp directory, then in each of two spawns of 2
ranks builds the training model from it: `build_sharded_model` (training/loop.py, FSDP) in one,
`build_model` on every rank in the other. Each rank reports its peak RSS (ru_maxrss) above what it
held before loading, once the weights are in place, and after FSDP's first all-gather (which
shard_model runs once, and every training step needs: the root unit's embedding and lm_head
gathered, twice over while the all-gather buffer is copied out). Prints a Markdown table for
docs/measured.md.
"""

import argparse
import os
import resource
import socket
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from minillm.config import ModelConfig
from minillm.formats.native import save_model
from minillm.model import Llama
from minillm.training import distributed
from minillm.training.config import TrainConfig, apply_overrides
from minillm.training.loop import build_model, build_sharded_model

MIB = 2**20


def rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def worker(rank: int, port: int, ckpt: str, sharded: bool, out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    cfg = apply_overrides(TrainConfig(), {"init_from": ckpt, "device": "cpu",
                                          "distributed": "fsdp" if sharded else "ddp"}, "bench")
    device = torch.device("cpu")
    before_peak = rss_peak()
    filled = []  # the peak once the shards are filled, before FSDP's first all-gather
    real_fill = distributed.fill_from_rank0

    def fill(*args):
        real_fill(*args)
        filled.append(rss_peak())

    distributed.fill_from_rank0 = fill
    if sharded:
        model = build_sharded_model(cfg, device, torch.float32, rank == 0)
    else:
        model = build_model(cfg, device, torch.float32)
    # touch every weight, as the first step will: tensors mapped from the file count from here on
    local = [t.to_local() if hasattr(t, "to_local") else t for t in model.state_dict().values()]
    for t in local:
        t.float().sum()
    dist.barrier()
    held = sum(t.nbytes for t in local)
    row = (rank, (filled[0] if filled else rss_peak()) - before_peak, rss_peak() - before_peak,
           held)
    rows = [None, None]
    dist.all_gather_object(rows, row)
    if rank == 0:
        torch.save(rows, out)
    dist.destroy_process_group()


def write_checkpoint(_: int, cfg: ModelConfig, path: str):
    save_model(Llama(cfg), path)


def meta_llama(cfg: ModelConfig) -> Llama:
    with torch.device("meta"):
        return Llama(cfg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=1024, help="model width")
    p.add_argument("--layers", type=int, default=12, help="blocks")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary (untied lm_head)")
    args = p.parse_args()
    cfg = ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=args.dim // 64,
                      hidden_dim=int(2.75 * args.dim), vocab_size=args.vocab, max_seq_len=256,
                      tie_embeddings=False)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "model"
        # written by a child, so the ranks (forked from this process) start small
        mp.spawn(write_checkpoint, args=(cfg, str(ckpt)), nprocs=1)
        size = 4 * sum(p.numel() for p in meta_llama(cfg).parameters())
        results = {}
        for sharded in (True, False):
            out = str(Path(tmp) / f"rows-{sharded}.pt")
            mp.spawn(worker, args=(free_port(), str(ckpt), sharded, out), nprocs=2)
            results[sharded] = torch.load(out, weights_only=True)
    print(f"\nmodel: {size / MIB:,.0f} MiB of float32 weights ({size // 4 / 1e6:.0f}M parameters), "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs, 2 gloo ranks\n")
    print("| load | rank | peak: weights in place | peak: after the first gather | held | "
          "first peak / model |")
    print("|---|---|---|---|---|---|")
    for sharded, name in ((True, "FSDP (rank 0 reads, sends one tensor at a time)"),
                          (False, "whole model per rank (DDP)")):
        for rank, at_fill, peak, held in results[sharded]:
            print(f"| {name} | {rank} | {at_fill / MIB:,.0f} MiB | {peak / MIB:,.0f} MiB | "
                  f"{held / MIB:,.0f} MiB | {at_fill / size:.2f} |")

if __name__ == "__main__":
    main()
