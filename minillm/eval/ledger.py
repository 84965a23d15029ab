"""The fidelity ledger: what each step from a fine-tuned adapter to a small GGUF costs,
as one table.

    python3 run.py ledger --base out/tiny --adapter out/lora/adapter --data test.jsonl \\
        --template alpaca

Chain (each row is the model one step further from the trained one):

    adapter   the base with the LoRA adapter applied, unmerged, float32 (a QLoRA adapter's base
              rounded through the NF4 settings it recorded): the model as trained, the reference
    merged    W + (α/r)·B·A folded into a dense model (ship/convert.py's load_merged), float32
    f16 … q4_0  the merged model exported as GGUF of that type and loaded back, dequantized (what
              llama.cpp holds in memory; its matmuls then round activations too, which this table
              does not see)

The GGUF rows are the chain f16 → q8_0 → q6_k → q5_k_m → q4_k_m → q4_0 (llama-quantize's mixes for
the K-quant names), each as soon as the writer knows the type (gguf_writer.OUTTYPES).

Then a side branch, the same adapter (unmerged) over the base held three ways, the choice of a
fine-tuning recipe:

    base bf16   the base in bfloat16 (LoRA's frozen base on a GPU; the matmuls run in bf16 too)
    base int8   its projections as LLM.int8 (Int8Linear, threshold 6: alpaca-lora's load_in_8bit;
                activations rounded to int8 too, outlier columns in float32)
    base nf4    its projections as NF4 (NF4Linear: QLoRA's base), float32 compute

(an adapter trained on one of them has KL 0 in that row).

Columns, over the response tokens of held-out examples (positions whose label is not -100):

    loss    mean cross-entropy (training/loss.py's held_out_loss)
    KL      mean KL(p_ref ‖ p_row) in nats/token: how far the row's next-token distribution moved
            from the reference's, 0 for the reference itself; unlike Δloss it cannot cancel out
            across tokens
    top-1   fraction of positions where the row's most likely token is the reference's
    size    bytes on disk / bits per weight (GGUF rows); bits per block-projection weight for the
            base rows
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from minillm.data.instruct import IGNORE, TokenizedExample, iter_batches
from minillm.model import Llama
from minillm.ship.convert import ExportConfig, export, load_merged
from minillm.ship.gguf_writer import OUTTYPES
from minillm.training.loss import held_out_loss
from minillm.util.cli import ArgumentParser, int_at_least, run_cli

LEDGER_CHAIN = ("f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")  # most bits first
BASES = ("bf16", "int8", "nf4")  # the base-row side branch, most bits first


def ledger_outtypes() -> list[str]:
    """The GGUF rows of the ledger: the types of LEDGER_CHAIN the writer knows
    (gguf_writer.OUTTYPES), so a type added to the writer joins the ledger without an edit here;
    --outtypes picks any others."""
    return [t for t in LEDGER_CHAIN if t in OUTTYPES]


@dataclass
class LedgerRow:
    stage: str
    loss: float
    kl: float  # nats/token against the reference
    top1: float
    size_bytes: int | None = None  # GGUF file size
    bits_per_weight: float | None = None


@torch.no_grad()
def kl_and_top1(reference: Llama, model: Llama, examples: list[TokenizedExample], pad_id: int,
                batch_size: int = 16) -> tuple[float, float]:
    """(mean KL(p_reference ‖ p_model), top-1 agreement)
    over the target positions of the examples."""
    kl = agree = 0.0
    n = 0
    for x, y in iter_batches(examples, batch_size, pad_id):
        mask = y != IGNORE  # (B, T)
        # float64: a KL near 0 stays ≥ 0 after rounding
        lp_ref = F.log_softmax(reference(x)[0][mask].double(), dim=-1)  # (N, V)
        lp = F.log_softmax(model(x)[0][mask].double(), dim=-1)  # (N, V)
        kl += float((lp_ref.exp() * (lp_ref - lp)).sum())
        agree += float((lp_ref.argmax(-1) == lp.argmax(-1)).sum())
        n += int(mask.sum())
    if n == 0:
        raise ValueError("fidelity ledger: no target tokens in the examples")
    return kl / n, agree / n


def ledger_row(stage: str, reference: Llama, model: Llama, examples: list[TokenizedExample],
               pad_id: int, path: Path | None = None, n_params: int = 0) -> LedgerRow:
    """One row: the model's held-out loss (training/loss.py), its KL and top-1 against the
    reference, and for a GGUF its size and bits per weight."""
    loss = held_out_loss(model, iter_batches(examples, 16, pad_id))["loss"]
    size = path.stat().st_size if path is not None else None
    bpw = 8 * size / n_params if path is not None else None
    return LedgerRow(stage, loss, *kl_and_top1(reference, model, examples, pad_id), size, bpw)


def base_row(kind: str, base, adapter, reference: Llama, examples: list[TokenizedExample],
             pad_id: int) -> LedgerRow:
    """The adapter, unmerged, over the base held as `kind` (BASES), against the reference."""
    from minillm.finetune.int8_linear import int8_hook
    from minillm.finetune.nf4_linear import nf4_hook
    from minillm.finetune.peft_io import load_adapter
    from minillm.formats.load import load_pretrained
    from minillm.training.flops import NF4_BITS_PER_PARAM, count_params, int8_block_bytes

    hook = {"bf16": None, "int8": int8_hook(compute_dtype=torch.float32),
            "nf4": nf4_hook(compute_dtype=torch.float32)}[kind]
    dtype = torch.bfloat16 if kind == "bf16" else torch.float32
    model = load_pretrained(base, dtype=dtype, linear_hook=hook)
    load_adapter(model, adapter)
    row = ledger_row(f"base {kind}", reference, model, examples, pad_id)
    block = count_params(model.config)["block_linear"]
    row.bits_per_weight = {"bf16": 16.0, "nf4": NF4_BITS_PER_PARAM,
                           "int8": 8 * int8_block_bytes(model.config) / block}[kind]
    return row


def fidelity_ledger(base: str | Path, adapter: str | Path, examples: list[TokenizedExample],
                    pad_id: int, out_dir: str | Path,
                    outtypes: list[str] | None = None, bases=BASES) -> list[LedgerRow]:
    """The ledger rows for one base + adapter: the chain, then one row per base in `bases`;
    GGUF files are written to out_dir/ledger-<type>.gguf."""
    from minillm.finetune.peft_io import load_adapter, quantized_base_hook, read_base_quantization
    from minillm.formats.load import load_pretrained

    out_dir = Path(out_dir)
    # an adapter trained on an NF4 or int8 base: the reference is that
    hook = quantized_base_hook(read_base_quantization(adapter), torch.float32)
    reference = load_pretrained(base, linear_hook=hook)
    load_adapter(reference, adapter)
    merged = load_merged(ExportConfig(checkpoint=str(base), out=str(out_dir / "unused"),
                                      adapter=str(adapter)))
    merged = merged.float().eval()
    n_params = sum(p.numel() for p in merged.parameters())
    rows = [ledger_row("adapter", reference, reference, examples, pad_id),
            ledger_row("merged", reference, merged, examples, pad_id)]
    for outtype in outtypes or ledger_outtypes():
        path = export(ExportConfig(checkpoint=str(base), adapter=str(adapter), outtype=outtype,
                                   out=str(out_dir / f"ledger-{outtype}.gguf")))
        rows.append(ledger_row(outtype, reference, load_pretrained(path), examples, pad_id, path,
                               n_params))
    rows += [base_row(kind, base, adapter, reference, examples, pad_id) for kind in bases]
    return rows


def format_ledger(rows: list[LedgerRow]) -> str:
    """A Markdown table: stage, held-out loss (and its change from the reference),
    KL, top-1, size."""
    ref = rows[0].loss
    out = ["| stage | held-out loss | Δ loss | KL vs adapter (nats/token) | top-1 agreement "
           "| GGUF size | bits/weight |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        size = f"{r.size_bytes / 1e6:.2f} MB" if r.size_bytes is not None else "–"
        bpw = f"{r.bits_per_weight:.2f}" if r.bits_per_weight is not None else "–"
        out.append(f"| {r.stage} | {r.loss:.4f} | {r.loss - ref:+.4f} | {r.kl:.2e} | {r.top1:.2%} "
                   f"| {size} | {bpw} |")
    return "\n".join(out)


def main(argv=None) -> list[LedgerRow]:
    from minillm.data.instruct import read_examples, tokenize_example
    from minillm.data.templates import read_template_record
    from minillm.formats.load import load_tokenizer

    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the base checkpoint the adapter was trained on")
    p.add_argument("--adapter", required=True, help="the PEFT-format LoRA adapter directory")
    p.add_argument("--data", required=True,
                   help="held-out instruction data (alpaca / sharegpt JSON or JSONL)")
    p.add_argument("--template", default=None,
                   help="prompt template of the fine-tuning (default: the adapter's "
                        "prompt_template.json, else the data's natural one)")
    p.add_argument("--max-examples", type=int_at_least(1), default=64,
                   help="held-out examples scored (default 64)")
    p.add_argument("--max-seq-len", type=int_at_least(2), default=256,
                   help="tokens per example at most (default 256)")
    p.add_argument("--out", default=None,
                   help="folder for the GGUF files (default: beside the adapter)")
    p.add_argument("--outtypes", nargs="+", default=None, choices=sorted(OUTTYPES),
                   help=f"GGUF rows (default: {' '.join(ledger_outtypes())})")
    p.add_argument("--bases", nargs="*", default=list(BASES), choices=BASES,
                   help="the adapter over the base held as bf16 / LLM.int8 / NF4, one row each "
                        f"(default: {' '.join(BASES)}; none: --bases with no value)")
    args = p.parse_args(argv)
    tokenizer = load_tokenizer(args.base)
    template = args.template or read_template_record(args.adapter)
    examples = [tokenize_example(ex, tokenizer, template, args.max_seq_len)
                for ex in read_examples(args.data)[: args.max_examples]]
    rows = fidelity_ledger(args.base, args.adapter, examples, tokenizer.pad_id,
                           args.out or Path(args.adapter).parent, args.outtypes, args.bases)
    print(f"fidelity ledger over {sum(len(e.ids) for e in examples):,d} tokens of "
          f"{len(examples)} held-out examples (loss and KL on response tokens)\n")
    print(format_ledger(rows))
    print(f"\nperplexity of the reference: {math.exp(rows[0].loss):.2f}")
    return rows


if __name__ == "__main__":
    sys.exit(run_cli(main))
