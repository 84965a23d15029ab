"""Benchmark: batched generation, tokens/s against batch size (generation.generate_tokens_batch).

    python bench/batched_generate.py                          # the tiny preset, random weights, CPU
    python bench/batched_generate.py --preset small-125m --device cuda --batch-sizes 1,8,32,64

B prompts of different lengths (8 … 8 + 3·(B−1) tokens, so left padding is exercised) decode
greedily together for --new-tokens steps each (no EOS: every row runs to the end). tokens/s counts
every row's new tokens over the wall time of prefill + decode, the fastest of --repeats runs.
Weights are random: speed does not depend on their values.
One decode step reads every weight once whatever B is, so batching turns weight reads into more
tokens until compute (or, on a CPU, the matmul throughput) becomes the limit.
"""

from __future__ import annotations

import argparse
import time

import torch

from minillm.config import ModelConfig  # noqa: E402
from minillm.generate.batched import generate_tokens_batch  # noqa: E402
from minillm.generate.sampling import SamplingConfig  # noqa: E402
from minillm.model import Llama  # noqa: E402
from minillm.util.device import pick_device  # noqa: E402


def run(model, batch: int, new_tokens: int, vocab: int) -> tuple[int, float]:
    """(new tokens produced, seconds) for one batch of `batch` prompts."""
    g = torch.Generator().manual_seed(batch)
    prompts = [[1] + torch.randint(3, vocab, (7 + 3 * b,), generator=g).tolist()
               for b in range(batch)]
    cfg = SamplingConfig(max_new_tokens=new_tokens, temperature=0.0)
    t0 = time.perf_counter()
    n = sum(tok is not None for _, tok in generate_tokens_batch(model, prompts, cfg))
    if model.embed_tokens.weight.device.type == "cuda":
        torch.cuda.synchronize()
    return n, time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="model preset (minillm.config.PRESETS)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    p.add_argument("--batch-sizes", default="1,2,4,8,16", help="comma-separated batch sizes")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per row")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs per batch size; the fastest is reported "
                        "(on a shared machine the others measure the neighbours)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    torch.manual_seed(0)
    cfg = ModelConfig.from_name(args.preset)
    model = Llama(cfg).to(device).eval()
    run(model, 2, 4, cfg.vocab_size)  # warm-up
    print(f"{args.preset} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters), "
          f"{device.type}, {torch.get_num_threads()} threads, "
          f"{args.new_tokens} new tokens per row, greedy\n")
    print("| batch | new tokens | seconds | tokens/s | vs batch 1 |\n|---|---|---|---|---|")
    base = None
    for b in (int(x) for x in args.batch_sizes.split(",")):
        n, s = min((run(model, b, args.new_tokens, cfg.vocab_size) for _ in range(args.repeats)),
                   key=lambda r: r[1])
        base = base or n / s
        print(f"| {b} | {n} | {s:.2f} | {n / s:.0f} | {n / s / base:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
