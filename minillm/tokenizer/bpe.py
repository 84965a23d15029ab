"""Byte-level BPE, the tokenizer of GPT-2, Llama 3, SmolLM2, Qwen2 and most models since (docs
chapter 3), written to be read like karpathy/minbpe and to give HF tokenizers' and llama.cpp's ids.

Encoding a text, step by step:
1. special tokens first: "<|im_start|>" etc. are cut out of the text and become their own ids;
   they are never merged and never pre-tokenized (`_split_specials`).
2. pre-tokenize (pretokenize.py): the text between them is cut into pieces by the family's regex,
   e.g. "Hello world" -> "Hello", " world". BPE works inside one piece at a time.
3. bytes -> symbols: each piece is UTF-8 encoded and every byte is written as one printable
   character by GPT-2's `bytes_to_unicode` map (the 188 printable bytes map to themselves, the
   other 68 to U+0100 onwards: " " is "Ġ", "\\n" is "Ċ"). So a vocabulary of strings covers every
   byte sequence and nothing is ever unknown.
4. merges: repeatedly join the adjacent pair whose merge rule came first in training (lowest rank;
   the leftmost pair on ties) until no pair has a rule. `ignore_merges` (Llama 3): a piece that is
   already a vocabulary entry is emitted whole, without merging.
5. each final symbol string is a vocabulary entry: its id.
Pieces repeat a lot (" the", "    "), so piece -> ids is cached, as tiktoken and minbpe do.

Decoding maps ids back to symbol strings, the symbols back to bytes and the bytes to UTF-8
(errors="replace", as HF does: a character cut between tokens shows as U+FFFD until complete,
which the streaming TextStream in generate/text.py holds back).

Special tokens, two conventions (both exact for their files):
- HF (tokenizer.json): the added tokens matched leftmost-longest, with their lstrip / rstrip /
  single_word flags; `normalized` ones are matched after the normalizer.
- llama.cpp (GGUF): every CONTROL, USER_DEFINED or UNKNOWN token, longest first, each cutting all
  the text fragments left (`tokenizer_st_partition` in llama-vocab.cpp).

Readers and writers for tokenizer.json and GGUF are in bpe_files.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

from minillm.tokenizer.pretokenize import PreTokenizer, normalize

# llama.cpp's token types (GGUF tokenizer.ggml.token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
CACHE_LIMIT = 200_000  # pieces kept in the encode cache before it is cleared


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> character map: printable bytes stand for themselves, the rest (control
    characters, space, 0x7F-0xA0, 0xAD) get U+0100, U+0101, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, n = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + n)
            n += 1
    return dict(sorted(chars.items()))


@lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


@dataclass(frozen=True)
class AddedToken:
    """An added / special token as tokenizer.json spells it (GGUF ones have only content, id)."""
    content: str
    id: int
    special: bool = True
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False
    normalized: bool = False


class BPETokenizer:
    """Byte-level BPE with the interface of sentencepiece.Tokenizer: vocab_size, bos_id, eos_id,
    unk_id, pad_id, added_ids, encode(text, bos=None, eos=False), decode(ids), id_to_piece.

    vocab: id -> symbol string ("Ġthe"); merges: (left, right) pairs in rank order; token_types:
    llama.cpp's type per id; added: the added / special tokens; specials: "hf" or "llama.cpp"
    (which convention cuts them out, see the top). add_bos: what the file says encode does by
    default (SmolLM2: no BOS; Llama 3: a BOS).
    """

    def __init__(self, vocab: list[str], merges: list[tuple[str, str]], pre: PreTokenizer, *,
                 token_types: list[int], added: list[AddedToken], specials: str,
                 bos_id: int | None, eos_id: int | None, unk_id: int | None = None,
                 pad_id: int | None = None, add_bos: bool = False, add_eos: bool = False,
                 ignore_merges: bool = False, chat_template: str | None = None,
                 source: dict | None = None, path=None):
        self.vocab, self.merges, self.pre = vocab, merges, pre
        self.token_types, self.added, self.specials = token_types, added, specials
        self._bos, self._eos, self._unk, self._pad = bos_id, eos_id, unk_id, pad_id
        self.add_bos, self.add_eos, self.ignore_merges = add_bos, add_eos, ignore_merges
        self.chat_template = chat_template  # Jinja from the file, for generate/chat.py
        self.source = source or {}  # the file's own tokenizer.json / config, to write back
        self.path = path
        self.token_to_id = {s: i for i, s in enumerate(vocab)}
        self.ranks = {pair: r for r, pair in enumerate(merges)}
        self._cache: dict[str, list[int]] = {}
        self._piece_bytes = [self._token_bytes(i) for i in range(len(vocab))]
        self._byte_map = bytes_to_unicode()
        self._matchers = (_matcher([a for a in added if not a.normalized], pre),
                          _matcher([a for a in added if a.normalized], pre))

    # ---- the interface every caller uses

    file_name = "tokenizer.json"  # what add_pieces writes, and training copies beside a model

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def bos_id(self) -> int:
        return -1 if self._bos is None else self._bos

    @property
    def eos_id(self) -> int:
        return -1 if self._eos is None else self._eos

    @property
    def unk_id(self) -> int:
        return -1 if self._unk is None else self._unk

    @property
    def pad_id(self) -> int:
        """The pad token, else unk, else eos: batches pad with it and mask the loss there."""
        for i in (self._pad, self._unk, self._eos):
            if i is not None:
                return i
        return 0

    @property
    def added_ids(self) -> frozenset[int]:
        return frozenset(a.id for a in self.added)

    def id_to_piece(self, i: int) -> str:
        return self.vocab[i]

    def add_pieces(self, pieces: Iterable[str], out_path) -> BPETokenizer:
        """This tokenizer with `pieces` appended as special added tokens (ids V, V+1, ...),
        written as out_path (a tokenizer.json, atomically, its tokenizer_config.json beside) and
        returned loaded. As sentencepiece.Tokenizer.add_pieces: each new, non-empty, no
        whitespace; the model grows to match in finetune/new_tokens.py."""
        from minillm.tokenizer.bpe_files import add_tokens  # (bpe_files builds on this file)

        return add_tokens(self, list(pieces), out_path)

    def encode(self, text: str, bos: bool | None = None, eos: bool = False) -> list[int]:
        """Token ids of text; bos None follows the file (add_bos), True / False force it."""
        ids = [self._bos] if (self.add_bos if bos is None else bos) and self._bos is not None \
            else []
        for piece, tid in self._split_specials(text):
            if tid is not None:
                ids.append(tid)
            else:
                for word in self.pre.split(piece):
                    ids += self._encode_word(word)
        if eos and self._eos is not None:
            ids.append(self._eos)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        try:
            if any(i < 0 for i in ids):
                raise IndexError
            data = b"".join(self._piece_bytes[i] for i in ids)
        except IndexError:
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise ValueError(f"decode: id {bad} is outside the vocabulary "
                             f"(0..{self.vocab_size - 1})") from None
        return data.decode("utf-8", errors="replace")

    # ---- steps 3-5: one pre-token to ids

    def _encode_word(self, word: str) -> list[int]:
        ids = self._cache.get(word)
        if ids is None:
            symbols = "".join(self._byte_map[b] for b in word.encode("utf-8"))
            ids = self._merge(symbols)
            if len(self._cache) >= CACHE_LIMIT:
                self._cache.clear()
            self._cache[word] = ids
        return ids

    def _merge(self, symbols: str) -> list[int]:
        if self.ignore_merges and symbols in self.token_to_id:
            return [self.token_to_id[symbols]]
        parts = list(symbols)
        while len(parts) > 1:
            # the adjacent pair with the lowest rank; min keeps the leftmost on ties
            best = min(range(len(parts) - 1),
                       key=lambda i: self.ranks.get((parts[i], parts[i + 1]), 1 << 62))
            if (parts[best], parts[best + 1]) not in self.ranks:
                break
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        return self._symbols_to_ids(parts)

    def _symbols_to_ids(self, parts: list[str]) -> list[int]:
        out = []
        for p in parts:
            i = self.token_to_id.get(p)
            if i is not None:
                out.append(i)
            elif self.specials == "llama.cpp":  # llama.cpp: spell it byte by byte, skip the rest
                out += [self.token_to_id[c] for c in p if c in self.token_to_id]
            elif self._unk is not None:  # HF: the unknown token (byte-level vocabularies never)
                out.append(self._unk)
        return out

    # ---- step 1: special tokens

    def _split_specials(self, text: str) -> list[tuple[str, int | None]]:
        """The text as (fragment, None) and (token, id) in order."""
        if self.specials == "llama.cpp":
            return _partition_cpp(text, self._cpp_specials())
        out = []
        for frag, tid in _find_added(text, self._matchers[0]):
            if tid is not None:
                out.append((frag, tid))
            else:  # normalize, then match the tokens that are matched on normalized text
                out += _find_added(normalize(frag, self.pre.normalizer), self._matchers[1])
        return out

    def _cpp_specials(self) -> list[tuple[str, int]]:
        if not hasattr(self, "_cpp"):
            ids = [i for i, t in enumerate(self.token_types)
                   if t in (CONTROL, USER_DEFINED, UNKNOWN) and self.vocab[i]]
            self._cpp = sorted(((self.vocab[i], i) for i in ids), key=lambda t: -len(t[0]))
        return self._cpp

    def _token_bytes(self, i: int) -> bytes:
        """What id i decodes to. A llama.cpp CONTROL / USER_DEFINED / UNKNOWN token is its text;
        otherwise each symbol maps back to its byte, and a token with a character outside the map
        (an added token with a space in it) is its own UTF-8, as HF's ByteLevel decoder does."""
        s = self.vocab[i]
        if self.specials == "llama.cpp" and self.token_types[i] in (CONTROL, USER_DEFINED,
                                                                     UNKNOWN):
            return s.encode("utf-8")
        m = unicode_to_bytes()
        if all(c in m for c in s):
            return bytes(m[c] for c in s)
        return s.encode("utf-8")


