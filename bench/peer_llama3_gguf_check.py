"""Throwaway peer check: llama.cpp runs minillm's GGUF exports of the Llama 3 family fixtures
(tests/data/llama3_family: llama3 RoPE scaling as rope_freqs, an explicit head_dim as
attention.key_length, q/k/v(/o) biases) and gives transformers' logits.

    .venv/bin/python bench/peer_llama3_gguf_check.py write /tmp/l3g          # minillm writes
    /work/peers/venv/bin/python bench/peer_llama3_gguf_check.py check /tmp/l3g  # llama-cpp-python

`write` pads each tiny model's vocabulary to a 384-piece SentencePiece tokenizer (llama.cpp wants
the two equal) and exports f32; `check` evaluates the golden ids in llama.cpp and prints the largest
logit difference from transformers' goldens (llama.cpp keeps its KV cache in f16: ~1e-3). Not a
test: llama.cpp is not a dependency of minillm.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data" / "llama3_family"
NAMES = ("llama3", "llama3_tied", "qwen2")
POSITIONS = [0, 7, 15, 16, 40, 95]


def write(out: Path):
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import tiny_tokenizer

    from minillm.config import ModelConfig
    from minillm.formats.load import load_pretrained
    from minillm.ship.gguf_writer import write_gguf

    out.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer(out / "tokenizer.model", vocab_size=384)
    for name in NAMES:
        model = load_pretrained(DATA / name)
        cfg = model.config
        big = ModelConfig(**(cfg.to_dict() | {"vocab_size": tok.vocab_size}))
        state = dict(model.state_dict())
        pad = torch.zeros(tok.vocab_size - cfg.vocab_size, cfg.dim)
        for key in ("embed_tokens.weight", "lm_head.weight"):
            state[key] = torch.cat([state[key], pad])
        if cfg.tie_embeddings:
            del state["lm_head.weight"]
        write_gguf(out / f"{name}.gguf", big, iter(state.items()), tok, "f32", progress=False)
        print(f"wrote {out / name}.gguf")


def check(out: Path):
    import llama_cpp
    import numpy as np
    from safetensors.numpy import load_file

    for name in NAMES:
        golden = load_file(str(DATA / name / "golden.safetensors"))
        llm = llama_cpp.Llama(str(out / f"{name}.gguf"), n_ctx=128, logits_all=True,
                              verbose=False, n_threads=2)
        ids = golden["ids"].tolist()
        llm.eval(ids)
        logits = np.array(llm.scores[: len(ids)])[POSITIONS, : golden["logits"].shape[1]]
        print(f"{name}: llama.cpp {llama_cpp.__version__} vs transformers, max |logit diff| "
              f"{float(np.abs(logits - golden['logits']).max()):.2e}")


if __name__ == "__main__":
    {"write": write, "check": check}[sys.argv[1]](Path(sys.argv[2]))
