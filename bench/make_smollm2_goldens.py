"""Throwaway generator of tests/data/smollm2_goldens.json: what transformers computes on the real
SmolLM2-135M-Instruct Q4_1 GGUF, and the token ids llama.cpp gives its prompts.

    python3 run.py download smollm2-135m-instruct
    /work/peers/venv/bin/python bench/make_smollm2_goldens.py    # transformers, gguf, llama-cpp

- ids: llama.cpp's tokenizer (llama-cpp-python, vocab_only, special tokens parsed, no BOS: SmolLM2's
  GGUF sets add_bos_token false), the authority for a GGUF's tokenization (docs: GUIDE).
- logits: transformers' AutoModelForCausalLM.from_pretrained(dir, gguf_file=...) in float32 (it
  dequantizes Q4_1 to float32 as minillm does). Per prompt, the last position's logits: the top 64
  (ids and values), 512 fixed random vocabulary entries, and the logsumexp of the whole row.
- greedy: transformers' generate(do_sample=False) ids, up to 24 new tokens or its EOS (included).
Not a test: none of these peers is a dependency of minillm.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import llama_cpp
import torch
import transformers

# known_models.cached_path, spelled out: the peer venv does not hold minillm's dependencies
CACHE = Path(os.environ.get("MINILLM_CACHE") or Path.home() / ".cache" / "minillm")
GGUF = CACHE / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "smollm2_goldens.json"
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    # SmolLM2's own ChatML, as its template renders one user turn with the generation prompt
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]
TOP, SAMPLE, NEW = 64, 512, 24


def main():
    gguf = GGUF
    vocab = llama_cpp.Llama(str(gguf), vocab_only=True, verbose=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    V = model.config.vocab_size
    sample = torch.randperm(V, generator=torch.Generator().manual_seed(0))[:SAMPLE].sort().values
    rows = []
    for text in PROMPTS:
        ids = vocab.tokenize(text.encode(), add_bos=False, special=True)
        x = torch.tensor([ids])
        with torch.no_grad():
            last = model(x).logits[0, -1].float()  # (V,)
            out = model.generate(x, do_sample=False, max_new_tokens=NEW)  # up to its EOS
        top = last.topk(TOP)
        rows.append({"text": text, "ids": ids, "top_ids": top.indices.tolist(),
                     "top_logits": top.values.tolist(), "sample_logits": last[sample].tolist(),
                     "logsumexp": last.logsumexp(-1).item(), "greedy": out[0, len(ids):].tolist(),
                     "greedy_text": vocab.detokenize(out[0, len(ids):].tolist()).decode(
                         errors="replace")})
        print(f"{text[-30:]!r} -> {rows[-1]['greedy_text']!r}", file=sys.stderr)
    golden = {"transformers": transformers.__version__, "torch": torch.__version__,
              "llama_cpp_python": llama_cpp.__version__, "gguf_sha256": GGUF_SHA256,
              "sample_ids": sample.tolist(), "prompts": rows}
    OUT.write_text(json.dumps(golden) + "\n")


if __name__ == "__main__":
    main()
