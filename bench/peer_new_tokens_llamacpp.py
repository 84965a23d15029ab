"""Throwaway peer check: a vocabulary with added pieces (Tokenizer.add_pieces, USER_DEFINED),
exported to GGUF, tokenized by llama.cpp (llama-cpp-python) the way minillm tokenizes it, and the
same logits.

    # needs torch, sentencepiece, llama_cpp
    /path/to/peer-venv/bin/python bench/peer_new_tokens_llamacpp.py

A tiny SentencePiece model is trained on standard-library text, "<|im_start|>" and "<|im_end|>" are
added, a random tiny Llama is grown to the new vocabulary (resize_vocab) and written as f32 GGUF.
Each text is tokenized by minillm and by llama.cpp with special=True (parse_special: how llama.cpp
tokenizes a prompt rendered from a chat template), which must give the same ids; then the logits of
the GGUF in llama.cpp are compared with minillm's. special=False is printed for information:
llama.cpp then splits out USER_DEFINED pieces too, except those it promotes to CONTROL by name (it
makes "<|im_end|>" an end-of-generation token and logs "control-looking token … its type will be
overridden"), which plain-text tokenization spells out character by character. Not a test: llama.cpp
is never a dependency of minillm.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from llama_cpp import Llama as LlamaCpp  # noqa: E402
from tiny import tiny_tokenizer  # noqa: E402

from minillm.config import ModelConfig  # noqa: E402
from minillm.finetune.new_tokens import resize_vocab  # noqa: E402
from minillm.model import Llama  # noqa: E402
from minillm.ship.gguf_writer import write_gguf  # noqa: E402

NEW = ["<|im_start|>", "<|im_end|>"]
TEXTS = [
    "<|im_start|>user\nWhat does json.dumps do?<|im_end|>\n"
        "<|im_start|>assistant\nIt serializes.<|im_end|>",
    "<|im_start|>system\n\tYou write  Python.<|im_end|>",
    "def f(x):\n    return x<|im_end|>",
    "<|im_start|><|im_end|><|im_start|> a <|im_end|>  b",
    " leading space <|im_start|>héllo → 世界<|im_end|>\n\n",
    "no added pieces here:\n\treturn  'é'",
    "<|im_start",  # a prefix of an added piece is plain text
]


def main():
    import llama_cpp

    tmp = Path(tempfile.mkdtemp(prefix="peer_new_tokens_"))
    tok = tiny_tokenizer(tmp / "base.model").add_pieces(NEW, tmp / "tokenizer.model")
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96,
                      vocab_size=tok.vocab_size - 2, max_seq_len=128)
    torch.manual_seed(0)
    model = Llama(cfg).eval()
    resize_vocab(model, tok.vocab_size)
    path = tmp / "m.gguf"
    write_gguf(path, model.config, model.state_dict().items(), tok, "f32", name="new-tokens")
    cpp = LlamaCpp(model_path=str(path), n_ctx=128, logits_all=True, verbose=False)
    print(f"llama-cpp-python {llama_cpp.__version__}; vocab {tok.vocab_size} (added {tok.added})")

    same = plain_same = 0
    for text in TEXTS:
        ours = tok.encode(text, bos=True)
        theirs = cpp.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        plain = cpp.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        same, plain_same = same + (theirs == ours), plain_same + (plain == ours)
        print(f"{'same' if theirs == ours else 'DIFF'} "
              f"(special=False: {'same' if plain == ours else 'differs'})  {text!r}")
        if theirs != ours:
            print(f"   minillm {ours}\n   llama.cpp {theirs}")

    ids = tok.encode(TEXTS[0], bos=True)
    cpp.reset()
    cpp.eval(ids)
    theirs = np.asarray(cpp.scores[: len(ids)], dtype=np.float32)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0].float().numpy()
    diff = float(np.abs(theirs - ours).max())
    print(f"tokenization identical for {same}/{len(TEXTS)} texts with special=True "
          f"({plain_same}/{len(TEXTS)} with special=False); logits max |diff| {diff:.3e} "
          f"over {len(ids)} positions (new tokens included)")
    ok = same == len(TEXTS) and diff < 1e-3
    print("PEER_NEW_TOKENS_OK" if ok else "PEER_NEW_TOKENS_MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
