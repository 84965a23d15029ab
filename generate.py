"""Generate text from a checkpoint, streaming it to stdout.

    python generate.py --checkpoint out/tiny --prompt "def fibonacci(n):"
    python generate.py --checkpoint path/to/open_llama_3b_v2 \\
        --prompt "Q: What is the capital of France?\nA:"
    python generate.py --checkpoint model.gguf --prompt "import os" --temperature 0
    # 8-bit weights as LLM.int8 (bitsandbytes' load_in_8bit), or --quantize nf4 for 4 bits
    python generate.py --checkpoint path/to/open_llama_7b --quantize int8 --prompt "Q: ...\nA:"
    # shapes through one forward
    python generate.py --checkpoint out/tiny --prompt "x = 1" --trace
    # a batch, one per line
    python generate.py --checkpoint out/tiny --prompts prompts.txt --temperature 0
    # speculative
    python generate.py --checkpoint out/big --draft out/tiny --speculate-k 4 --prompt "def "

The checkpoint may be an OpenLLaMA / HF directory, a minillm checkpoint, a Meta consolidated
directory or a GGUF file. Speeds (prefill and decode tokens/s) go to stderr at the end.
With --prompts, the prompts are decoded together as one batch and each is printed under a
`=== [i] ===` header as soon as it finishes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from minillm.finetune.int8_linear import int8_hook
from minillm.finetune.nf4_linear import nf4_hook
from minillm.formats.load import load_pretrained, load_tokenizer
from minillm.generate.batched import decode_batch_step
from minillm.generate.decode import GenerationStats, decode_one_token
from minillm.generate.fast_linear import use_row_split_linears
from minillm.generate.prompts import read_prompts, unescape
from minillm.generate.sampling import SamplingConfig
from minillm.generate.text import generate_text, generate_text_batch
from minillm.util.cli import ArgumentParser, run_cli
from minillm.util.device import DTYPES, pick_device, pick_dtype


def main(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint directory (HF/OpenLLaMA, minillm, Meta) or .gguf")
    p.add_argument("--prompt", default="",
                   help="text to continue; the two characters \\n and \\t mean newline, tab")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="sampling temperature; 0 = greedy")
    p.add_argument("--top-k", type=int, default=200, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling mass, e.g. 0.9 (default off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="CTRL-style penalty, e.g. 1.1 (1 = off)")
    p.add_argument("--seed", type=int, default=1337, help="random seed for sampling")
    p.add_argument("--stop", action="append", default=[],
                   help="stop string (repeatable); \\n and \\t mean newline, tab, as in --prompt")
    p.add_argument("--prompts", default=None,
                   help="file of prompts decoded as one batch: one per line, "
                        "or .jsonl with a \"prompt\" field")
    p.add_argument("--draft", default=None,
                   help="a small checkpoint sharing the tokenizer: "
                        "speculative decoding with it as the draft")
    p.add_argument("--speculate-k", "--speculate_k", type=int, default=5,
                   help="draft tokens proposed per target pass "
                        "(with --draft; gpt-fast spells it --speculate_k)")
    p.add_argument("--template", choices=["none", "alpaca", "vicuna"], default="none",
                   help="wrap the prompt in an instruction template "
                        "(alpaca: the prompt is the instruction)")
    p.add_argument("--input", default=None,
                   help="the optional Alpaca 'input' field, with --template alpaca")
    p.add_argument("--chat", action="store_true",
                   help="multi-turn chat (an empty line ends it) in the template the model was "
                        "fine-tuned with: --template, else the prompt_template.json recorded in "
                        "the checkpoint directory")
    p.add_argument("--device", default=None,
                   help="cuda, cpu, … (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="weights dtype (default: bfloat16 on a GPU that supports it, else float32)")
    p.add_argument("--quantize", choices=["none", "nf4", "int8"], default="none",
                   help="nf4: 4-bit NF4 projections; int8: LLM.int8 projections (8-bit weights "
                        "and activations, outlier columns in 16 bits)")
    p.add_argument("--int8-threshold", type=float, default=6.0,
                   help="with --quantize int8: input columns with |x| >= this run in 16 bits "
                        "(transformers' llm_int8_threshold; 0: every column in int8)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.model to use instead of the checkpoint's")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (static KV cache)")
    p.add_argument("--trace", action="store_true",
                   help="print every module's output shape and dtype through one forward pass, "
                        "then exit")
    args = p.parse_args(argv)

    device = pick_device(args.device or "auto")
    dtype = pick_dtype(args.dtype or "auto", device)
    checkpoint = Path(args.checkpoint)
    tokenizer = load_tokenizer(checkpoint, args.tokenizer)
    if not args.int8_threshold >= 0:
        p.error(f"--int8-threshold must be >= 0, got {args.int8_threshold}")
    hook = {"none": None,
            "nf4": lambda: nf4_hook(compute_dtype=dtype, device=device),
            "int8": lambda: int8_hook(args.int8_threshold, compute_dtype=dtype, device=device),
            }[args.quantize]
    model = load_pretrained(checkpoint, dtype=dtype, device=device,
                            linear_hook=hook() if hook else None)
    if args.prompts and args.draft:
        p.error("--prompts (batched) and --draft (speculative) do not combine: "
                "speculative decoding is batch 1")
    prompts = read_prompts(Path(args.prompts)) if args.prompts else [unescape(args.prompt)]
    if args.template != "none":
        from minillm.data.templates import format_prompt

        prompts = [format_prompt(args.template, text, args.input) for text in prompts]
    prompt = prompts[0]

    if args.trace:
        from minillm.generate.trace import trace_forward

        trace_forward(model, torch.tensor([tokenizer.encode(prompt)], device=device),
                      out=sys.stdout)
        return

    if device.type == "cpu":
        # batch-1 decode spreads each GEMV over the threads (fast_linear.py)
        use_row_split_linears(model)
    decode_fn = decode_batch_step if args.prompts else decode_one_token
    if args.compile:
        decode_fn = torch.compile(decode_fn, mode="reduce-overhead", fullgraph=True)
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k or None, top_p=args.top_p,
                         repetition_penalty=args.repetition_penalty,
                         stop=[unescape(s) for s in args.stop], seed=args.seed)
    stats = GenerationStats()
    if args.chat:
        from minillm.data.templates import CHAT_TEMPLATES, read_template_record
        from minillm.generate.chat import chat_loop

        template = args.template if args.template != "none" else read_template_record(checkpoint)
        if template not in CHAT_TEMPLATES:
            p.error(f"--chat needs a chat template ({', '.join(CHAT_TEMPLATES)}): "
                    f"{checkpoint} records {template or 'none'}; pass --template")
        chat_loop(model, tokenizer, template, cfg)
        return
    tag = f"[{device.type} {str(dtype).removeprefix('torch.')}]"
    if args.prompts:
        def show(row, text):
            sys.stdout.write(f"=== [{row}] ===\n{prompts[row]}{text}\n")
            sys.stdout.flush()

        generate_text_batch(model, tokenizer, prompts, cfg, on_done=show, stats=stats,
                            decode_fn=decode_fn)
        print(f"{tag} {len(prompts)} prompts as one batch | {stats.summary()}", file=sys.stderr)
        return
    draft = None
    if args.draft:
        draft = load_pretrained(Path(args.draft), dtype=dtype, device=device)
        if device.type == "cpu":
            use_row_split_linears(draft)
    sys.stdout.write(prompt)
    sys.stdout.flush()

    def stream(text):
        sys.stdout.write(text)
        sys.stdout.flush()

    generate_text(model, tokenizer, prompt, cfg, stream=stream, stats=stats, decode_fn=decode_fn,
                  draft=draft, speculate_k=args.speculate_k)
    sys.stdout.write("\n")
    print(f"{tag} {stats.summary()}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(run_cli(main))
