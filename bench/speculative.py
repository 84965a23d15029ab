"""Benchmark: speculative decoding, acceptance rate and speed-up against the target alone.

    python bench/speculative.py --target out/big --draft out/tiny          # greedy, k = 1, 2, 4, 6
    python bench/speculative.py --target out/big --draft out/tiny --temperature 0.8

Both checkpoints must share a tokenizer (train the draft with the target's: `--data.tokenizer`, or
the same `--data.cache_dir`). For each prompt the target decodes --new-tokens tokens alone, then
with the draft proposing k tokens per target pass (generation.speculative_generate_tokens). Greedy
rows also check that the tokens are identical to the target's own. acceptance = accepted / proposed
draft tokens; tokens/target pass = new tokens / target forwards, the prefill included (1 without a
draft, up to k + 1 with one; a bonus token cut by the token limit makes it a slight underestimate).
"""

from __future__ import annotations

import argparse
import time

import torch

from minillm.formats.load import load_pretrained, load_tokenizer  # noqa: E402
from minillm.generate.decode import GenerationStats, generate_tokens  # noqa: E402
from minillm.generate.sampling import SamplingConfig  # noqa: E402
from minillm.generate.speculative import speculative_generate_tokens  # noqa: E402

PROMPTS = ["def __init__(self", "import os\nimport sys\n\n\ndef main(",
           "class Parser:\n    def parse(self, text", "    for i in range(len(",
           "        if not isinstance(value, str):\n            raise"]


def size(model) -> float:
    # millions (a tied lm_head counted once)
    return sum(p.numel() for p in model.parameters()) / 1e6


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = list(fn(*args, **kwargs))
    return out, time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, help="the large checkpoint")
    p.add_argument("--draft", required=True, help="the small checkpoint (same tokenizer)")
    p.add_argument("--k", default="1,2,4,6", help="comma-separated draft lengths")
    p.add_argument("--new-tokens", type=int, default=96, help="tokens generated per prompt")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0: greedy (checked against the target)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    target, draft = load_pretrained(args.target), load_pretrained(args.draft)
    tok = load_tokenizer(args.target)
    prompts = [tok.encode(text, bos=True) for text in PROMPTS]
    cfg = SamplingConfig(max_new_tokens=args.new_tokens, temperature=args.temperature, top_k=None,
                         seed=0)
    print(f"target {size(target):.2f}M, draft {size(draft):.2f}M parameters; CPU, "
          f"{torch.get_num_threads()} threads; {len(prompts)} prompts × {args.new_tokens} "
          f"new tokens, temperature {args.temperature}\n")
    print("| decoding | acceptance | tokens/target pass | tokens/s | speed-up "
          "| same tokens as target |")
    print("|---|---|---|---|---|---|")
    # warm-up
    list(generate_tokens(target, prompts[0], SamplingConfig(max_new_tokens=4, temperature=0.0)))
    alone, n, seconds = [], 0, 0.0
    for ids in prompts:
        out, s = timed(generate_tokens, target, ids, cfg)
        alone.append(out)
        n, seconds = n + len(out), seconds + s
    base = n / seconds
    print(f"| target alone | – | 1.00 | {base:.0f} | 1.00× | – |")
    n2, s2 = 0, 0.0
    for ids in prompts:
        out, s = timed(generate_tokens, draft, ids, cfg)
        n2, s2 = n2 + len(out), s2 + s
    print(f"| draft alone | – | – | {n2 / s2:.0f} | {n2 / s2 / base:.2f}× | – |")
    for k in (int(x) for x in args.k.split(",")):
        n, seconds, same, drafted, accepted, passes = 0, 0.0, True, 0, 0, 0
        for ids, ref in zip(prompts, alone, strict=True):
            stats = GenerationStats()
            out, s = timed(speculative_generate_tokens, target, draft, ids, cfg, k=k, stats=stats)
            n, seconds, same = n + len(out), seconds + s, same and out == ref
            drafted, accepted = drafted + stats.drafted, accepted + stats.accepted
            # the prefill, then each round adds accepted + 1
            passes += 1 + len(out) - 1 - stats.accepted
        check = ("yes" if same else "NO") if args.temperature == 0 else "– (sampled)"
        print(f"| speculative k={k} | {accepted / drafted:.0%} | {n / passes:.2f} | "
              f"{n / seconds:.0f} | {n / seconds / base:.2f}× | {check} |", flush=True)


if __name__ == "__main__":
    main()
