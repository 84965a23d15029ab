"""Benchmark: export an OpenLLaMA-shaped checkpoint to GGUF — wall time, MB/s and peak RSS.

    python bench/export.py --preset openllama-3b --outtypes f16,q4_0
    python bench/export.py --preset tiny --outtypes f16,q8_0,q4_0          # a quick smoke run

The input is the random-weight bf16 `.bin`-sharded checkpoint of bench/load.py (written once, reused), plus
a SentencePiece tokenizer of the model's vocabulary size trained on the stdlib (GGUF needs one; its size
must equal the embedding rows). Each export runs in a fresh process so its peak RSS (ru_maxrss) is its own.
The inputs are memory-mapped, so pages of the input files count in RSS as they are read; the goal from the
export issue is peak RSS ≤ 1.5 GB above those mapped inputs. MB/s = input bytes / wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from load import write_checkpoint  # noqa: E402

from minillm.config import ModelConfig  # noqa: E402


def child(ckpt: str, outtype: str, out: str):
    from minillm.exporter import ExportConfig, export

    t0 = time.perf_counter()
    export(ExportConfig(checkpoint=ckpt, out=out, outtype=outtype))
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="openllama-3b", help="model shape preset (see minillm/config.py)")
    p.add_argument("--outtypes", default="f16,q4_0", help="comma list of f32, f16, bf16, q8_0, q4_0")
    p.add_argument("--dir", default=None, help="checkpoint directory (default /tmp/minillm-bench-PRESET-bin)")
    p.add_argument("--keep", action="store_true", help="keep the .gguf files (default: delete after measuring)")
    p.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(*args.child)

    cfg = ModelConfig.from_name(args.preset)
    ckpt = Path(args.dir or f"/tmp/minillm-bench-{args.preset}-bin")
    if not (ckpt / "config.json").exists():
        write_checkpoint(ckpt, cfg, "bin")
    if not (ckpt / "tokenizer.model").exists():
        from minillm.data import read_stdlib
        from minillm.tokenizer import train_tokenizer

        train_tokenizer(read_stdlib().texts, ckpt / "tokenizer.model", cfg.vocab_size)
    in_bytes = sum(f.stat().st_size for f in ckpt.glob("pytorch_model*.bin"))
    print(f"{args.preset}: {in_bytes / 1e9:.2f} GB of bf16 .bin shards in {ckpt}")
    print("| outtype | output | wall s | MB/s (input) | peak RSS | RSS above mapped inputs |")
    print("|---|---|---|---|---|---|")
    for outtype in args.outtypes.split(","):
        out = ckpt.parent / f"{ckpt.name}-{outtype}.gguf"
        cmd = [sys.executable, __file__, "--child", str(ckpt), outtype, str(out)]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        res = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
        r = json.loads(res.stdout.strip().splitlines()[-1])
        size = out.stat().st_size
        print(f"| {outtype} | {size / 1e9:.2f} GB | {r['seconds']:.1f} | {in_bytes / 1e6 / r['seconds']:,.0f} | "
              f"{r['peak_rss'] / 1e9:.2f} GB | {(r['peak_rss'] - in_bytes) / 1e9:+.2f} GB |")
        if not args.keep:
            out.unlink()


if __name__ == "__main__":
    main()
