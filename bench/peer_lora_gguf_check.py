"""Throwaway peer check: llama.cpp applying minillm's LoRA GGUF to the base GGUF gives the merged model's
logits.

    /path/to/peer-venv/bin/python bench/peer_lora_gguf_check.py     # needs llama-cpp-python

A tiny random Llama (GQA: 4 query heads, 2 KV heads, so the k permutation uses the KV head count) gets a
random LoRA adapter on all seven projections (plain, then rsLoRA). export.py writes the base as an f32
GGUF, the adapter alone as `--format gguf-lora`, and the merged model as an f32 GGUF. llama-cpp-python
then evaluates one token sequence three ways, all float32 on the CPU:

    A  llama.cpp: base.gguf + --lora adapter.gguf      (llama_adapter_lora_init, scale 1)
    B  llama.cpp: merged.gguf
    C  minillm:   the merged model (exporter.load_merged)

and prints max |A − B|, max |A − C| over the logits, beside max |base − B| (how much the adapter moves
the logits, so the agreement is not vacuous). Exit status 1 if A is not within 1e-3 of B and C.
Not a test: llama-cpp-python is never a dependency of minillm.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tiny import tiny_tokenizer, write_hf_checkpoint  # noqa: E402

from minillm.config import ModelConfig  # noqa: E402
from minillm.exporter import ExportConfig, export, load_merged  # noqa: E402
from minillm.lora import apply_lora  # noqa: E402
from minillm.model import Llama  # noqa: E402
from minillm.peft_io import save_adapter  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOKENS = [1, 17, 42, 7, 99, 3, 250, 11, 64, 5, 300, 8]


def llama_cpp_logits(model_path: Path, lora_path: Path | None = None) -> np.ndarray:
    import llama_cpp

    kw = {"lora_path": str(lora_path)} if lora_path is not None else {}
    llm = llama_cpp.Llama(str(model_path), n_ctx=64, logits_all=True, n_threads=2, verbose=False, **kw)
    llm.eval(TOKENS)
    return np.array(llm.scores[: len(TOKENS)], dtype=np.float32)  # (T, V)


def main() -> int:
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = tiny_tokenizer(tmp / "base" / "tokenizer.model")
        cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=tok.vocab_size,
                          max_seq_len=64)
        write_hf_checkpoint(tmp / "base", cfg, seed=5, fmt="safetensors", tokenizer=tok)
        base_gguf = export(ExportConfig(checkpoint=str(tmp / "base"), out=str(tmp / "base.gguf"), outtype="f32"))
        base = llama_cpp_logits(base_gguf)
        for rslora in (False, True):
            model = Llama.from_pretrained(tmp / "base")
            apply_lora(model, TARGETS, r=4, alpha=8, dropout=0.0, use_rslora=rslora)
            torch.manual_seed(0)
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.data.normal_(0, 0.05)
            adapter = save_adapter(model, tmp / f"adapter-{rslora}")
            lora = export(ExportConfig(checkpoint=str(tmp / "base"), out=str(tmp / f"lora-{rslora}.gguf"),
                                       format="gguf-lora", adapter=str(adapter)))
            merged_gguf = export(ExportConfig(checkpoint=str(tmp / "base"), out=str(tmp / f"merged-{rslora}.gguf"),
                                              outtype="f32", adapter=str(adapter)))
            a = llama_cpp_logits(base_gguf, lora)
            b = llama_cpp_logits(merged_gguf)
            merged = load_merged(ExportConfig(checkpoint=str(tmp / "base"), out=str(tmp / "x"), adapter=str(adapter)))
            with torch.no_grad():
                c = merged.float().eval()(torch.tensor([TOKENS]))[0][0].numpy()
            ab, ac, moved = np.abs(a - b).max(), np.abs(a - c).max(), np.abs(base - b).max()
            ok = ab < 1e-3 and ac < 1e-3
            bad += not ok
            print(f"{'rsLoRA' if rslora else 'LoRA  '}: max|base+lora − merged| in llama.cpp {ab:.2e}, "
                  f"vs minillm merged {ac:.2e}; the adapter moves logits by {moved:.2e}  {'ok' if ok else 'FAIL'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