# --------------------------------------------------------------------------------------------------
# the two ways to cut special tokens out


def _partition_cpp(text: str, specials: list[tuple[str, int]]) -> list[tuple[str, int | None]]:
    """llama.cpp: for each special token, longest first, cut every text fragment at each of its
    occurrences, left to right."""
    frags: list[tuple[str, int | None]] = [(text, None)] if text else []
    for content, tid in specials:
        out = []
        for frag, t in frags:
            if t is not None or content not in frag:
                out.append((frag, t))
                continue
            parts = frag.split(content)
            for k, part in enumerate(parts):
                if k:
                    out.append((content, tid))
                if part:
                    out.append((part, None))
        frags = out
    return frags


def _matcher(tokens: list[AddedToken], pre: PreTokenizer):
    """(regex, {matched text: token}) matching the longest token at the leftmost place (an
    alternation of literals, longest first, is leftmost-longest), or None."""
    if not tokens:
        return None
    by_text = {(normalize(t.content, pre.normalizer) if t.normalized else t.content): t
               for t in tokens}
    by_text.pop("", None)  # an empty token would match everywhere
    if not by_text:
        return None
    alts = sorted(by_text, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, alts))), by_text


def _find_added(text: str, matcher) -> list[tuple[str, int | None]]:
    """HF's AddedVocabulary.find_matches: single_word tokens only between non-word characters;
    lstrip / rstrip tokens swallow the whitespace beside them."""
    if matcher is None or not text:
        return [(text, None)] if text else []
    rx, by_text = matcher
    out, pos = [], 0
    for m in rx.finditer(text):
        tok, start, stop = by_text[m.group(0)], m.start(), m.end()
        if tok.single_word and ((start > 0 and text[start - 1].isalnum())
                                or (stop < len(text) and text[stop].isalnum())):
            continue
        if tok.lstrip:
            start = max(len(text[:start].rstrip()), pos)
        if tok.rstrip:
            stop = len(text) - len(text[stop:].lstrip())
        if pos < start:
            out.append((text[pos:start], None))
        out.append((text[start:stop], tok.id))
        pos = stop
    if pos < len(text):
        out.append((text[pos:], None))
    return out
