"""Generate text from a checkpoint, streaming it to stdout.

    python generate.py --checkpoint out/tiny --prompt "def fibonacci(n):"
    python generate.py --checkpoint path/to/open_llama_3b_v2 \\
        --prompt "Q: What is the capital of France?\nA:"
    python generate.py --checkpoint model.gguf --prompt "import os" --temperature 0
    # 8-bit weights as LLM.int8 (bitsandbytes' load_in_8bit), or --quantize nf4 for 4 bits
    python generate.py --checkpoint path/to/open_llama_7b --quantize int8 --prompt "Q: ...\nA:"
    # shapes through one forward
    python generate.py --checkpoint out/tiny --prompt "x = 1" --trace
    # a file of prompts, one per line, decoded 8 at a time
    python generate.py --checkpoint out/tiny --prompts prompts.txt --temperature 0
    # speculative
    python generate.py --checkpoint out/big --draft out/tiny --speculate-k 4 --prompt "def "

The checkpoint may be an OpenLLaMA / HF directory, a minillm checkpoint, a Meta consolidated
directory or a GGUF file. Speeds (prefill and decode tokens/s) go to stderr at the end.
With --prompts, the prompts are decoded together in batches of --batch-size, and each is printed
under a `=== [i] ===` header as soon as it finishes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from minillm.data.chat_template import model_template
from minillm.data.templates import (
    CHAT_TEMPLATES,
    TEMPLATES,
    format_prompt,
    read_template_record,
)
from minillm.finetune.int8_linear import int8_hook
from minillm.finetune.nf4_linear import nf4_hook
from minillm.formats.known_models import resolve_checkpoint
from minillm.formats.load import load_pretrained, load_tokenizer
from minillm.generate.batched import decode_batch_step
from minillm.generate.chat import chat_loop
from minillm.generate.decode import GenerationStats, decode_one_token
from minillm.generate.fast_linear import use_row_split_linears
from minillm.generate.prompts import read_prompts, unescape
from minillm.generate.sampling import SamplingConfig
from minillm.generate.text import generate_text, generate_text_batch
from minillm.generate.trace import trace_forward
from minillm.util.cli import ArgumentParser, finite_float, int_at_least, run_cli
from minillm.util.device import DTYPES, pick_device, pick_dtype
from minillm.util.fileio import check_unicode


def parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint directory (HF/OpenLLaMA, minillm, Meta), .gguf, or a known "
                        "model's name (run.py download --list), fetched on first use")
    p.add_argument("--prompt", default="",
                   help="text to continue; the two characters \\n and \\t mean newline, tab")
    p.add_argument("--max-new-tokens", type=int_at_least(0), default=200,
                   help="tokens to generate at most")
    p.add_argument("--temperature", type=finite_float, default=0.8,
                   help="sampling temperature; 0 = greedy")
    p.add_argument("--top-k", type=int_at_least(0), default=200,
                   help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=finite_float, default=None,
                   help="nucleus sampling mass, e.g. 0.9 (default off)")
    p.add_argument("--repetition-penalty", type=finite_float, default=1.0,
                   help="CTRL-style penalty, e.g. 1.1 (1 = off)")
    p.add_argument("--seed", type=int, default=1337, help="random seed for sampling")
    p.add_argument("--stop", action="append", default=[],
                   help="stop string (repeatable); \\n and \\t mean newline, tab, as in --prompt")
    p.add_argument("--prompts", default=None,
                   help="file of prompts, decoded --batch-size at a time: one per line, "
                        "or .jsonl with a \"prompt\" field")
    p.add_argument("--batch-size", type=int_at_least(1), default=8,
                   help="with --prompts: prompts decoded together (default 8)")
    p.add_argument("--draft", default=None,
                   help="a small checkpoint sharing the tokenizer: "
                        "speculative decoding with it as the draft")
    p.add_argument("--speculate-k", "--speculate_k", type=int_at_least(1), default=5,
                   help="draft tokens proposed per target pass "
                        "(with --draft; gpt-fast spells it --speculate_k)")
    p.add_argument("--template", choices=list(TEMPLATES), default="none",
                   help="wrap the prompt in an instruction template "
                        "(alpaca: the prompt is the instruction)")
    p.add_argument("--input", default=None,
                   help="the optional Alpaca 'input' field, with --template alpaca")
    p.add_argument("--chat", action="store_true",
                   help="multi-turn chat (an empty line ends it) in the template the model was "
                        "fine-tuned with: --template, else the prompt_template.json recorded in "
                        "the checkpoint directory, else the model's own chat template (GGUF, "
                        "tokenizer_config.json); when the context fills, the oldest turns go")
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
    return p


def write(text: str):
    sys.stdout.write(text)
    sys.stdout.flush()


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    if args.prompts and args.draft:
        p.error("--prompts (batched) and --draft (speculative) do not combine: "
                "speculative decoding is batch 1")
    if not args.int8_threshold >= 0:  # NaN too
        p.error(f"--int8-threshold must be >= 0, found {args.int8_threshold}")
    # user text: a lone surrogate (undecodable bytes on the command line) is refused, named
    prompts = (read_prompts(Path(args.prompts)) if args.prompts
               else [check_unicode(unescape(args.prompt), "--prompt")])
    stop = [check_unicode(unescape(s), "--stop") for s in args.stop]
    if args.template != "none":
        prompts = [format_prompt(args.template, text, args.input) for text in prompts]
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k or None, top_p=args.top_p,
                         repetition_penalty=args.repetition_penalty, stop=stop, seed=args.seed)

    device = pick_device(args.device or "auto")
    dtype = pick_dtype(args.dtype or "auto", device)
    checkpoint = resolve_checkpoint(args.checkpoint)  # a path, or a known model's name
    tokenizer = load_tokenizer(checkpoint, args.tokenizer)
    hook = {"none": lambda: None,
            "nf4": lambda: nf4_hook(compute_dtype=dtype, device=device),
            "int8": lambda: int8_hook(args.int8_threshold, compute_dtype=dtype, device=device),
            }[args.quantize]
    model = load_pretrained(checkpoint, dtype=dtype, device=device, linear_hook=hook())
    if args.trace:
        trace_forward(model, torch.tensor([tokenizer.encode(prompts[0])], device=device),
                      out=sys.stdout)
        return
    if device.type == "cpu":
        # batch-1 decode spreads each GEMV over the threads (fast_linear.py)
        use_row_split_linears(model)
    decode_fn = decode_batch_step if args.prompts else decode_one_token
    if args.compile:
        decode_fn = torch.compile(decode_fn, mode="reduce-overhead", fullgraph=True)
    stats = GenerationStats()
    tag = f"[{device.type} {str(dtype).removeprefix('torch.')}]"
    if args.chat:
        # --template, else what a fine-tune recorded, else the model's own (SmolLM2's ChatML)
        template = (args.template if args.template != "none"
                    else read_template_record(checkpoint if checkpoint.is_dir() else None)
                    or model_template(checkpoint))
        if template is None or (isinstance(template, str) and template not in CHAT_TEMPLATES):
            p.error(f"--chat needs a chat template ({', '.join(CHAT_TEMPLATES)}): "
                    f"{checkpoint} records none and ships none; pass --template")
        chat_loop(model, tokenizer, template, cfg)
    elif args.prompts:
        for start in range(0, len(prompts), args.batch_size):  # bounded batches, in file order
            batch = prompts[start:start + args.batch_size]

            def show(row, text, start=start, batch=batch):
                write(f"=== [{start + row}] ===\n{batch[row]}{text}\n")

            generate_text_batch(model, tokenizer, batch, cfg, on_done=show, stats=stats,
                                decode_fn=decode_fn)
            print(f"{tag} prompts {start}..{start + len(batch) - 1} of {len(prompts)} as one "
                  f"batch | {stats.summary()}", file=sys.stderr)
    else:
        draft = None
        if args.draft:
            draft = load_pretrained(resolve_checkpoint(args.draft), dtype=dtype, device=device)
            if device.type == "cpu":
                use_row_split_linears(draft)
        write(prompts[0])
        generate_text(model, tokenizer, prompts[0], cfg, stream=write, stats=stats,
                      decode_fn=decode_fn, draft=draft, speculate_k=args.speculate_k)
        write("\n")
        print(f"{tag} {stats.summary()}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(run_cli(main))
