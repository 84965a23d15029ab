"""Throwaway peer check: minillm's DoRA adapters against peft's, both ways, on a tiny random Llama,
in two configurations: plain DoRA, and DoRA + rsLoRA + embed_tokens / lm_head trained in full over a
vocabulary with two new tokens.

    /path/to/peer-venv/bin/python bench/peer_dora_check.py  # needs torch, transformers, peft

1. ours → peft: minillm trains nothing, it randomizes lora_B and the magnitudes, saves the adapter;
   peft loads it (PeftModel.from_pretrained) onto transformers' LlamaForCausalLM built from the same
   weights.
2. peft → ours: peft's get_peft_model(use_dora=True), randomized the same way, save_pretrained;
   minillm's load_adapter reads it.
3. merged: peft's merge_and_unload against minillm's merge_lora.
Each prints the max abs logit difference (float32, eager attention). Not a test: peft is never a
dependency of minillm.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from minillm.config import ModelConfig  # noqa: E402
from minillm.finetune.adapters import (  # noqa: E402
    apply_lora,
    lora_modules,
    mark_only_lora_trainable,
    merge_lora,
)
from minillm.finetune.new_tokens import resize_vocab  # noqa: E402
from minillm.finetune.peft_io import load_adapter, save_adapter  # noqa: E402
from minillm.formats.hf import save_hf  # noqa: E402
from minillm.model import Llama  # noqa: E402

CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, vocab_size=101,
                  max_seq_len=64)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDX = torch.tensor([[1, 5, 99, 100, 7, 98, 42, 3, 64, 17]])
IDX_NEW = torch.tensor([[1, 5, 99, 101, 7, 102, 42, 3, 64, 17]])  # 101, 102: the two new tokens


def perturb(named_params, seed: int, saved):
    """Make an untrained adapter matter: B random, m = ‖W0‖ · U(0.7, 1.3), saved modules
    jittered."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in named_params:
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "lora_magnitude_vector" in name:
                p.mul_(0.7 + 0.6 * torch.rand(p.shape, generator=g))
            elif any(s in name for s in saved):
                p.add_(0.02 * torch.randn(p.shape, generator=g))


def hf_model(base_dir: Path, new_tokens: int) -> LlamaForCausalLM:
    model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32,
                                             attn_implementation="eager")
    if new_tokens:  # as a peft user must before loading: the rows themselves come from the adapter
        model.resize_token_embeddings(CFG.vocab_size + new_tokens, mean_resizing=False)
    return model.eval()


def ours_model() -> Llama:
    torch.manual_seed(0)
    return Llama(CFG).eval()


def logits_hf(model, idx) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=idx).logits.float()


def logits_ours(model, idx) -> torch.Tensor:
    with torch.no_grad():
        return model(idx)[0].float()


def check(tmp: Path, rslora: bool, saved: list[str], new_tokens: int) -> float:
    """Max abs logit difference over the three directions for one adapter configuration."""
    idx = IDX_NEW if new_tokens else IDX
    tag = f"rslora={rslora} modules_to_save={saved or None} new_tokens={new_tokens}"
    # 1) ours -> peft
    ours = ours_model()
    resize_vocab(ours, CFG.vocab_size + new_tokens)
    apply_lora(ours, TARGETS, r=8, alpha=16, dropout=0.05, use_rslora=rslora, use_dora=True)
    mark_only_lora_trainable(ours, saved)
    perturb(ours.named_parameters(), 1, saved)
    save_adapter(ours, tmp / f"ours-{tag}", str(tmp / "base"), modules_to_save=saved)
    peft_loaded = PeftModel.from_pretrained(hf_model(tmp / "base", new_tokens),
                                            tmp / f"ours-{tag}").eval()
    d1 = (logits_hf(peft_loaded, idx) - logits_ours(ours, idx)).abs().max().item()

    # 2) peft -> ours
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS, use_dora=True,
                     use_rslora=rslora, modules_to_save=saved or None, task_type="CAUSAL_LM")
    theirs = get_peft_model(hf_model(tmp / "base", new_tokens), cfg)
    perturb(theirs.named_parameters(), 2, saved)
    theirs.eval().save_pretrained(tmp / f"theirs-{tag}")
    ours2 = ours_model()
    loaded = load_adapter(ours2, tmp / f"theirs-{tag}")
    d2 = (logits_hf(theirs, idx) - logits_ours(ours2, idx)).abs().max().item()

    # 3) merged, both sides
    merged_peft = logits_hf(theirs.merge_and_unload(), idx)
    merge_lora(ours2)
    d3 = (merged_peft - logits_ours(ours2, idx)).abs().max().item()
    print(f"{tag}: {len(lora_modules(ours))} DoRA layers r=8, "
          f"{len(loaded)} modules read from peft's file")
    print(f"  ours -> peft {d1:.3e} | peft -> ours {d2:.3e} "
          f"| peft merge_and_unload vs merge_lora {d3:.3e}")
    return max(d1, d2, d3)


def main():
    import peft
    import transformers

    print(f"peft {peft.__version__}, transformers {transformers.__version__}, "
          f"torch {torch.__version__}; max |logit diff|, float32")
    tmp = Path(tempfile.mkdtemp(prefix="peer_dora_"))
    save_hf(ours_model(), tmp / "base")  # the shared base weights, in HF layout
    worst = max(check(tmp, False, [], 0), check(tmp, True, ["embed_tokens", "lm_head"], 2))
    ok = worst < 1e-4
    print("PEER_DORA_OK" if ok else "PEER_DORA_MISMATCH", f"(worst {worst:.3e})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
