"""Throwaway peer check: minillm's preference losses against TRL's trainers, on the same tiny
checkpoint, the same LoRA adapter and the same batch, in float32.

    PYTHONPATH=.:DIR_WITH_TRITON /work/peers/venv/bin/python bench/peer_dpo_check.py
    # needs torch, transformers, peft, trl (1.x), datasets; minillm imports triton (any version)

One random Llama (GQA, 2 layers) is written as an HF directory; minillm wraps all seven projections
in LoRA (r 4), makes lora_B random (an untrained adapter would give policy = reference, every loss
ln 2 and every reward 0) and saves the adapter in PEFT's layout, which peft loads onto transformers'
LlamaForCausalLM. Both sides then score three pairs of different lengths:
- minillm: one forward over [chosen; rejected] (training/preference.py), the reference with the
  adapters off, the loss from training/preference_loss.py;
- TRL: DPOTrainer._compute_loss for loss_type sigmoid / ipo / hinge (the reference: peft's adapter
  disabled), CPOTrainer.get_batch_loss_metrics with loss_type="simpo", cpo_alpha=0 for SimPO,
  ORPOTrainer.get_batch_loss_metrics for ORPO.
Each row prints the largest absolute difference of the loss, the mean rewards (chosen, rejected),
the mean log-probs and the gradient of every LoRA weight (both sides backpropagate their loss).

ORPO's prompts are the BOS alone: TRL's ORPOTrainer counts the prompt tokens in its NLL term ("the
full prompt and response"), the ORPO paper and minillm only the response's; with a BOS-only prompt
the two are the same sum, so the row checks the formula (the last line shows how far apart the
NLLs are on the real prompts). Not a test: trl is never a dependency of minillm.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
from datasets import Dataset
from peft import PeftModel
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import WordLevel
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from minillm.config import ModelConfig
from minillm.data.preference import PreferencePair, TokenizedPair, collate_pairs
from minillm.finetune.adapters import apply_lora, lora_disabled, mark_only_lora_trainable
from minillm.finetune.peft_io import save_adapter
from minillm.formats.hf import save_hf
from minillm.model import Llama
from minillm.training.config import PreferenceConfig
from minillm.training.preference import pair_losses, response_logps

warnings.filterwarnings("ignore")
CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, vocab_size=101,
                  max_seq_len=64)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BOS, EOS, PAD = 1, 2, 0
# three pairs: (prompt, chosen, rejected) ids, every response ending with EOS
PAIRS = [([BOS, 5, 17, 33, 8], [40, 41, 42, EOS], [50, 51, EOS]),
         ([BOS, 9, 9, 71], [12, EOS], [13, 14, 15, 16, 17, 18, EOS]),
         ([BOS, 64, 3, 20, 21, 22, 23], [90, 91, 92, 93, 94, EOS], [95, 96, 97, 98, EOS])]


def build(tmp: Path):
    """minillm's Llama with a random LoRA adapter, and the same as transformers + peft."""
    torch.manual_seed(0)
    ours = Llama(CFG).float()
    save_hf(ours, tmp / "base")
    apply_lora(ours, TARGETS, r=4, alpha=8)
    mark_only_lora_trainable(ours)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    save_adapter(ours, tmp / "adapter", str(tmp / "base"))
    hf = LlamaForCausalLM.from_pretrained(tmp / "base", dtype=torch.float32,
                                          attn_implementation="eager")
    peer = PeftModel.from_pretrained(hf, tmp / "adapter", is_trainable=True)
    return ours, peer


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {f"t{i}": i for i in range(CFG.vocab_size)}
    tok = HFTokenizer(WordLevel(vocab, unk_token="t3"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", bos_token="t1",
                                   eos_token="t2", unk_token="t3")


def placeholder() -> Dataset:
    """A one-record text dataset: the trainers want one to start; the batch is built here."""
    return Dataset.from_list([dict(prompt="t5", chosen=" t6", rejected=" t7")])


def lora_grads(model, prefix_map) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        if p.grad is not None and "lora_" in name:
            out[prefix_map(name)] = p.grad.detach().clone()
    return out


def peft_to_ours(name: str) -> str:
    return name.removeprefix("base_model.model.model.").replace(".default", "")


def ours_side(model, pairs, loss: str, beta: float, **knobs) -> dict:
    """minillm: loss, the mean rewards and log-probs, the LoRA gradients."""
    model.zero_grad(set_to_none=True)
    rows = [TokenizedPair(p, c, r, False, PreferencePair("", "", "", "")) for p, c, r in pairs]
    x, y = collate_pairs(rows, PAD)  # (2B, T)
    logp = model(x, y, loss_fn=response_logps)[1]  # (2B,)
    with torch.no_grad(), lora_disabled(model):
        ref = model(x, y, loss_fn=response_logps)[1]
    n = (y != -100).sum(1).float()
    cfg = SimpleNamespace(preference=PreferenceConfig(loss=loss, beta=beta, **knobs))
    losses, cr, rr = pair_losses(cfg, logp, ref, n)
    total = losses.mean()
    if loss == "orpo":  # + the chosen tokens' NLL, a token mean
        total = total - logp[:len(rows)].sum() / n[:len(rows)].sum()
    total.backward()
    avg = logp / n if loss in ("simpo", "orpo") else logp
    return dict(loss=total.item(), chosen=cr.mean().item(), rejected=rr.mean().item(),
                logps_c=avg[:len(rows)].mean().item(), logps_r=avg[len(rows):].mean().item(),
                grads=lora_grads(model, lambda s: s))


def trl_dpo(peer, tok, pairs, loss_type: str, beta: float) -> dict:
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    peer.zero_grad(set_to_none=True)
    records = [dict(prompt_ids=p, chosen_ids=c, rejected_ids=r) for p, c, r in pairs]
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(out, loss_type=[loss_type], beta=beta, report_to=[], use_cpu=True,
                         per_device_train_batch_size=len(pairs))
        trainer = DPOTrainer(model=peer, args=args, train_dataset=placeholder(),
                             processing_class=tok)
        # TRL keeps a copy of an adapter it did not create as the reference ("ref"); without it
        # the reference is the base with the adapter disabled, as for a new adapter, and minillm
        trainer.model.delete_adapter("ref")
        inputs = DataCollatorForPreference(pad_token_id=PAD)(records)
        loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
        loss.backward()
        m = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return dict(loss=loss.item(), chosen=m["rewards/chosen"], rejected=m["rewards/rejected"],
                logps_c=m["logps/chosen"], logps_r=m["logps/rejected"],
                grads=lora_grads(peer, peft_to_ours))


def legacy_batch(pairs) -> dict:
    """The batch CPO / ORPO read: chosen_* and rejected_* ids, masks and labels (−100 on the
    prompt)."""
    batch = {}
    for side, k in (("chosen", 1), ("rejected", 2)):
        seqs = [p + s[k] for p, s in zip([q[0] for q in pairs], pairs, strict=True)]
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), PAD)
        mask = torch.zeros(len(seqs), T, dtype=torch.long)
        labels = torch.full((len(seqs), T), -100)
        for b, (s, (p, *_)) in enumerate(zip(seqs, pairs, strict=True)):
            ids[b, :len(s)], mask[b, :len(s)] = torch.tensor(s), 1
            labels[b, len(p):len(s)] = torch.tensor(s[len(p):])
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": mask,
                      f"{side}_labels": labels})
    return batch


