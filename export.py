"""Export a model: merge an adapter, then write GGUF for llama.cpp, an HF directory,
or Meta's layout.

    python export.py --checkpoint out/tiny --outtype q8_0 --out tiny-q8_0.gguf
    python export.py --checkpoint open_llama_3b_v2 --adapter out/lora/adapter --outtype q4_0 \\
        --out m.gguf
    python export.py --checkpoint open_llama_7b --adapter out/qlora/adapter --qlora --format hf \\
        --out merged/
    python export.py --checkpoint out/tiny --format meta --out consolidated/
    python export.py --checkpoint open_llama_3b_v2 --adapter out/lora/adapter --format gguf-lora \\
        --out lora.gguf

Then run the GGUF in llama.cpp (`llama-cli -m tiny-q8_0.gguf -p "def " -n 64`) or in minillm
(`python generate.py --checkpoint tiny-q8_0.gguf --prompt "def "`).
"""

import argparse
import sys

from minillm.ship.convert import ExportConfig, export
from minillm.util.cli import ArgumentParser, run_cli


def main(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint",
                   help="base model: HF/OpenLLaMA dir, minillm dir, Meta dir or .gguf")
    p.add_argument("--out", help="output .gguf file (gguf) or directory (hf, meta). An existing "
                   "path is replaced only when minillm wrote it as the same kind of output (a "
                   "GGUF minillm wrote; an hf / meta export holding its .minillm marker); "
                   "anything else there is refused, never deleted")
    p.add_argument("--format", choices=["gguf", "hf", "meta", "gguf-lora"], default="gguf",
                   help="output format; "
                        "gguf-lora: the --adapter alone, unmerged, for llama.cpp's --lora")
    p.add_argument("--outtype", default=None,
                   help="gguf: f32, f16 (default), bf16, q8_0, q4_0, or llama-quantize's mixes "
                        "q4_k_m, q5_k_m, q6_k, q4_k_s, q5_k_s, q4_k, q5_k, q4_1, q5_0, q5_1; "
                        "gguf-lora: f32 (default), f16; hf/meta: auto (as stored), f32, f16, bf16")
    p.add_argument("--adapter", default=None,
                   help="PEFT-format LoRA adapter directory to merge before writing")
    p.add_argument("--qlora", action="store_true",
                   help="the adapter was trained on an NF4 base: "
                        "merge into the NF4-dequantized weights")
    p.add_argument("--int8", action="store_true",
                   help="the adapter was trained on an LLM.int8 base (lora8, alpaca-lora): "
                        "merge into the int8-dequantized weights")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.model (default: the one beside the checkpoint)")
    p.add_argument("--name", default=None,
                   help="general.name written into the GGUF (default: output file stem)")
    p.add_argument("--template", default=None, choices=["none", "alpaca", "vicuna"],
                   help="chat template to ship "
                        "(default: the one recorded in the adapter / checkpoint directory)")
    args = p.parse_args(argv)
    if args.checkpoint is None or args.out is None:
        p.error("the following arguments are required: --checkpoint, --out")
    cfg = ExportConfig(checkpoint=args.checkpoint, out=args.out, format=args.format,
                       outtype=args.outtype, adapter=args.adapter, qlora=args.qlora, int8=args.int8,
                       tokenizer=args.tokenizer, name=args.name, template=args.template)
    path = export(cfg)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
