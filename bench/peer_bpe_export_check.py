"""Peer check: minillm's re-exported byte-level BPE tokenizers load in llama.cpp and transformers
with the same ids as the source.

    python export.py --checkpoint SmolLM2-135M-Instruct.Q4_1.gguf --outtype q8_0 --out s.gguf
    python export.py --checkpoint SmolLM2-135M-Instruct.Q4_1.gguf --format hf --out s-hf
    /work/peers/venv/bin/python bench/peer_bpe_export_check.py --gguf s.gguf --hf s-hf

Not part of the test suite. For each text of tests/data/bpe/texts.json it compares with the
pinned llama.cpp ids (tests/data/bpe/smollm2_goldens.json): llama.cpp on the GGUF
(`tokenize(add_bos=False, special=True)`), and transformers' AutoTokenizer on the HF directory
(`encode(add_special_tokens=False)`, and with its BOS rule), and prints one line per check.
--tiny-gguf FILE adds llama.cpp on a GGUF written with tests/data/bpe/tiny_llama3's vocabulary,
against HF tokenizers' ids for that tokenizer.json (tests/data/bpe/tiny_goldens.json).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "bpe"


def report(name: str, got: list[list[int]], want: list[list[int]], texts: list[str]):
    bad = [i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b]
    line = f"{name}: {len(texts) - len(bad)}/{len(texts)} texts give the same ids"
    if bad:
        i = bad[0]
        line += f"; first difference {texts[i][:30]!r}: {got[i][:8]} vs {want[i][:8]}"
    print(line)
    return not bad


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", type=Path, help="a GGUF minillm exported from SmolLM2")
    ap.add_argument("--hf", type=Path, help="an HF directory minillm exported from SmolLM2")
    ap.add_argument("--tiny-gguf", type=Path, help="a GGUF with tiny_llama3's vocabulary")
    args = ap.parse_args()
    texts = json.loads((DATA / "texts.json").read_text())["texts"]
    want = json.loads((DATA / "smollm2_goldens.json").read_text())["llama_cpp"]
    ok = True
    if args.gguf:
        import llama_cpp
        llm = llama_cpp.Llama(model_path=str(args.gguf), vocab_only=True, verbose=False)
        got = [llm.tokenize(t.encode(), add_bos=False, special=True) for t in texts]
        ok &= report(f"llama.cpp {llama_cpp.__version__} on {args.gguf.name}", got, want, texts)
    if args.hf:
        import transformers
        tok = transformers.AutoTokenizer.from_pretrained(str(args.hf))
        got = [tok.encode(t, add_special_tokens=False) for t in texts]
        ok &= report(f"transformers {transformers.__version__} on {args.hf.name}", got, want,
                     texts)
        print(f"  encode('Hi') with special tokens: {tok.encode('Hi')} (SmolLM2 adds no BOS)")
    if args.tiny_gguf:
        import llama_cpp
        llm = llama_cpp.Llama(model_path=str(args.tiny_gguf), vocab_only=True, verbose=False)
        tiny = json.loads((DATA / "tiny_goldens.json").read_text())["llama3"]["plain"]
        got = [llm.tokenize(t.encode(), add_bos=False, special=True) for t in texts]
        ok &= report(f"llama.cpp on {args.tiny_gguf.name} (tiny_llama3)", got, tiny, texts)
    print("PEER CHECK:", "OK" if ok else "DIFFERENCES")


if __name__ == "__main__":
    main()
