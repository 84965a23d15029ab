"""Tokenizer speed: minillm's byte-level BPE (pure Python) beside HF `tokenizers` (Rust) on the same
text, in tokens/s; also minillm's SentencePiece wrapper for scale.

    .venv/bin/python bench/tokenize_speed.py [--mb 1] [--gguf SmolLM2-135M-Instruct.Q4_1.gguf]
    .venv/bin/python bench/tokenize_speed.py --peer    # + the HF tokenizers rows

The text is the first --mb MB of this Python's standard-library source (*.py files in sorted
order), encoded one file at a time as the pretraining pipeline does (data/pretrain.py). Rows:
- minillm BPE on tests/data/bpe/tiny_llama3/tokenizer.json (a 705-token Llama 3 layout), cold
  (an empty piece cache) and warm (a second pass: every pre-token is a cache hit);
- minillm BPE on SmolLM2's GGUF (49152 tokens), when it is present (tests/real_model.py finds it);
- with --peer: HF tokenizers on the same tokenizer.json files (for SmolLM2 the one minillm writes
  from the GGUF, whose ids are llama.cpp's), `encode_batch` off (one thread, like minillm);
- minillm's SentencePiece on a 4096-piece model trained here, the pretraining default.
Every row checks its ids against the first row of its tokenizer (same ids, or it says so).
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from real_model import smollm2_path  # noqa: E402

from minillm.formats.load import load_tokenizer  # noqa: E402
from minillm.tokenizer.bpe_files import from_tokenizer_json, save_tokenizer_json  # noqa: E402
from minillm.tokenizer.sentencepiece import train_tokenizer  # noqa: E402

TINY = ROOT / "tests" / "data" / "bpe" / "tiny_llama3"


def stdlib_text(mb: float) -> list[str]:
    files, total = [], 0
    for p in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if "test" in p.parts or total >= mb * 1e6:
            continue
        try:
            t = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        files.append(t)
        total += len(t.encode())
    return files


def timed(encode, docs: list[str]) -> tuple[float, list[list[int]]]:
    t = time.perf_counter()
    ids = [encode(d) for d in docs]
    return time.perf_counter() - t, ids


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=1.0, help="MB of stdlib source to encode")
    ap.add_argument("--gguf", type=Path, default=None, help="SmolLM2's GGUF (default: the cache)")
    ap.add_argument("--peer", action="store_true", help="add HF tokenizers rows")
    args = ap.parse_args()
    docs = stdlib_text(args.mb)
    n_bytes = sum(len(d.encode()) for d in docs)
    rows = []

    def row(name, encode, ref=None):
        sec, ids = timed(encode, docs)
        n = sum(map(len, ids))
        same = "" if ref is None else (" (same ids)" if ids == ref else " (IDS DIFFER)")
        rows.append(f"| {name}{same} | {n:,d} | {sec:.2f} | {n / sec:,.0f} | "
                    f"{n_bytes / sec / 1e6:.2f} |")
        return ids

    with tempfile.TemporaryDirectory() as tmp:
        sources = [("tiny Llama 3 tokenizer.json", from_tokenizer_json(TINY), TINY)]
        gguf = args.gguf or smollm2_path()
        if gguf is not None:
            smol = load_tokenizer(gguf)
            save_tokenizer_json(smol, tmp)
            sources.append(("SmolLM2 GGUF", smol, Path(tmp)))
        for name, tok, json_dir in sources:
            ref = row(f"minillm BPE, {name}, cold cache", lambda d, t=tok: t.encode(d, bos=False))
            row(f"minillm BPE, {name}, warm cache", lambda d, t=tok: t.encode(d, bos=False), ref)
            if args.peer:
                import tokenizers
                hf = tokenizers.Tokenizer.from_file(str(json_dir / "tokenizer.json"))
                row(f"HF tokenizers {tokenizers.__version__}, {name}",
                    lambda d, h=hf: h.encode(d, add_special_tokens=False).ids, ref)
        sp = train_tokenizer(docs[:40], Path(tmp) / "sp.model", 4096)
        row("minillm SentencePiece (4096 pieces, the C++ library)", lambda d: sp.encode(d))
    print(f"{len(docs)} stdlib files, {n_bytes / 1e6:.2f} MB, one thread\n")
    print("| tokenizer | tokens | s | tokens/s | MB/s |\n|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
