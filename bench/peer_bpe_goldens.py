"""Peer goldens for the byte-level BPE tokenizer (minillm/tokenizer/bpe.py), computed once in the
throwaway peer venv and pinned in tests/data/bpe/ with the versions that made them.

    /work/peers/venv/bin/python bench/peer_bpe_goldens.py [--gguf SmolLM2-135M-Instruct.Q4_1.gguf]

Not part of the test suite (llama-cpp-python, transformers and tokenizers are never minillm
dependencies). It writes:
1. tests/data/bpe/texts.json: a few hundred texts (slices of this Python's standard-library
   source, and hand-written unicode: CJK, Arabic, Hindi, emoji and ZWJ sequences, combining
   marks, numbers in several scripts, runs of spaces / tabs / newlines, odd whitespace, special
   tokens inline). The texts are stored, so the tests do not depend on the running Python.
2. tests/data/bpe/smollm2_goldens.json: SmolLM2's ids for each text from llama.cpp
   (`Llama(vocab_only=True).tokenize(b, add_bos=False, special=True)`, the authority for a GGUF)
   and from transformers (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`, which ignores
   tokenizer.ggml.pre: kept to show where the two differ).
3. tests/data/bpe/tiny_llama3/ and tiny_gpt2/: two small tokenizer.json files trained here with
   HF `tokenizers` (Llama 3's layout: Split(regex) + ByteLevel, ignore_merges, a BOS from
   TemplateProcessing; GPT-2's: NFC, Digits, ByteLevel(add_prefix_space), added tokens with
   lstrip / rstrip / single_word), and tests/data/bpe/tiny_goldens.json with HF's ids for them.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "data" / "bpe"
GGUF = Path.home() / ".cache/minillm/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
STDLIB_FILES = ["json/encoder.py", "textwrap.py", "argparse.py", "dataclasses.py", "heapq.py",
                "string.py", "fractions.py", "statistics.py", "difflib.py", "csv.py",
                "email/utils.py", "html/entities.py", "locale.py"]

HAND = [
    "", " ", "  ", "   ", "\n", "\n\n", "\t", " \t\n", "\r\n", "a", "Hello world", "Hello, world!",
    "The capital of France is", "\n    76", "    return x", "def f(x):\n    return x + 1\n",
    "a  \n\n  b", "x   ", "   x", "\n\n\n   \n", "I'm here. You're there. It's DON'T 'S 'LL 'Ve",
    "he'd've", "l'amour", "1234567890", "3.14159", "1,000,000.00", "٣٤٥ ١٢٣", "１２３４５",
    "²³¹ ½ ⅓ Ⅻ ⑳", "0x1F 0b1010 1e-10", "2024-12-02T10:05:00Z", "   123   456   ",
    "你好，世界！这是一个测试。", "日本語のテキストとカタカナ、ひらがな。", "한국어 텍스트입니다.",
    "مرحبا بالعالم، هذا اختبار.", "שלום עולם", "Привет, мир! Ёжик.", "Γειά σου Κόσμε",
    "नमस्ते दुनिया", "สวัสดีชาวโลก", "Tiếng Việt có dấu", "Ελληνικά και English mixed",
    "😀😃😄 👍🏽 👨‍👩‍👧‍👦 🇫🇷🇯🇵 ❤️‍🔥", "e\u0301 a\u0308 n\u0303 \u0915\u094d\u0937",
    "Z\u0351\u036b\u0343\u036a\u0302\u036b\u033d\u034f\u0334\u0319algo",
    "non\u00a0breaking\u3000ideographic\u2028line\u2029para", "nel\x85next \x1c\x1d\x1e\x1f sep",
    "zero\u200bwidth\u200djoiner\ufeffbom", "private \ue000\uf8ff use", "ſtraße ﬁne Kelvin K",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>", "text<|endoftext|>more", "<|im_start", "im_end|>", "<|im_start|><|im_end|>",
    " <|im_start|> spaced <|im_end|> ", "<repo_name>minillm<file_sep>tok.py",
    "<|begin_of_text|>Hello<|eot_id|>", "<mask> <mask>x", "a<tool>b <tool> c", "lonely <tool>",
    "tabs\tand\tmore\t\ttabs", "trailing spaces   \n  next", "mixed \r\n\r\n windows",
    "#!/usr/bin/env python3\n# -*- coding: utf-8 -*-\n", "x = [1, 2, 3]  # comment",
    "if (a && b) || !c { return; }", "$ echo \"$HOME\" | grep -v '^#'", "emails: a@b.co, c+d@e.org",
    "URL https://example.com/path?q=1&r=2#frag", "~!@#$%^&*()_+{}|:\"<>?`-=[]\\;',./",
    "CamelCaseWord snake_case_word kebab-case-word", "ALLCAPS lowercase MiXeD",
    "a" * 50, " " * 40 + "x", "\n" * 12, "ab" * 30, "999999999999999999999",
]


def stdlib_slices(n: int, seed: int = 1337) -> list[str]:
    """n slices (10 to 400 characters) of fixed standard-library files at seeded offsets."""
    rng = random.Random(seed)
    lib = Path(sysconfig.get_paths()["stdlib"])
    sources = [(lib / f).read_text(encoding="utf-8") for f in STDLIB_FILES]
    out = []
    for _ in range(n):
        src = rng.choice(sources)
        length = rng.choice([10, 30, 80, 200, 400])
        start = rng.randrange(0, max(1, len(src) - length))
        out.append(src[start:start + length])
    return out


def random_unicode(n: int, seed: int = 7) -> list[str]:
    """n short strings drawn from a mix of scripts, digits, punctuation and whitespace."""
    rng = random.Random(seed)
    pools = ["abcXYZ", "0123456789", " \t\n", ".,;:!?'\"()-", "éüñçß", "你好世界中文",
             "مرحبا", "привет", "😀👍🏽🇫🇷", "\u0301\u0308", "\u00a0\u3000", "١٢٣", "ｱｲｳ"]
    out = []
    for _ in range(n):
        k = rng.randint(1, 24)
        out.append("".join(rng.choice(rng.choice(pools)) for _ in range(k)))
    return out


def all_texts() -> list[str]:
    return HAND + stdlib_slices(200) + random_unicode(80)


def smollm2_goldens(gguf: Path, texts: list[str]) -> dict:
    import llama_cpp
    import transformers

    llm = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    cpp = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=True) for t in texts]
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    hf = [hf_tok.encode(t, add_special_tokens=False) for t in texts]
    cpp_decoded = [llm.detokenize(ids, special=True).decode("utf-8", errors="replace")
                   for ids in cpp[:len(HAND)]]
    return {"versions": {"llama-cpp-python": llama_cpp.__version__,
                         "transformers": transformers.__version__},
            "file": gguf.name, "llama_cpp": cpp,
            # only where transformers differs from llama.cpp: {text index: ids}
            "transformers_differs": {i: b for i, (a, b) in enumerate(zip(cpp, hf, strict=True))
                                     if a != b},
            "llama_cpp_decoded_hand": cpp_decoded}


def train_tiny(kind: str, corpus: list[str]):
    """A small byte-level BPE tokenizer.json in Llama 3's or GPT-2's layout."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        processors,
        trainers,
    )
    from tokenizers import pre_tokenizers as pt

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    if kind == "llama3":
        tok = Tokenizer(models.BPE(ignore_merges=True))
        tok.pre_tokenizer = pt.Sequence([
            pt.Split(Regex(LLAMA3_REGEX), behavior="isolated", invert=False),
            pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok = Tokenizer(models.BPE())
        tok.normalizer = normalizers.Sequence([normalizers.NFC()])
        tok.pre_tokenizer = pt.Sequence([pt.Digits(individual_digits=True),
                                         pt.ByteLevel(add_prefix_space=True, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pt.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens([AddedToken("<mask>", lstrip=True, rstrip=False, special=True)])
    tok.add_tokens([AddedToken("<tool>", single_word=(kind == "gpt2"), rstrip=True,
                               normalized=False)])
    bos = tok.token_to_id("<|begin_of_text|>")
    if kind == "llama3":
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
            special_tokens=[("<|begin_of_text|>", bos)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def tiny_goldens(texts: list[str]) -> dict:
    import tokenizers

    corpus = stdlib_slices(300, seed=99)  # the training text: disjoint seeds
    out = {"versions": {"tokenizers": tokenizers.__version__}}
    for kind in ("llama3", "gpt2"):
        tok = train_tiny(kind, corpus)
        d = OUT / f"tiny_{kind}"
        d.mkdir(parents=True, exist_ok=True)
        tok.save(str(d / "tokenizer.json"))
        config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
                  "add_bos_token": kind == "llama3", "tokenizer_class": "PreTrainedTokenizerFast"}
        (d / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
        hand = texts[:len(HAND)]
        out[kind] = {"plain": [tok.encode(t, add_special_tokens=False).ids for t in texts],
                     "with_special_hand": [tok.encode(t).ids for t in hand],
                     "decoded_hand": [tok.decode(tok.encode(t).ids, skip_special_tokens=False)
                                      for t in hand]}
    return out


def compact(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", type=Path, default=GGUF, help="SmolLM2-135M-Instruct.Q4_1.gguf")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    texts = all_texts()
    meta = {"python": sys.version.split()[0], "n": len(texts), "texts": texts}
    (OUT / "texts.json").write_text(json.dumps(meta, ensure_ascii=False, indent=0) + "\n")
    g = smollm2_goldens(args.gguf, texts)
    (OUT / "smollm2_goldens.json").write_text(compact(g))
    differ = len(g["transformers_differs"])
    print(f"{len(texts)} texts; llama.cpp and transformers differ on {differ}")
    t = tiny_goldens(texts)
    (OUT / "tiny_goldens.json").write_text(compact(t))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory():
        main()
