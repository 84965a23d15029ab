"""Tokenizer: a thin wrapper over a SentencePiece model, plus training one for from-scratch models.

LLaMA tokenizers are SentencePiece BPE models with byte fallback: any character the vocabulary lacks
is spelled as its UTF-8 bytes (`<0xE2>` pieces), so encode → decode is lossless. Ids follow LLaMA:
unk 0, bos 1, eos 2; a BOS is prepended to a prompt. We call SentencePiece directly (the
auto-converted "fast" HF tokenizer is known to tokenize some inputs differently).

Added pieces (`add_pieces`, e.g. ChatML's "<|im_start|>"): appended to the vocabulary as
USER_DEFINED pieces, and encoded the way llama.cpp and HF's slow tokenizer do: the text is first
split on them, each becomes its own id, and every stretch of text between them is encoded by
SentencePiece on its own (so it gets the dummy-prefix "▁" a text start gets). SentencePiece alone
would match them inside the text instead ("<|im_start|>user" → "▁", "<|im_start|>", "u", …), which
llama.cpp would not reproduce. `decode` is the inverse: each stretch decoded on its own, the added
pieces spelled as they are.

Paper: Kudo & Richardson 2018, https://arxiv.org/abs/1808.06226
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from minillm.tokenizer.spm_proto import USER_DEFINED_PIECE, piece_entry, proto_fields
from minillm.util.fileio import atomic_write_bytes


class Tokenizer:
    add_bos = True  # LLaMA prompts start with a BOS (BPETokenizer reads this from its file)
    chat_template = None  # a tokenizer.model holds none (the checkpoint's config may)
    file_name = "tokenizer.model"

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
            self._find_added_pieces()
            return
        model_path = Path(model_path)
        if model_path.is_dir():
            model_path = model_path / "tokenizer.model"
        if not model_path.is_file():
            raise FileNotFoundError(f"{model_path}: tokenizer model not found "
                                    "(expected a SentencePiece .model)")
        self.path, self._bytes = model_path, None
        try:
            self.sp.Load(str(model_path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{model_path}: not a valid SentencePiece model ({e})") from None
        self._find_added_pieces()

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
        """LLaMA tokenizers define no pad piece (-1); batches pad with unk and mask the loss
        instead."""
        pad = self.sp.pad_id()
        return pad if pad >= 0 else self.unk_id

    def _find_added_pieces(self):
        """self.added {piece: id}: the USER_DEFINED pieces that are not whitespace, i.e. added
        tokens such as "<|im_start|>" (`add_pieces`). The GGUF writer gives exactly these
        llama.cpp's USER_DEFINED type; whitespace ones (our trained "\n" and "\t") stay with
        SentencePiece's own handling, as they stay NORMAL in GGUF (gguf_writer.py says why)."""
        self.added: dict[str, int] = {}
        self._split_re = None
        data, what = self.model_bytes(), str(self.path or "tokenizer")
        # "type = USER_DEFINED", the last field of such a piece
        tail = bytes([3 << 3, USER_DEFINED_PIECE])
        if tail not in data:
            return  # no piece can be USER_DEFINED: skip parsing (a 32000-piece model takes ~0.3 s)
        for i, piece in enumerate(proto_fields(data, what).get(1, [])):
            if (piece.endswith(tail)
                    and proto_fields(piece, f"{what} piece {i}").get(3) == [USER_DEFINED_PIECE]):
                if self.sp.IdToPiece(i).strip():
                    self.added[self.sp.IdToPiece(i)] = i
        if self.added:
            longest_first = sorted(self.added, key=len, reverse=True)
            self._split_re = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")")

    @property
    def added_ids(self) -> frozenset[int]:
        return frozenset(self.added.values())

    def encode(self, text: str, bos: bool | None = None, eos: bool = False) -> list[int]:
        """bos None: the tokenizer's default (add_bos, True for LLaMA)."""
        # text, piece, text, piece, …, text
        parts = self._split_re.split(text) if self._split_re else [text]
        bos = self.add_bos if bos is None else bos
        ids = [self.bos_id] if bos and self.bos_id >= 0 else []
        for i, part in enumerate(parts):
            if i % 2:
                ids.append(self.added[part])
            elif part:
                ids += self.sp.EncodeAsIds(part)
        if eos and self.eos_id >= 0:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        if not self.added:
            return self.sp.DecodeIds(ids)
        out, run, added = [], [], self.added_ids
        for i in ids:
            if i in added:
                out += [self.sp.DecodeIds(run), self.sp.IdToPiece(i)]
                run = []
            else:
                run.append(i)
        return "".join(out) + self.sp.DecodeIds(run)

    def add_pieces(self, pieces: Iterable[str], out_path: str | Path) -> Tokenizer:
        """Write this model with `pieces` appended as USER_DEFINED pieces (ids V, V+1, …) to
        out_path (atomically) and return it loaded. Each piece must be new, non-empty and free of
        whitespace (a space inside would be escaped to "▁" by SentencePiece but not by llama.cpp).
        The model's embedding and lm_head need as many new rows: minillm/finetune/new_tokens.py."""
        pieces = list(pieces)
        for p in pieces:
            if not p or any(c.isspace() for c in p):
                raise ValueError(f"add_pieces: {p!r} must be non-empty and contain no whitespace")
            if (pieces.count(p) > 1 or self.sp.PieceToId(p) != self.unk_id
                    or p == self.sp.IdToPiece(self.unk_id)):
                raise ValueError(f"add_pieces: {p!r} is given twice or is already a piece of "
                                 f"{self.path or 'this'} vocabulary")
        data = self.model_bytes() + b"".join(piece_entry(p, 0.0, USER_DEFINED_PIECE)
                                             for p in pieces)
        atomic_write_bytes(Path(out_path), data)
        return Tokenizer(out_path)

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
                # one "sentence" per line for the trainer; keep the newline as a visible
                # symbol inside
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
