"""Throwaway peer check: llama.cpp applying minillm's LoRA GGUF to the base GGUF gives the merged
model's logits.

    /path/to/peer-venv/bin/python bench/peer_lora_gguf_check.py     # needs llama-cpp-python
    PYTHONPATH=/tmp/d1/llpy /work/peers/venv/bin/python bench/peer_lora_gguf_check.py  # as run

A tiny random Llama (GQA: 4 query heads, 2 KV heads, so the k permutation uses the KV head count)
gets a random LoRA adapter on all seven projections (plain, then rsLoRA), then on q_proj and k_proj
alone (the case that only the RoPE permutation of lora_b gets right). export.py writes the base as
an f32 GGUF, the adapter alone as `--format gguf-lora`, and the merged model as an f32 GGUF.
llama-cpp-python then evaluates three token sequences (every position's logits) three ways, all
float32 on the CPU:

    A  llama.cpp: base.gguf + --lora adapter.gguf      (llama_adapter_lora_init, scale 1)
    B  llama.cpp: merged.gguf
    C  minillm:   the merged model (ship/convert.py's load_merged)

and prints max |A − B|, max |A − C| over the logits, beside max |base − B| (how much the adapter
moves the logits, so the agreement is not vacuous). A negative control writes the q/k-only adapter
with lora_b left in HF row order: llama.cpp must then disagree with the merged model. Exit status 1
if A is not within 1e-3 of B and C, or if the control is not caught.
Not a test: llama-cpp-python is never a dependency of minillm.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tiny import tiny_tokenizer, write_hf_checkpoint  # noqa: E402

from minillm.config import ModelConfig  # noqa: E402
from minillm.finetune.adapters import apply_lora  # noqa: E402
from minillm.finetune.peft_io import save_adapter  # noqa: E402
from minillm.model import Llama  # noqa: E402
from minillm.ship.convert import ExportConfig, export, load_merged  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (label, target modules, rsLoRA, std of lora_B): q/k alone move the logits little unless B is large
CASES = [("all 7, LoRA", TARGETS, False, 0.05), ("all 7, rsLoRA", TARGETS, True, 0.05),
         ("q/k only, LoRA", ["q_proj", "k_proj"], False, 1.0)]
PROMPTS = [[1, 17, 42, 7, 99, 3, 250, 11, 64, 5, 300, 8], [1, 5, 5, 5, 120, 77],
           list(range(1, 40, 2))]


def llama_cpp_logits(model_path: Path, lora_path: Path | None = None) -> np.ndarray:
    """llama.cpp's logits at every position of every prompt, concatenated: (Σ T, V), float32."""
    import llama_cpp

    kw = {"lora_path": str(lora_path)} if lora_path is not None else {}
    llm = llama_cpp.Llama(str(model_path), n_ctx=64, logits_all=True, n_threads=2, verbose=False,
                          **kw)
    out = []
    for tokens in PROMPTS:
        llm.reset()
        llm.eval(tokens)
        out.append(np.array(llm.scores[: len(tokens)], dtype=np.float32))  # (T, V)
    return np.concatenate(out)


def minillm_logits(model) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([model(torch.tensor([t]))[0][0].numpy() for t in PROMPTS])


def main() -> int:
    import minillm.ship.gguf_lora as gguf_lora

    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = tiny_tokenizer(tmp / "base" / "tokenizer.model")
        cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128,
                          vocab_size=tok.vocab_size, max_seq_len=64)
        write_hf_checkpoint(tmp / "base", cfg, seed=5, fmt="safetensors", tokenizer=tok)
        base_gguf = export(ExportConfig(checkpoint=str(tmp / "base"), out=str(tmp / "base.gguf"),
                                        outtype="f32"))
        base = llama_cpp_logits(base_gguf)
        print(f"{len(PROMPTS)} prompts, {base.shape[0]} positions, "
              f"largest |logit| {np.abs(base).max():.2f}")
        for i, (label, targets, rslora, std) in enumerate(CASES):
            model = Llama.from_pretrained(tmp / "base")
            torch.manual_seed(i)  # lora_A's init and lora_B below: the same adapter every run
            apply_lora(model, targets, r=4, alpha=8, dropout=0.0, use_rslora=rslora)
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.data.normal_(0, std)
            adapter = save_adapter(model, tmp / f"adapter-{i}")
            src = dict(checkpoint=str(tmp / "base"), adapter=str(adapter))
            lora = export(ExportConfig(out=str(tmp / f"lora-{i}.gguf"), format="gguf-lora", **src))
            merged_gguf = export(ExportConfig(out=str(tmp / f"merged-{i}.gguf"), outtype="f32",
                                              **src))
            a = llama_cpp_logits(base_gguf, lora)
            b = llama_cpp_logits(merged_gguf)
            c = minillm_logits(load_merged(ExportConfig(out=str(tmp / "x"), **src)).float().eval())
            ab, ac, moved = np.abs(a - b).max(), np.abs(a - c).max(), np.abs(base - b).max()
            ok = ab < 1e-3 and ac < 1e-3
            bad += not ok
            print(f"{label:15s}: max|base+lora − merged| in llama.cpp {ab:.2e}, "
                  f"vs minillm merged {ac:.2e}; the adapter moves logits by {moved:.2e}  "
                  f"{'ok' if ok else 'FAIL'}")
            if targets != TARGETS[:2]:
                continue
            # Negative control: the same adapter with q/k lora_b rows left in HF order
            # must NOT match.
            permute = gguf_lora.hf_to_interleaved
            gguf_lora.hf_to_interleaved = lambda b, n_heads: b
            try:
                wrong = export(ExportConfig(out=str(tmp / f"lora-{i}-unpermuted.gguf"),
                                            format="gguf-lora", **src))
            finally:
                gguf_lora.hf_to_interleaved = permute
            wb = np.abs(llama_cpp_logits(base_gguf, wrong) - b).max()
            ok = wb > 1e-2 and wb > 10 * max(ab, ac)
            bad += not ok
            print(f"{'  control':15s}: q/k lora_b not permuted: max|base+lora − merged| {wb:.2e} "
                  f"({'caught' if ok else 'NOT caught: FAIL'})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
