"""Tokenizer: a thin wrapper over a SentencePiece model, plus training one for from-scratch models.

LLaMA tokenizers are SentencePiece BPE models with byte fallback: any character the vocabulary lacks
is spelled as its UTF-8 bytes (`<0xE2>` pieces), so encode → decode is lossless. Ids follow LLaMA:
unk 0, bos 1, eos 2; a BOS is prepended to a prompt. We call SentencePiece directly (the
auto-converted "fast" HF tokenizer is known to tokenize some inputs differently).

Paper: Kudo & Richardson 2018, https://arxiv.org/abs/1808.06226
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from minillm.fileio import atomic_write_bytes


class Tokenizer:
    def __init__(self, model_path: str | Path | None = None, *, model_bytes: bytes | None = None):
        """Load from a `tokenizer.model` path (or a directory holding one), or from serialized bytes
        (e.g. the model rebuilt from a GGUF file's metadata)."""
        self.sp = spm.SentencePieceProcessor()
        if model_bytes is not None:
            self.path, self._bytes = None, model_bytes
            try:
                self.sp.LoadFromSerializedProto(model_bytes)
            except (OSError, RuntimeError) as e:
                raise ValueError(f"not a valid serialized SentencePiece model ({e})") from None
            return
        model_path = Path(model_path)
        if model_path.is_dir():
            model_path = model_path / "tokenizer.model"
        if not model_path.is_file():
            raise FileNotFoundError(f"{model_path}: tokenizer model not found (expected a SentencePiece .model)")
        self.path, self._bytes = model_path, None
        try:
            self.sp.Load(str(model_path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{model_path}: not a valid SentencePiece model ({e})") from None

    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    @property
    def pad_id(self) -> int:
        """LLaMA tokenizers define no pad piece (-1); batches pad with unk and mask the loss instead."""
        pad = self.sp.pad_id()
        return pad if pad >= 0 else self.unk_id

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self.sp.EncodeAsIds(text)
        if bos and self.bos_id >= 0:
            ids = [self.bos_id] + ids
        if eos and self.eos_id >= 0:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.IdToPiece(i)

    def model_bytes(self) -> bytes:
        """The serialized model, e.g. to copy it beside a checkpoint."""
        return self._bytes if self._bytes is not None else self.path.read_bytes()


def train_tokenizer(
    texts: Iterable[str],
    out_path: str | Path,
    vocab_size: int,
    max_sentence_length: int = 16384,
    input_sentence_size: int = 2_000_000,
    seed: int = 1337,
) -> Tokenizer:
    """Train a LLaMA-style SentencePiece BPE model on `texts` and write it to `out_path`.

    Settings and why:
    - BPE with byte_fallback: unknown characters become byte pieces, nothing is ever <unk>.
    - identity normalization, no extra-whitespace removal, no dummy-prefix quirks beyond LLaMA's:
      newlines, tabs and runs of spaces survive (essential for code; OpenLLaMA v1 lost them).
    - split_digits: numbers are spelled digit by digit, as in LLaMA.
    - ids unk 0, bos 1, eos 2, no pad (LLaMA's layout).
    Deterministic for a given input and seed (single-threaded training).
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        with open(corpus, "w", encoding="utf-8") as f:
            for text in texts:
                # one "sentence" per line for the trainer; keep the newline as a visible symbol inside
                for line in text.split("\n"):
                    if line.strip():
                        f.write(line + "\n")
        prefix = Path(tmp) / "sp"
        spm.SentencePieceTrainer.Train(
            input=str(corpus),
            model_prefix=str(prefix),
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            user_defined_symbols=["\n", "\t"],
            character_coverage=0.9995,
            max_sentence_length=max_sentence_length,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            num_threads=1,
            minloglevel=2,
        )
        atomic_write_bytes(out_path, Path(str(prefix) + ".model").read_bytes())
    return Tokenizer(out_path)