def trl_legacy(peer, tok, pairs, which: str, beta: float, **knobs) -> dict:
    """CPOTrainer (SimPO) or ORPOTrainer: their get_batch_loss_metrics on the same batch."""
    if which == "simpo":
        from trl.experimental.cpo import CPOConfig as Config
        from trl.experimental.cpo import CPOTrainer as Trainer
        knobs = dict(loss_type="simpo", cpo_alpha=0.0, **knobs)
    else:
        from trl.experimental.orpo import ORPOConfig as Config
        from trl.experimental.orpo import ORPOTrainer as Trainer
    peer.zero_grad(set_to_none=True)
    with tempfile.TemporaryDirectory() as out:
        args = Config(out, beta=beta, report_to=[], use_cpu=True, max_length=64, **knobs)
        trainer = Trainer(model=peer, args=args, train_dataset=placeholder(),
                          processing_class=tok)
        loss, m = trainer.get_batch_loss_metrics(trainer.model, legacy_batch(pairs), "train")
        loss.backward()
    prefix = "" if which == "simpo" else ""
    return dict(loss=loss.item(), chosen=float(m[f"{prefix}rewards/chosen"]),
                rejected=float(m[f"{prefix}rewards/rejected"]),
                logps_c=float(m["logps/chosen"]), logps_r=float(m["logps/rejected"]),
                grads=lora_grads(peer, peft_to_ours))


def compare(a: dict, b: dict) -> list[float]:
    assert a["grads"].keys() == b["grads"].keys() and a["grads"], "LoRA weights differ"
    grad = max((a["grads"][k] - b["grads"][k]).abs().max().item() for k in a["grads"])
    return [abs(a[k] - b[k]) for k in ("loss", "chosen", "rejected", "logps_c", "logps_r")] + [grad]


def main():
    import trl

    tok = tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        ours, peer = build(Path(tmp))
        bos_only = [([BOS], c, r) for _, c, r in PAIRS]
        rows = [("dpo (sigmoid)", ours_side(ours, PAIRS, "dpo", 0.1),
                 trl_dpo(peer, tok, PAIRS, "sigmoid", 0.1)),
                ("ipo", ours_side(ours, PAIRS, "ipo", 0.1), trl_dpo(peer, tok, PAIRS, "ipo", 0.1)),
                ("hinge", ours_side(ours, PAIRS, "hinge", 0.1),
                 trl_dpo(peer, tok, PAIRS, "hinge", 0.1)),
                ("simpo (CPO)", ours_side(ours, PAIRS, "simpo", 2.0, simpo_gamma=0.5),
                 trl_legacy(peer, tok, PAIRS, "simpo", 2.0, simpo_gamma=0.5)),
                ("orpo", ours_side(ours, bos_only, "orpo", 0.1),
                 trl_legacy(peer, tok, bos_only, "orpo", 0.1))]
        prompts = (ours_side(ours, PAIRS, "orpo", 0.1)["loss"]
                   - trl_legacy(peer, tok, PAIRS, "orpo", 0.1)["loss"])
    print(f"minillm vs TRL {trl.__version__} ({len(PAIRS)} pairs, float32, LoRA r 4 on all "
          f"projections; max |difference|)\n")
    print("| loss | TRL loss | loss | rewards/chosen | rewards/rejected | logps/chosen | "
          "logps/rejected | LoRA grads |")
    print("|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for name, a, b in rows:
        diffs = compare(a, b)
        worst = max(worst, *diffs)
        print(f"| {name} | {b['loss']:.6f} | " + " | ".join(f"{d:.1e}" for d in diffs) + " |")
    print(f"\nworst difference {worst:.1e} ({'PASS' if worst < 1e-5 else 'FAIL'} at 1e-5); "
          f"ORPO with the real prompts: TRL's NLL counts the prompt tokens, the losses differ by "
          f"{prompts:+.4f}")


if __name__ == "__main__":
    main()
