"""Benchmark: load an OpenLLaMA-shaped checkpoint and report load time and peak RSS / weight bytes.

    python bench/load.py --preset openllama-3b            # writes ~6.9 GB of bf16 .bin shards once
    python bench/load.py --preset openllama-3b --format safetensors
    python bench/load.py --preset tiny                      # a quick smoke run

The checkpoint (random weights, the exact HF layout: sharded pytorch_model-0000K-of-0000N.bin +
index) is written by this script, one shard at a time, into --dir (reused when present). Each
measurement runs in a fresh process so its peak RSS (ru_maxrss) is its own. Reported after
`from_pretrained` and again after one forward pass of one token, which touches every weight page (a
memory-mapped load is otherwise lazy).
Goal from the foundation issue: peak RSS ≤ 1.3 × weight bytes.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from minillm.config import ModelConfig  # noqa: E402
from minillm.formats.hf import shard_groups  # noqa: E402
from minillm.model import Llama  # noqa: E402
from minillm.names import ours_to_hf  # noqa: E402


def write_checkpoint(out: Path, cfg: ModelConfig, fmt: str, shard_bytes: float = 2e9):
    """Random bf16 weights in the HF layout, generated shard by shard (never the whole model in
    RAM)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        shapes = [(ours_to_hf(k), tuple(p.shape)) for k, p in Llama(cfg).named_parameters()]
    shape_of = dict(shapes)
    groups = [[(k, shape_of[k]) for k in group]
              for group in shard_groups([(k, 2 * torch.Size(s).numel()) for k, s in shapes],
                                        shard_bytes)]
    ext = "safetensors" if fmt == "safetensors" else "bin"
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    weight_map, g = {}, torch.Generator().manual_seed(0)
    for i, group in enumerate(groups):
        name = f"{stem}-{i + 1:05d}-of-{len(groups):05d}.{ext}"
        part = {k: (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
                for k, shape in group}
        if fmt == "safetensors":
            save_file(part, str(out / name))
        else:
            torch.save(part, out / name)
        weight_map.update({k: name for k in part})
        del part
    total = sum(2 * torch.Size(s).numel() for _, s in shapes)
    (out / f"{stem}.{ext}.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                              "weight_map": weight_map}))
    hf = cfg.to_hf_config()
    hf["torch_dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    return total


def child(path: str, forward: bool):
    from minillm import Llama

    t0 = time.perf_counter()
    model = Llama.from_pretrained(path, dtype=torch.bfloat16)
    t_load = time.perf_counter() - t0
    rss_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t_fwd = 0.0
    if forward:
        t0 = time.perf_counter()
        with torch.no_grad():
            model(torch.tensor([[1]]))
        t_fwd = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"load_s": t_load, "rss_after_load": rss_load, "rss_after_forward": rss,
                      "fwd_s": t_fwd}))


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="openllama-3b",
                   help="model shape preset (see minillm/config.py)")
    p.add_argument("--format", choices=["bin", "safetensors"], default="bin",
                   help="shard file format")
    p.add_argument("--dir", default=None,
                   help="where to write/reuse the checkpoint (default /tmp/minillm-bench-…)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-forward", action="store_true",
                   help="skip the forward pass that touches every page")
    args = p.parse_args()
    if args.child:
        return child(args.child, not args.no_forward)

    cfg = ModelConfig.from_name(args.preset)
    out = Path(args.dir or f"/tmp/minillm-bench-{args.preset}-{args.format}")
    if not (out / "config.json").exists():
        t0 = time.perf_counter()
        total = write_checkpoint(out, cfg, args.format)
        print(f"wrote {total / 1e9:.2f} GB of bf16 shards to {out} "
              f"in {time.perf_counter() - t0:.0f} s")
    total = sum(f.stat().st_size for f in out.iterdir() if f.suffix in (".bin", ".safetensors"))
    cmd = ([sys.executable, __file__, "--child", str(out)]
           + (["--no-forward"] if args.no_forward else []))
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    r = json.loads(res.stdout.strip().splitlines()[-1])
    print("| model | format | weight bytes | load s | peak RSS after load "
          "| after 1-token forward |")
    print("|---|---|---|---|---|---|")
    print(f"| {args.preset} | {args.format} shards | {total / 1e9:.2f} GB | {r['load_s']:.1f} "
          f"| {r['rss_after_load'] / 1e9:.2f} GB ({r['rss_after_load'] / total:.2f}x) "
          f"| {r['rss_after_forward'] / 1e9:.2f} GB ({r['rss_after_forward'] / total:.2f}x) |")


if __name__ == "__main__":
    main()
