"""Throwaway peer check: a LoRA adapter minillm wrote (PEFT layout: adapter_config.json +
adapter_model.safetensors) loads in peft over transformers' own SmolLM2-135M-Instruct and gives
minillm's logits.

    python3 run.py download smollm2-135m-instruct
    OMP_NUM_THREADS=1 PYTHONSAFEPATH=1 .venv/bin/python bench/peer_adapter_check.py dump \\
        --adapter /tmp/tr/lora/adapter --out /tmp/peer_adapter.pt          # minillm
    OMP_NUM_THREADS=1 TQDM_DISABLE=1 /work/peers/venv/bin/python bench/peer_adapter_check.py peer \\
        --adapter /tmp/tr/lora/adapter --dump /tmp/peer_adapter.pt         # transformers + peft

(The adapter: any minillm LoRA run on SmolLM2, e.g. `python -m minillm.tour --real --steps 2
--questions 3 --out /tmp/tr` writes /tmp/tr/lora/adapter.) The peer venv holds torch,
transformers, peft, gguf, sentencepiece, safetensors, numpy, tokenizers.

`dump` (minillm): a few real prompts, one of them a ChatML conversation rendered by the GGUF's own
chat template, tokenized by minillm's tokenizer; the logits at every position of the float32 model
loaded from the Q4_1 GGUF, without and then with the adapter (finetune/peft_io.load_adapter).
`peer` (transformers + peft): the same GGUF through `from_pretrained(dir, gguf_file=...)`
(dequantized to float32, eager attention), the adapter through `PeftModel.from_pretrained(base,
adapter_dir)`: the base model is loaded here, so peft never fetches base_model_name_or_path.
It checks that peft read r, lora_alpha and target_modules from the file and that every LoRA
weight peft holds equals the file's (the key sets equal: peft's silent key mismatch would show),
then prints a Markdown table of max |Δlogit| per prompt (base alone, base + adapter) and the
greedy next token of both sides. Exit status 1 on a mismatch. peft's one warning, that it found
no config.json for the hub id and assumes the vocabulary unchanged, is expected (HF_HUB_OFFLINE
is set). Not a test: transformers and peft are never dependencies of minillm.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

import torch

CACHE = Path(os.environ.get("MINILLM_CACHE") or Path.home() / ".cache" / "minillm")
GGUF = CACHE / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "In 1969, Neil Armstrong became the first person to",
]
CHAT = [{"role": "user", "content": "What is the boiling point of water at sea level, in °C?"}]
TOL = 1e-3  # float32 on both sides: the two dequantize the same Q4_1 blocks


def dump(adapter: Path, out: Path, gguf: Path):
    from minillm.data.chat_template import encode_with_specials, render_chat_template
    from minillm.finetune.peft_io import load_adapter
    from minillm.formats.load import load_pretrained, load_tokenizer

    tok = load_tokenizer(gguf)
    bos, eos = tok.id_to_piece(tok.bos_id), tok.id_to_piece(tok.eos_id)
    chat = render_chat_template(tok.chat_template, CHAT, True, bos, eos)
    prompts = [(t, tok.encode(t, bos=False, eos=False)) for t in TEXTS]
    prompts.append((chat, encode_with_specials(tok, chat)))
    model = load_pretrained(gguf).eval()

    def logits():
        with torch.no_grad():
            return [model(torch.tensor([ids]))[0][0].float() for _, ids in prompts]

    base = logits()
    loaded = load_adapter(model, adapter)
    with_adapter = logits()
    torch.save({"gguf": str(gguf), "adapter": str(adapter), "texts": [t for t, _ in prompts],
                "ids": [ids for _, ids in prompts], "base": base, "adapter_logits": with_adapter,
                "loaded": loaded, "torch": str(torch.__version__)}, out)
    print(f"minillm: {len(prompts)} prompts ({sum(len(i) for _, i in prompts)} tokens), "
          f"{len(loaded)} adapter modules loaded; wrote {out}")


def check_adapter(model, adapter: Path) -> list[str]:
    """What is wrong with peft's reading of the adapter: config, module count, weights."""
    from peft import get_peft_model_state_dict
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    pc = model.peft_config["default"]
    bad = []
    if pc.r != cfg["r"] or pc.lora_alpha != cfg["lora_alpha"]:
        bad.append(f"peft r={pc.r} alpha={pc.lora_alpha}, file r={cfg['r']} "
                   f"alpha={cfg['lora_alpha']}")
    if set(pc.target_modules) != set(cfg["target_modules"]):
        bad.append(f"peft target_modules {sorted(pc.target_modules)} != file's")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    n_layers = model.base_model.model.config.num_hidden_layers
    expected = n_layers * len(cfg["target_modules"])
    if len(layers) != expected:
        bad.append(f"{len(layers)} LoRA modules in peft, expected {expected}")
    scale = cfg["lora_alpha"] / (cfg["r"] ** 0.5 if cfg.get("use_rslora") else cfg["r"])
    off = [n for n, m in layers.items() if abs(m.scaling["default"] - scale) > 1e-9
           or m.r["default"] != cfg["r"]]
    if off:
        bad.append(f"{len(off)} modules with scaling / r not {scale} / {cfg['r']}: {off[0]}")
    theirs = get_peft_model_state_dict(model)
    ours = load_file(str(adapter / "adapter_model.safetensors"))
    if set(theirs) != set(ours):
        bad.append(f"key sets differ: {len(set(ours) - set(theirs))} only in the file, "
                   f"{len(set(theirs) - set(ours))} only in peft")
    diff = max(((theirs[k].float() - ours[k].float()).abs().max().item()
                for k in set(theirs) & set(ours)), default=float("inf"))
    if diff != 0:
        bad.append(f"peft's LoRA weights differ from the file's by {diff:.3e}")
    n_b = sum(k.endswith("lora_B.weight") for k in ours)
    nonzero_b = sum(ours[k].abs().max().item() > 0 for k in ours if k.endswith("lora_B.weight"))
    print(f"adapter: r={pc.r} lora_alpha={pc.lora_alpha} (scaling {scale:g}), "
          f"targets {sorted(pc.target_modules)}")
    print(f"adapter: {len(layers)} LoRA modules in peft ({n_layers} layers × "
          f"{len(cfg['target_modules'])}), {len(ours)} tensors in the file, {len(theirs)} in "
          f"peft, max |peft − file| {diff:.1e}; {nonzero_b}/{n_b} lora_B nonzero")
    return bad


