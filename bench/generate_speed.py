"""Benchmark: prefill and decode tokens/s at batch 1, next to the memory-bandwidth roofline.

    python bench/generate_speed.py --preset openllama-7b  # GPU: eager and compiled, bf16
    python bench/generate_speed.py --preset openllama-7b --quantize nf4 # NF4 weights (QLoRA's base)
    python bench/generate_speed.py --preset openllama-7b --peer  # + a transformers row (same run)
    python bench/generate_speed.py --preset tiny --device cpu  # smoke run

Decoding one token reads every weight once, so its speed limit is weight bytes / memory bandwidth
(the roofline); the copy bandwidth is measured here with a large device-to-device copy. "compiled"
wraps `decode_one_token` in torch.compile(mode="reduce-overhead") over the static KV cache — the
gpt-fast recipe — while "eager" is the readable default path. Weights are random (speed does not
depend on their values). `--peer` adds transformers' LlamaForCausalLM (its `generate`, eager,
default cache; with `--quantize nf4` bitsandbytes' NF4 layers) on the same shape, dtype and prompt:
see bench/peers.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/peers.py

from minillm.config import ModelConfig  # noqa: E402
from minillm.generate.decode import decode_one_token, prefill  # noqa: E402
from minillm.model import Llama  # noqa: E402
from minillm.util.device import pick_device  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device, nbytes=2 * 1024**3) -> float:
    if device.type != "cuda":
        nbytes = 256 * 1024**2
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    sync(device)
    return 2 * nbytes * 10 / (time.perf_counter() - t0)  # read + write


def weight_bytes(model) -> int:
    """Bytes read per decoded token: parameters plus buffers (NF4 codes and scales; RoPE tables are
    tiny)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


@torch.no_grad()
def measure(model, device, prompt_len, new_tokens, compiled):
    decode = (torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True) if compiled
              else decode_one_token)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), device=device)
    total = prompt_len + new_tokens
    results = []
    model.setup_caches(1, total)  # allocated once: the compiled step keeps seeing the same buffers
    # the first trial warms up (and compiles); stale cache slots are masked
    for _trial in range(3):
        sync(device)
        t0 = time.perf_counter()
        logits = prefill(model, prompt, torch.arange(prompt_len, device=device))
        sync(device)
        t_prefill = time.perf_counter() - t0
        tok = logits.argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        for pos in range(prompt_len, total - 1):
            tok = decode(model, tok, torch.tensor([pos], device=device)).argmax(-1, keepdim=True)
        sync(device)
        t_decode = time.perf_counter() - t0
        results.append((prompt_len / t_prefill, (new_tokens - 1) / t_decode))
    model.clear_caches()
    return results[-1]


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="openllama-7b", help="model shape (see minillm/config.py)")
    p.add_argument("--device", default="auto", help="auto (cuda if there is a GPU), cuda or cpu")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="weight dtype")
    p.add_argument("--quantize", default="none", choices=["none", "nf4"],
                   help="nf4: NF4 projections")
    p.add_argument("--prompt-len", type=int, default=512, help="prefill length")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens to decode")
    p.add_argument("--modes", default="eager,compiled", help="comma list of eager, compiled")
    p.add_argument("--peer", action="store_true",
                   help="also time transformers (+ bitsandbytes for nf4)")
    args = p.parse_args()
    device = pick_device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    cfg = ModelConfig.from_name(args.preset)
    torch.manual_seed(0)
    with torch.device(device):
        model = Llama(cfg).to(dtype).eval()
    if args.quantize == "nf4":
        from minillm.finetune.nf4_linear import quantize_model_

        quantize_model_(model, skip=("lm_head",), compute_dtype=dtype)
    wb = weight_bytes(model)
    bw = copy_bandwidth(device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{args.preset} {args.dtype} quantize={args.quantize} on {name}: "
          f"weights {wb / 1e9:.2f} GB, copy bandwidth {bw / 1e12:.2f} TB/s, "
          f"roofline {bw / wb:.1f} tok/s")
    print("| implementation | prefill tok/s | decode tok/s | decode / roofline |")
    print("|---|---|---|---|")
    for mode in args.modes.split(","):
        pf, dc = measure(model, device, args.prompt_len, args.new_tokens,
                         compiled=(mode == "compiled"))
        print(f"| minillm {mode} | {pf:,.0f} | {dc:.1f} | {dc / (bw / wb):.0%} |")
    if args.peer:
        import peers

        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        nf4 = args.quantize == "nf4"
        label = peers.versions("transformers", *(["bitsandbytes"] if nf4 else []))
        pf, dc = peers.hf_generate_speed(cfg, device, dtype, args.prompt_len, args.new_tokens,
                                         nf4=nf4)
        print(f"| {label} (eager) | {pf:,.0f} | {dc:.1f} | {dc / (bw / wb):.0%} |")


if __name__ == "__main__":
    main()
