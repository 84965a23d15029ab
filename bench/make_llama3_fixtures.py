"""Throwaway generator of tests/data/llama3_family/: tiny Llama-3-style checkpoints written by
transformers, with its logits as goldens (computed once; the versions are pinned in goldens.json).

    /work/peers/venv/bin/python bench/make_llama3_fixtures.py   # transformers 5.x, torch 2.x

Three checkpoints, each `save_pretrained` (config.json + model.safetensors), float32:
- llama3: LlamaForCausalLM with rope_parameters type "llama3" whose original context (16) is far
  below the positions run (up to 95), so the low and blended frequencies are scaled; an explicit
  head_dim (24, where hidden_size / heads is 16); attention_bias (q, k, v and o biases); GQA 4/2.
- llama3_tied: the same family with tied embeddings, head_dim = hidden / heads, no bias, and
  rope_scaling written in transformers 4.x's layout (config.json edited after saving).
- qwen2: Qwen2ForCausalLM (biases on q/k/v only), tied embeddings.
Weights are drawn with std 0.1 (biases too) so the logits are far from uniform. goldens.json holds,
per checkpoint, the token ids and the logits of positions POSITIONS of one forward pass.
Not a test: transformers is not a dependency of minillm.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "llama3_family"
T, POSITIONS = 96, [0, 7, 15, 16, 40, 95]
SCALING = {"factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 16}


def configs():
    base = dict(hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=96, max_position_embeddings=128,
                rms_norm_eps=1e-5)
    llama3 = transformers.LlamaConfig(**base, head_dim=24, attention_bias=True,
                                      rope_parameters={"rope_type": "llama3",
                                                       "rope_theta": 10000.0, **SCALING})
    tied = transformers.LlamaConfig(**base, tie_word_embeddings=True,
                                    rope_parameters={"rope_type": "llama3",
                                                     "rope_theta": 500000.0, **SCALING})
    qwen2 = transformers.Qwen2Config(**base, tie_word_embeddings=True, rope_theta=1000000.0)
    return {"llama3": (transformers.LlamaForCausalLM, llama3),
            "llama3_tied": (transformers.LlamaForCausalLM, tied),
            "qwen2": (transformers.Qwen2ForCausalLM, qwen2)}


def to_4x_layout(path: Path):
    """rope_parameters → transformers 4.x's rope_scaling + top-level rope_theta."""
    cfg = json.loads(path.read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = params
    path.write_text(json.dumps(cfg, indent=2))


def main():
    goldens = {"transformers": transformers.__version__, "torch": torch.__version__,
               "positions": POSITIONS, "models": {}}
    for name, (cls, cfg) in configs().items():
        torch.manual_seed(0)
        model = cls(cfg).float().eval()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.1)
            for m in model.modules():
                if hasattr(m, "variance_epsilon"):  # RMSNorm weights near 1
                    m.weight.add_(1.0)
        out = OUT / name
        model.save_pretrained(out, safe_serialization=True)
        if name == "llama3_tied":
            to_4x_layout(out / "config.json")
        ids = torch.randint(0, cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            logits = model(ids).logits[0, POSITIONS]  # (len(POSITIONS), V)
        save_file({"ids": ids[0], "logits": logits.contiguous()}, str(out / "golden.safetensors"))
        goldens["models"][name] = {"class": cls.__name__,
                                   "max_abs_logit": logits.abs().max().item()}
        print(f"{name}: {cls.__name__}, |logits| max {logits.abs().max():.3f}", file=sys.stderr)
    (OUT / "goldens.json").write_text(json.dumps(goldens, indent=2) + "\n")


if __name__ == "__main__":
    main()