def peer(adapter: Path, dump_path: Path):
    os.environ["HF_HUB_OFFLINE"] = "1"  # peft looks up base_model_name_or_path: never the hub
    import peft
    import transformers
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    d = torch.load(dump_path)
    gguf = Path(d["gguf"])
    print(f"transformers {transformers.__version__}, peft {peft.__version__}, torch "
          f"{torch.__version__} (minillm side: torch {d['torch']}); float32, eager attention\n")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    same_ids = [tok.encode(t, add_special_tokens=False) == ids
                for t, ids in zip(d["texts"][:-1], d["ids"][:-1], strict=True)]
    chat = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    chat_ids = tok.encode(chat, add_special_tokens=False)
    same_ids.append(chat == d["texts"][-1] and chat_ids == d["ids"][-1])
    print(f"tokenizer: transformers' GGUF tokenizer gives minillm's ids for "
          f"{sum(same_ids)}/{len(same_ids)} prompts (chat template rendered identically: "
          f"{chat == d['texts'][-1]})")

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32,
                                                 attn_implementation="eager").eval()

    def logits(m):
        with torch.no_grad():
            return [m(input_ids=torch.tensor([ids])).logits[0].float() for ids in d["ids"]]

    base = logits(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(model, adapter).eval()
    noisy = [str(w.message).splitlines()[0] for w in caught
             if any(s in str(w.message).lower() for s in ("missing", "unexpected", "mismatch"))]
    bad = check_adapter(model, adapter) + [f"peft warned: {m}" for m in noisy]
    with_adapter = logits(model)

    print("\n| prompt | T | max abs Δ base | max abs Δ base+LoRA | LoRA moves | greedy minillm | "
          "greedy peft |")
    print("|---|---|---|---|---|---|---|")
    worst_base = worst = 0.0
    agree = 0
    for i, text in enumerate(d["texts"]):
        db = (base[i] - d["base"][i]).abs().max().item()
        da = (with_adapter[i] - d["adapter_logits"][i]).abs().max().item()
        moved = (d["adapter_logits"][i] - d["base"][i]).abs().max().item()
        ours, theirs = int(d["adapter_logits"][i][-1].argmax()), int(with_adapter[i][-1].argmax())
        agree += ours == theirs
        worst_base, worst = max(worst_base, db), max(worst, da)
        label = "ChatML (template)" if i == len(d["texts"]) - 1 else text.split("\n")[0][:28]
        print(f"| {label} | {len(d['ids'][i])} | {db:.2e} | {da:.2e} | {moved:.2e} | "
              f"{ours} {tok.decode([ours])!r} | {theirs} {tok.decode([theirs])!r} |")
    print(f"\nworst max abs Δlogit: base {worst_base:.2e}, base + adapter {worst:.2e}; "
          f"greedy next token agrees on {agree}/{len(d['texts'])}")
    if worst > TOL or worst_base > TOL:
        bad.append(f"logits differ by more than {TOL}")
    if agree != len(d["texts"]):
        bad.append("greedy next tokens differ")
    for b in bad:
        print(f"FAIL: {b}")
    print("PEER_ADAPTER_OK" if not bad else "PEER_ADAPTER_MISMATCH")
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("side", choices=["dump", "peer"])
    ap.add_argument("--adapter", type=Path, required=True, help="a PEFT-layout adapter directory")
    ap.add_argument("--out", type=Path, default=Path("/tmp/peer_adapter.pt"), help="dump: file")
    ap.add_argument("--dump", type=Path, default=Path("/tmp/peer_adapter.pt"), help="peer: file")
    ap.add_argument("--gguf", type=Path, default=GGUF, help="dump: the base model")
    a = ap.parse_args()
    if a.side == "dump":
        dump(a.adapter, a.out, a.gguf)
        return 0
    return peer(a.adapter, a.dump)


if __name__ == "__main__":
    sys.exit(main())
