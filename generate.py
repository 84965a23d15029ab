"""Generate text from a checkpoint, streaming it to stdout.

    python generate.py --checkpoint out/tiny --prompt "def fibonacci(n):"
    python generate.py --checkpoint path/to/open_llama_3b_v2 --prompt "Q: What is the capital of France?\nA:"
    python generate.py --checkpoint model.gguf --prompt "import os" --temperature 0
    python generate.py --checkpoint out/tiny --prompt "x = 1" --trace      # shapes through one forward

The checkpoint may be an OpenLLaMA / HF directory, a minillm checkpoint, a Meta consolidated directory or a
GGUF file. Speeds (prefill and decode tokens/s) go to stderr at the end.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from minillm.checkpoint import load_pretrained, load_tokenizer
from minillm.cli import ArgumentParser, run_cli
from minillm.device import DTYPES, pick_device, pick_dtype
from minillm.generation import GenerationStats, SamplingConfig, decode_one_token, generate_text


def main(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (HF/OpenLLaMA, minillm, Meta) or .gguf")
    p.add_argument("--prompt", default="", help="text to continue; the two characters \\n and \\t mean newline, tab")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-k", type=int, default=200, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass, e.g. 0.9 (default off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL-style penalty, e.g. 1.1 (1 = off)")
    p.add_argument("--seed", type=int, default=1337, help="random seed for sampling")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--template", choices=["none", "alpaca", "vicuna"], default="none",
                   help="wrap the prompt in an instruction template (alpaca: the prompt is the instruction)")
    p.add_argument("--input", default=None, help="the optional Alpaca 'input' field, with --template alpaca")
    p.add_argument("--chat", action="store_true",
                   help="multi-turn chat (an empty line ends it) in the template the model was fine-tuned with: "
                        "--template, else the prompt_template.json recorded in the checkpoint directory")
    p.add_argument("--device", default=None, help="cuda, cpu, … (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="weights dtype (default: bfloat16 on a GPU that supports it, else float32)")
    p.add_argument("--quantize", choices=["none", "nf4"], default="none", help="nf4: 4-bit NF4 projections")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model to use instead of the checkpoint's")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (static KV cache)")
    p.add_argument("--trace", action="store_true",
                   help="print every module's output shape and dtype through one forward pass, then exit")
    args = p.parse_args(argv)

    device = pick_device(args.device or "auto")
    dtype = pick_dtype(args.dtype or "auto", device)
    checkpoint = Path(args.checkpoint)
    tokenizer = load_tokenizer(checkpoint, args.tokenizer)
    model = load_pretrained(checkpoint, dtype=dtype, device=device,
                            quantize=None if args.quantize == "none" else args.quantize)
    prompt = args.prompt.replace("\\n", "\n").replace("\\t", "\t")
    if args.template != "none":
        from minillm.templates import format_prompt

        prompt = format_prompt(args.template, prompt, args.input)

    if args.trace:
        from minillm.trace import trace_forward

        trace_forward(model, torch.tensor([tokenizer.encode(prompt)], device=device), out=sys.stdout)
        return

    decode_fn = decode_one_token
    if args.compile:
        decode_fn = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k or None, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                         stop=args.stop, seed=args.seed)
    stats = GenerationStats()
    if args.chat:
        from minillm.chat import chat_loop
        from minillm.templates import CHAT_TEMPLATES, read_template_record

        template = args.template if args.template != "none" else read_template_record(checkpoint)
        if template not in CHAT_TEMPLATES:
            p.error(f"--chat needs a chat template ({', '.join(CHAT_TEMPLATES)}): {checkpoint} records "
                    f"{template or 'none'}; pass --template")
        chat_loop(model, tokenizer, template, cfg)
        return
    sys.stdout.write(prompt)
    sys.stdout.flush()

    def stream(text):
        sys.stdout.write(text)
        sys.stdout.flush()

    generate_text(model, tokenizer, prompt, cfg, stream=stream, stats=stats, decode_fn=decode_fn)
    sys.stdout.write("\n")
    print(f"[{device.type} {str(dtype).removeprefix('torch.')}] {stats.summary()}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(run_cli(main))
