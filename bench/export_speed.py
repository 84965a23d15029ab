"""Benchmark: export an OpenLLaMA-shaped checkpoint to GGUF — wall time, MB/s and peak RSS.

    python bench/export_speed.py --preset openllama-3b --outtypes f16,q4_0
    python bench/export_speed.py --preset tiny --outtypes f16,q8_0,q4_0  # a quick smoke run
    python bench/export_speed.py --encode 64  # encoder MB/s, 7B extrapolated

The input is the random-weight bf16 `.bin`-sharded checkpoint of bench/load.py (written once,
reused), plus a SentencePiece tokenizer of the model's vocabulary size trained on the stdlib (GGUF
needs one; its size must equal the embedding rows). Each export runs in a fresh process so its peak
RSS (ru_maxrss) is its own. The inputs are memory-mapped, so pages of the input files count in RSS
as they are read; the goal from the export issue is peak RSS ≤ 1.5 GB above those mapped inputs.
MB/s = input bytes / wall time.

--encode N times each ggml encoder alone on N MB of random float32 rows of 4096 values (MB/s of f32
input, wall and process CPU time) and extrapolates the CPU time to quantize OpenLLaMA-7B's weights
(27 GB of f32) to each type and to each llama-quantize mix, tensor by tensor with the mix's own
types (quant_mix.py); divide by the cores torch uses for a wall-clock estimate on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from load import write_checkpoint  # noqa: E402

from minillm.config import ModelConfig  # noqa: E402


def child(ckpt: str, outtype: str, out: str):
    from minillm.ship.convert import ExportConfig, export

    t0 = time.perf_counter()
    export(ExportConfig(checkpoint=ckpt, out=out, outtype=outtype))
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds,
                      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def encode_throughput(mb: int, threads: int | None):
    import torch

    if threads:
        torch.set_num_threads(threads)
    from minillm.formats.ggml_quants import quantize, type_name
    from minillm.ship.gguf_writer import MIXES, plan_tensors

    x = torch.randn(mb * 2**20 // (4 * 4096), 4096, generator=torch.Generator().manual_seed(0))
    types = [2, 3, 6, 7, 8, 12, 13, 14]  # Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q4_K Q5_K Q6_K
    rate = {}
    print(f"encoders on {x.numel() * 4 / 1e6:.0f} MB of f32 rows of 4096 values, "
          f"{torch.get_num_threads()} threads")
    print("| type | MB/s (wall) | MB/s (CPU time) "
          "| OpenLLaMA-7B, all weights in this type: CPU minutes |")
    print("|---|---|---|---|")
    n7b = sum(int(np.prod(p.shape))
              for p in plan_tensors(ModelConfig.from_name("openllama-7b"), "f32"))
    for t in types:
        t0, c0 = time.perf_counter(), time.process_time()
        quantize(x, t)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        # CPU time: a shared machine's wall clock measures the neighbours
        rate[t] = x.numel() * 4 / cpu
        print(f"| {type_name(t)} | {x.numel() * 4 / 1e6 / wall:,.1f} "
              f"| {x.numel() * 4 / 1e6 / cpu:,.1f} | {n7b * 4 / rate[t] / 60:,.1f} min |")
    rate.update({0: float("inf"), 1: float("inf"), 30: float("inf")})
    print("| mix | | | OpenLLaMA-7B: CPU minutes |")
    for mix in MIXES:
        plans = plan_tensors(ModelConfig.from_name("openllama-7b"), mix)
        seconds = sum(int(np.prod(p.shape)) * 4 / rate[p.ggml_type] for p in plans)
        print(f"| {mix} | | | {seconds / 60:,.1f} min "
              f"({', '.join(sorted({type_name(p.ggml_type) for p in plans}))}) |")


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="openllama-3b",
                   help="model shape preset (see minillm/config.py)")
    p.add_argument("--outtypes", default="f16,q4_0",
                   help="comma list of GGUF outtypes "
                        "(f32, f16, bf16, q8_0, q4_0, q4_k_m, q5_k_m, q6_k, ...)")
    p.add_argument("--dir", default=None,
                   help="checkpoint directory (default /tmp/minillm-bench-PRESET-bin)")
    p.add_argument("--keep", action="store_true",
                   help="keep the .gguf files (default: delete after measuring)")
    p.add_argument("--encode", type=int, default=None, metavar="MB",
                   help="only time the ggml encoders on MB of f32 input and extrapolate to 7B")
    p.add_argument("--threads", type=int, default=None,
                   help="with --encode: torch threads (default: torch's)")
    p.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(*args.child)
    if args.encode:
        return encode_throughput(args.encode, args.threads)

    cfg = ModelConfig.from_name(args.preset)
    ckpt = Path(args.dir or f"/tmp/minillm-bench-{args.preset}-bin")
    if not (ckpt / "config.json").exists():
        write_checkpoint(ckpt, cfg, "bin")
    if not (ckpt / "tokenizer.model").exists():
        from minillm.data.pretrain import read_stdlib
        from minillm.tokenizer.sentencepiece import train_tokenizer

        train_tokenizer(read_stdlib().texts, ckpt / "tokenizer.model", cfg.vocab_size)
    in_bytes = sum(f.stat().st_size for f in ckpt.glob("pytorch_model*.bin"))
    print(f"{args.preset}: {in_bytes / 1e9:.2f} GB of bf16 .bin shards in {ckpt}")
    print("| outtype | output | wall s | MB/s (input) | peak RSS | RSS above mapped inputs |")
    print("|---|---|---|---|---|---|")
    for outtype in args.outtypes.split(","):
        out = ckpt.parent / f"{ckpt.name}-{outtype}.gguf"
        cmd = [sys.executable, __file__, "--child", str(ckpt), outtype, str(out)]
        res = subprocess.run(cmd, check=True, capture_output=True, text=True)
        r = json.loads(res.stdout.strip().splitlines()[-1])
        size = out.stat().st_size
        print(f"| {outtype} | {size / 1e9:.2f} GB | {r['seconds']:.1f} "
              f"| {in_bytes / 1e6 / r['seconds']:,.0f} | {r['peak_rss'] / 1e9:.2f} GB "
              f"| {(r['peak_rss'] - in_bytes) / 1e9:+.2f} GB |")
        if not args.keep:
            out.unlink()


if __name__ == "__main__":
    main()
