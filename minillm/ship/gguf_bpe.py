"""A byte-level BPE vocabulary as the GGUF keys of llama.cpp's "gpt2" tokenizer (docs chapter 8).

    tokenizer.ggml.model        "gpt2"
    tokenizer.ggml.pre          the pre-tokenizer's name in llama.cpp's table (pretokenize.py)
    tokenizer.ggml.tokens       the byte-level symbol strings ("Ġthe"), id order
    tokenizer.ggml.token_type   int32: NORMAL 1, CONTROL 3 (special tokens), USER_DEFINED 4
    tokenizer.ggml.merges       "left right" strings, rank order (there are no scores)
    tokenizer.ggml.{bos,eos,unknown,padding}_token_id, add_bos_token, add_eos_token

What llama.cpp needs to tokenize identically, each refused with one line when it cannot be met:
- a `pre` name llama.cpp knows whose regexes are the tokenizer's own: a GGUF source keeps its
  name; a tokenizer.json maps to one only for the pre-tokenizers pretokenize.KNOWN_JSON lists;
- every token once (llama.cpp asserts on a duplicate);
- merge symbols without a space: llama.cpp cuts "a b" at the first space after the first
  character, so a left symbol holding a space would be read back wrong.
"""

from __future__ import annotations

import numpy as np

from minillm.formats.gguf_layout import ARRAY, BOOL, INT32, STRING, UINT32
from minillm.tokenizer.bpe import BPETokenizer
from minillm.tokenizer.pretokenize import gguf_pre_name


def bpe_tokenizer_metadata(tok: BPETokenizer) -> list[tuple]:
    """(key, value type, value[, element type]) for llama.cpp's gpt2 tokenizer."""
    where = str(tok.path or "tokenizer")
    pre = tok.pre.gguf_pre or gguf_pre_name(tok.pre.patterns, tok.ignore_merges)
    if pre is None:
        raise ValueError(f"{where}: this pre-tokenizer has no llama.cpp tokenizer.ggml.pre name "
                         f"(minillm maps Llama 3's, Qwen2's, SmolLM2's and GPT-2's), so llama.cpp "
                         f"would tokenize differently; export it with --format hf instead")
    seen: dict[str, int] = {}
    for i, t in enumerate(tok.vocab):
        if seen.setdefault(t, i) != i:
            raise ValueError(f"{where}: token {t!r} appears twice (ids {seen[t]} and {i}); "
                             f"llama.cpp refuses such a vocabulary")
    for r, (a, _) in enumerate(tok.merges):
        if " " in a[1:]:
            raise ValueError(f"{where}: merge {r} has the symbol {a!r} with a space inside, "
                             f"which llama.cpp's 'a b' merges cannot spell")
    kvs = [
        ("tokenizer.ggml.model", STRING, "gpt2"),
        ("tokenizer.ggml.pre", STRING, pre),
        ("tokenizer.ggml.tokens", ARRAY, list(tok.vocab), STRING),
        ("tokenizer.ggml.token_type", ARRAY, np.asarray(tok.token_types, dtype=np.int32), INT32),
        ("tokenizer.ggml.merges", ARRAY, [f"{a} {b}" for a, b in tok.merges], STRING),
    ]
    for name, tid in (("bos", tok._bos), ("eos", tok._eos), ("unknown", tok._unk),
                      ("padding", tok._pad)):
        if tid is not None:
            kvs.append((f"tokenizer.ggml.{name}_token_id", UINT32, tid))
    kvs += [("tokenizer.ggml.add_bos_token", BOOL, tok.add_bos),
            ("tokenizer.ggml.add_eos_token", BOOL, tok.add_eos)]
    return kvs
