"""What preference tuning did to held-out pairs, counted independently of the training code.

    python bench/preference_effect.py --reference out/lora-tiny --tuned out/dpo-tiny \
        --pairs data_cache/stdlib/stdlib_pref_test.jsonl --template alpaca --beta 0.1

Both models are plain minillm (or HF) directories (a LoRA run's out_dir holds the merged model).
Each held-out pair is tokenized as training tokenizes it (data/preference.py), and every response's
log-prob is summed here from the full (1, T, V) logits with a plain log_softmax, one sequence at a
time: no padding, no chunking, none of training/preference.py. The table counts
- the model's own preference: logp(chosen) > logp(rejected), for the reference and the tuned model;
- the implicit reward, DPO's reading of the tuned model: β·(logp_tuned − logp_ref), chosen above
  rejected (the count `rewards/accuracies` estimates during training), and its mean margin;
split by the question kind ("module", "signature") when the records carry one.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minillm.data.preference import read_pairs, tokenize_pair  # noqa: E402
from minillm.formats.load import load_pretrained, load_tokenizer  # noqa: E402


@torch.no_grad()
def response_logp(model, prompt: list[int], response: list[int]) -> float:
    """Σ log p(response_t | prompt, response_<t), from the full logits of one unpadded sequence."""
    ids = torch.tensor([prompt + response])  # (1, T)
    logp = torch.log_softmax(model(ids)[0][0].double(), dim=-1)  # (T, V)
    start = len(prompt) - 1  # the position that predicts response[0]
    return sum(logp[start + i, t].item() for i, t in enumerate(response))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", required=True, help="the model preference tuning started from")
    ap.add_argument("--tuned", required=True, help="the preference-tuned model")
    ap.add_argument("--pairs", required=True, help="held-out preference records (JSONL / JSON)")
    ap.add_argument("--template", default="alpaca", help="the prompt template training used")
    ap.add_argument("--beta", type=float, default=0.1, help="β of the implicit reward")
    ap.add_argument("--max-length", type=int, default=129, help="ids per sequence (block_size+1)")
    ap.add_argument("--limit", type=int, default=0, help="score only the first N pairs (0: all)")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    ref, tuned = (load_pretrained(p).eval() for p in (args.reference, args.tuned))
    tok = load_tokenizer(args.tuned)
    pairs = read_pairs(args.pairs)[:args.limit or None]
    counts = defaultdict(lambda: [0, 0, 0, 0, 0.0])  # pairs, ref prefers, tuned prefers, reward
    for p in pairs:
        t = tokenize_pair(p, tok, args.template, args.max_length)
        if t is None:
            continue
        lp = {(name, side): response_logp(m, t.prompt_ids, ids)
              for name, m in (("ref", ref), ("tuned", tuned))
              for side, ids in (("c", t.chosen_ids), ("r", t.rejected_ids))}
        reward_c = args.beta * (lp["tuned", "c"] - lp["ref", "c"])
        reward_r = args.beta * (lp["tuned", "r"] - lp["ref", "r"])
        for key in {"all", p.meta.get("kind", "all")}:
            row = counts[key]
            row[0] += 1
            row[1] += lp["ref", "c"] > lp["ref", "r"]
            row[2] += lp["tuned", "c"] > lp["tuned", "r"]
            row[3] += reward_c > reward_r
            row[4] += reward_c - reward_r
    print(f"held-out pairs of {args.pairs}: reference {args.reference}, tuned {args.tuned}, "
          f"β {args.beta}\n")
    print("| pairs | n | reference prefers chosen | tuned prefers chosen | "
          "implicit reward chosen > rejected | mean margin |")
    print("|---|---|---|---|---|---|")
    for key, (n, a, b, c, m) in sorted(counts.items(), key=lambda kv: kv[0] != "all"):
        print(f"| {key} | {n} | {a / n:.3f} | {b / n:.3f} | {c / n:.3f} | {m / n:+.4f} |")


if __name__ == "__main__":
    main()
