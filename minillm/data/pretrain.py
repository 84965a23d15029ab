"""Data pipeline: a text corpus -> token ids in a flat file on disk -> random training windows.

    corpus (text file | directory glob | JSONL | the Python stdlib)   read_corpus -> Corpus
      -> [BOS] doc [EOS] [BOS] doc [EOS] ... as uint16/uint32 ids     prepare_dataset
                                                                      (parallel, cached)
      -> cache_dir/train.bin, val.bin, meta.json                      load_split -> np.memmap
      -> x, y = (B, T) int64 windows, y shifted by one                get_batch

This is nanoGPT's `prepare.py` + `get_batch`: the whole corpus is one long stream of token ids,
stored raw (no header) so `np.memmap` maps it without reading it, and a batch is B random windows of
T+1 tokens. BOS/EOS between documents tell the model where one file ends and the next begins.

The default corpus is embedded in every Python install: the standard library's own source (~610
files, ~10.7 MB of `*.py` once `site-packages`, the test suites and `encodings/` are left out), so a
from-scratch model can be trained with no download.

Train/val split (by tokens, after a seeded shuffle of documents): documents are ordered by
sha256(f"{seed}:{name}") — a shuffle that does not depend on any RNG implementation — then
concatenated, and the last `val_frac` of the tokens is the validation split. The shuffle mixes
modules, so val is not "the files that sort last"; cutting the token stream (not whole documents)
makes val exactly `val_frac` and works for a corpus of one file. One document straddles the cut.

Caching: meta.json records what the .bin files were built from (source fingerprint = sha256 over the
document names and raw bytes; tokenizer sha256; val_frac; seed). The same inputs reuse the files;
anything different rebuilds them. meta.json is written last and deleted first, so a crash mid-build
can never leave a meta that vouches for half-written data.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import sysconfig
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from minillm.tokenizer.sentencepiece import Tokenizer, train_tokenizer
from minillm.util.fileio import (
    atomic_write,
    atomic_write_bytes,
    check_unicode,
    claim_directory,
    read_json_object,
    read_jsonl,
    remove_stale_temp_files,
)

FORMAT_VERSION = 1  # bump when the layout of train.bin / val.bin / meta.json changes
# what a cache directory of an older minillm (before the .minillm marker) holds: it may be reused
CACHE_FILES = ("meta.json", "train.bin", "tokenizer.model.json", "stdlib_meta.json")
DEFAULT_PATTERNS = ("**/*.py", "**/*.txt", "**/*.md")
# stdlib folders that are not "the standard library" as code to learn from: installed packages, the
# test suites (their data includes files that are deliberately malformed or in legacy encodings),
# bytecode caches, and `encodings/` (~100 machine-generated codec tables that would teach a small
# model to babble hex tables instead of Python)
STDLIB_SKIP_DIRS = frozenset({"site-packages", "test", "tests", "idle_test", "__pycache__",
                              "encodings"})

# --------------------------------------------------------------------------------------------------
# corpus sources


@dataclass
class Corpus:
    source: str  # what was read, for messages: "stdlib:/usr/lib/python3.11", "dir:data/", ...
    names: list[str]  # one per document: path relative to the root, or "file.jsonl:LINE"
    texts: list[str]  # the documents, same order as names
    fingerprint: str  # sha256 over the kind, its options, every name and every raw byte read
    skipped: list[str]  # files left out because they are not UTF-8 (also reported with a warning)


def _new_hash(kind: str, options: str) -> hashlib._Hash:
    h = hashlib.sha256()
    h.update(f"minillm-corpus-v{FORMAT_VERSION}\0{kind}\0{options}\0".encode())
    return h


def _read_files(files: list[Path], root: Path, source: str, h: hashlib._Hash) -> Corpus:
    """Read each file as one document; names are paths relative to `root`, the hash covers raw
    bytes. Files that are not UTF-8 are skipped with a warning; if none is left, the error names the
    first one and the byte offset where decoding failed."""
    names, texts, skipped, first_error = [], [], [], None
    for path in files:
        name = path.relative_to(root).as_posix()
        raw = path.read_bytes()
        h.update(f"{name}\0{len(raw)}\0".encode())  # length-prefixed: no two inputs hash alike
        h.update(raw)
        try:
            texts.append(raw.decode("utf-8"))
            names.append(name)
        except UnicodeDecodeError as e:
            skipped.append(name)
            first_error = first_error or f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})"
    if skipped:
        warnings.warn(
            f"{source}: skipped {len(skipped)} of {len(files)} files that are not valid UTF-8 "
            f"(e.g. {skipped[:3]}); they are listed in meta.json as skipped_files",
            stacklevel=3,
        )
    if not texts:
        raise ValueError(f"{source}: no readable UTF-8 documents among {len(files)} files; "
                         f"{first_error}")
    return Corpus(source, names, texts, h.hexdigest(), skipped)


def read_text_file(path: str | Path) -> Corpus:
    """The whole file is one document."""
    path = Path(path)
    return _read_files([path], path.parent, f"file:{path}", _new_hash("file", ""))


def read_directory(root: str | Path, patterns: tuple[str, ...] = DEFAULT_PATTERNS) -> Corpus:
    """Every file under `root` matching any glob pattern,
    one document each, sorted by relative path."""
    root = Path(root)
    files = sorted({p for pat in patterns for p in root.glob(pat) if p.is_file()})
    if not files:
        raise ValueError(f"{root}: no files match {list(patterns)}")
    return _read_files(files, root, f"dir:{root}", _new_hash("dir", "\0".join(patterns)))


def stdlib_dir() -> Path:
    """The running interpreter's standard library source folder (tests point this elsewhere)."""
    return Path(sysconfig.get_paths()["stdlib"])


def read_stdlib(root: str | Path | None = None) -> Corpus:
    """The embedded default corpus: every `*.py` under the stdlib folder, minus STDLIB_SKIP_DIRS.

    Names are relative to the stdlib root,
    so the same Python version fingerprints the same anywhere.
    """
    root = Path(root) if root is not None else stdlib_dir()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: standard library folder not found")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        # prune in place so the walk never enters site-packages (often far bigger than the stdlib)
        dirnames[:] = [d for d in dirnames if d not in STDLIB_SKIP_DIRS]
        files += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    files.sort()
    if not files:
        raise ValueError(f"{root}: no *.py files outside {sorted(STDLIB_SKIP_DIRS)}")
    return _read_files(files, root, f"stdlib:{root}", _new_hash("stdlib", ""))


def read_jsonl_corpus(path: str | Path, field: str = "text") -> Corpus:
    """One JSON object per line, the document in its string field `field`; blank lines are skipped.

    Fails (naming the file and 1-based line) on a line that is not UTF-8, not JSON, not an object,
    or lacks a string `field` — a corpus with holes in it is a bug to fix, not to train on.
    """
    path = Path(path)
    h = _new_hash("jsonl", field)
    names, texts = [], []
    for where, obj in read_jsonl(path, "corpus file"):
        if not isinstance(obj, dict):
            raise ValueError(
                f"{where}: expected a JSON object with a string field {field!r}, "
                f"found {type(obj).__name__}"
            )
        if field not in obj:
            raise ValueError(f"{where}: missing field {field!r} (found keys {sorted(obj)})")
        if not isinstance(obj[field], str):
            value = repr(obj[field])[:60]
            raise ValueError(
                f"{where}: field {field!r} must be a string, "
                f"found {type(obj[field]).__name__} {value}"
            )
        names.append(f"{path.name}:{where.rpartition(':')[2]}")
        texts.append(check_unicode(obj[field], f"{where}: field {field!r}"))
    if not texts:
        raise ValueError(f"{path}: no documents (the file is empty)")
    raw = path.read_bytes()  # the fingerprint covers the raw bytes, as for every other corpus
    h.update(f"{path.name}\0{len(raw)}\0".encode())
    h.update(raw)
    return Corpus(f"jsonl:{path}", names, texts, h.hexdigest(), [])


def read_corpus(
    source: str | Path, patterns: tuple[str, ...] = DEFAULT_PATTERNS, field: str = "text"
) -> Corpus:
    """Dispatch on `source`: "stdlib", a *.jsonl file,
    any other file (one document) or a directory."""
    if str(source) == "stdlib":
        return read_stdlib()
    path = Path(source)
    if path.is_dir():
        return read_directory(path, patterns)
    if path.is_file():
        return read_jsonl_corpus(path, field) if path.suffix == ".jsonl" else read_text_file(path)
    raise FileNotFoundError(
        f"{path}: corpus not found (expected 'stdlib', a text file, a .jsonl file or a directory)"
    )


def document_order(names: list[str], seed: int) -> list[int]:
    """Indices of `names` sorted by sha256(f"{seed}:{name}"):
    a shuffle any language can reproduce."""
    return sorted(range(len(names)),
                  key=lambda i: hashlib.sha256(f"{seed}:{names[i]}".encode()).hexdigest())


# --------------------------------------------------------------------------------------------------
# tokenizing in parallel


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id 0..V-1 fits (V <= 65536): half the disk and page cache of uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _encode(tokenizer: Tokenizer, text: str, dtype: np.dtype) -> np.ndarray:
    return np.array(tokenizer.encode(text, eos=True), dtype=dtype)  # (n_doc_tokens,)


_worker_state: tuple[Tokenizer, np.dtype] | None = None  # set in each pool worker by _init_worker


def _init_worker(tokenizer_path: str, dtype: np.dtype) -> None:
    # each worker loads its own tokenizer once; a SentencePiece processor does not pickle
    global _worker_state
    from minillm.formats.load import open_tokenizer  # (load.py imports the model side)

    _worker_state = (open_tokenizer(tokenizer_path), dtype)


def _encode_in_worker(text: str) -> np.ndarray:
    tokenizer, dtype = _worker_state
    return _encode(tokenizer, text, dtype)


def default_num_workers() -> int:
    return (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else (os.cpu_count() or 1))


def tokenize_documents(
    texts: list[str],
    tokenizer: Tokenizer,
    num_workers: int | None = None,
    chunksize: int = 4,
    verbose: bool = True,
) -> list[np.ndarray]:
    """[BOS] + encode(doc) + [EOS] for every document,
    in order, over a pool of `num_workers` processes.

    `pool.imap` keeps the input order, so the result does not depend on the worker count. Workers
    get documents `chunksize` at a time: larger chunks cost less IPC but balance worse (stdlib files
    range from 0 bytes to 750 KB). num_workers <= 1 runs in this process with `tokenizer` itself.
    """
    dtype = token_dtype(tokenizer.vocab_size)
    num_workers = default_num_workers() if num_workers is None else num_workers
    bar = dict(total=len(texts), desc="tokenizing", unit="doc", disable=not verbose)
    if num_workers <= 1:
        return [_encode(tokenizer, t, dtype) for t in tqdm(texts, **bar)]
    with mp.Pool(num_workers, initializer=_init_worker,
                 initargs=(str(tokenizer.path), dtype)) as pool:
        return list(tqdm(pool.imap(_encode_in_worker, texts, chunksize=chunksize), **bar))


# --------------------------------------------------------------------------------------------------
# the cached train.bin / val.bin


def _cache_key(corpus: Corpus, tokenizer_sha256: str, val_frac: float, seed: int) -> dict:
    return dict(
        format=FORMAT_VERSION,
        source_fingerprint=corpus.fingerprint,
        tokenizer_sha256=tokenizer_sha256,
        val_frac=val_frac,
        seed=seed,
    )


def _stale_reason(cache_dir: Path, key: dict) -> str | None:
    """Why the cache cannot be reused, or None when it can."""
    meta_path = cache_dir / "meta.json"
    if not meta_path.is_file():
        return "no meta.json"
    try:
        meta = _read_meta(cache_dir)
    except ValueError as e:  # not UTF-8, not JSON, not an object
        return f"meta.json is unreadable ({e})"
    for k, v in key.items():
        if meta.get(k) != v:
            return f"{k} changed"
    for split in ("train", "val"):
        path = cache_dir / meta[split]["file"]
        expected = meta[split]["n_tokens"] * np.dtype(meta["dtype"]).itemsize
        if not path.is_file() or path.stat().st_size != expected:
            return f"{path.name} missing or not {expected} bytes"
    return None


@dataclass
class TokenizedData:
    train: np.memmap  # (n_train,) token ids, uint16 or uint32
    val: np.memmap  # (n_val,)
    meta: dict  # the contents of meta.json


def _read_meta(cache_dir: Path) -> dict:
    return read_json_object(cache_dir / "meta.json", "token cache metadata")


def load_split(cache_dir: str | Path, split: str) -> np.memmap:
    """Map cache_dir/{split}.bin read-only, with the dtype and length meta.json promises."""
    if split not in ("train", "val"):
        raise ValueError(f"load_split: split must be 'train' or 'val', found {split!r}")
    cache_dir = Path(cache_dir)
    meta = _read_meta(cache_dir)
    path = cache_dir / meta[split]["file"]
    data = np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r")
    if len(data) != meta[split]["n_tokens"]:
        raise ValueError(
            f"{path}: holds {len(data)} tokens, "
            f"{cache_dir / 'meta.json'} says {meta[split]['n_tokens']}"
        )
    return data


def prepare_dataset(
    corpus: Corpus,
    tokenizer: Tokenizer,
    cache_dir: str | Path,
    val_frac: float = 0.05,
    seed: int = 1337,
    num_workers: int | None = None,
    verbose: bool = True,
) -> TokenizedData:
    """Tokenize `corpus` into cache_dir/{train,val}.bin + meta.json, or reuse them if built from the
    same corpus, tokenizer, val_frac and seed. See the module docstring for the split rule."""
    if not 0.0 < val_frac < 1.0:
        raise ValueError(f"prepare_dataset: val_frac must be in (0, 1), found {val_frac}")
    cache_dir = claim_directory(cache_dir, "data cache", legacy=CACHE_FILES)
    remove_stale_temp_files(cache_dir)  # left by a build that was killed (fileio.py)
    key = _cache_key(corpus, file_sha256(tokenizer.path), val_frac, seed)
    reason = _stale_reason(cache_dir, key)
    if reason is None:
        return TokenizedData(
            load_split(cache_dir, "train"), load_split(cache_dir, "val"), _read_meta(cache_dir)
        )
    if verbose:
        print(f"data: building {cache_dir} from {corpus.source} ({reason})")

    # 1) invalidate first: from here until the new meta lands, the folder vouches for nothing
    (cache_dir / "meta.json").unlink(missing_ok=True)
    # 2) tokenize every document, then lay them out in the seeded order as one stream
    docs = tokenize_documents(corpus.texts, tokenizer, num_workers, verbose=verbose)
    order = document_order(corpus.names, seed)
    stream = np.concatenate([docs[i] for i in order])  # (n_tokens,)
    # 3) the last val_frac of the stream is val
    split_at = len(stream) - int(len(stream) * val_frac)
    if split_at == len(stream) or split_at == 0:
        raise ValueError(
            f"{corpus.source}: {len(stream)} tokens are too few to split with val_frac={val_frac}"
        )
    # each file lands whole or not at all:
    # readers see the old file or the new one (fileio.atomic_write)
    for name, part in (("train.bin", stream[:split_at]), ("val.bin", stream[split_at:])):
        with atomic_write(cache_dir / name) as f:
            part.tofile(f)
    # 4) meta last: its presence means the .bin files are complete
    meta = dict(
        key,
        source=corpus.source,
        tokenizer_path=str(tokenizer.path),
        vocab_size=tokenizer.vocab_size,
        dtype=stream.dtype.name,
        n_docs=len(corpus.texts),
        n_tokens=len(stream),
        split_rule="documents ordered by sha256(f'{seed}:{name}') and concatenated; "
        "the last val_frac of the tokens is val",
        split_at=split_at,
        train=dict(file="train.bin", n_tokens=split_at),
        val=dict(file="val.bin", n_tokens=len(stream) - split_at),
        skipped_files=corpus.skipped,
    )
    atomic_write_bytes(cache_dir / "meta.json", (json.dumps(meta, indent=2) + "\n").encode())
    return TokenizedData(load_split(cache_dir, "train"), load_split(cache_dir, "val"), meta)


def train_corpus_tokenizer(
    corpus: Corpus, out_path: str | Path, vocab_size: int, max_chars: int = 4_000_000,
    seed: int = 1337
) -> Tokenizer:
    """Train a SentencePiece BPE tokenizer on a sample of `corpus`, or reuse the one at `out_path`.

    The sample is whole documents in document_order(seed) until `max_chars` characters (at least one
    document): BPE merges stabilise long before 10 MB, and training time grows with the sample. A
    sidecar `<out_path>.json` (e.g. tokenizer.model.json) records the corpus fingerprint,
    vocab_size, max_chars, seed and the model's sha256; any difference (or a hand-edited model)
    retrains.
    """
    out_path = Path(out_path)
    sidecar = out_path.with_name(out_path.name + ".json")
    key = dict(source_fingerprint=corpus.fingerprint, vocab_size=vocab_size, max_chars=max_chars,
               seed=seed)
    if (out_path.exists() or out_path.is_symlink()) and not sidecar.is_file():
        raise FileExistsError(f"{out_path}: exists and minillm did not train it (no {sidecar.name} "
                              f"record beside it); minillm never overwrites it: pick another "
                              f"data.cache_dir, or pass the tokenizer as data.tokenizer")
    if out_path.is_file() and sidecar.is_file():
        saved = read_json_object(sidecar, "tokenizer record")
        if saved == dict(key, tokenizer_sha256=file_sha256(out_path)):
            return Tokenizer(out_path)
    sample, n_chars = [], 0
    for i in document_order(corpus.names, seed):
        if sample and n_chars + len(corpus.texts[i]) > max_chars:
            break
        sample.append(corpus.texts[i])
        n_chars += len(corpus.texts[i])
    tokenizer = train_tokenizer(sample, out_path, vocab_size, seed=seed)
    saved = dict(key, tokenizer_sha256=file_sha256(out_path))
    atomic_write_bytes(sidecar, (json.dumps(saved, indent=2) + "\n").encode())
    return tokenizer


# --------------------------------------------------------------------------------------------------
# batches


def get_batch(
    data: np.ndarray,
    batch_size: int,
    block_size: int,
    generator: torch.Generator,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """B random windows: x = data[i : i+T], y = data[i+1 : i+T+1], each (B/W, T) int64 on the CPU.

    Offsets i are drawn uniformly from [0, len(data) - T - 1] by ONE call
    torch.randint(len(data) - T, (B,), generator=generator), so the batch is a pure function of the
    generator state: save `generator.get_state()` in
    the checkpoint and resume draws the same batches.

    Data parallel: every rank holds a generator seeded alike and draws the same B global offsets,
    then keeps rows [rank * B/W, (rank+1) * B/W). The W shards concatenated in rank order are
    exactly the batch one process with batch B would see, and all generators stay in step.
    """
    if len(data) <= block_size:
        raise ValueError(f"get_batch: need more than block_size={block_size} tokens, "
                         f"found {len(data)}")
    if batch_size % world_size != 0 or not 0 <= rank < world_size:
        raise ValueError(
            f"get_batch: need batch_size % world_size == 0 and 0 <= rank < world_size, "
            f"found batch_size={batch_size}, world_size={world_size}, rank={rank}"
        )
    # 1) the global batch's offsets, identical on every rank
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)  # (B,)
    # 2) this rank's contiguous slice of them
    per_rank = batch_size // world_size
    ix = ix[rank * per_rank : (rank + 1) * per_rank].tolist()  # (B/W,)
    # 3) read T+1 tokens per window; int64 because nn.Embedding and cross_entropy index with long
    windows = torch.from_numpy(
        np.stack([data[i : i + block_size + 1] for i in ix]).astype(np.int64)
    )  # (B/W, T+1)
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()  # (B/W, T), (B/W, T)


def unigram_entropy(data: np.ndarray) -> float:
    """H = -sum_v p(v) ln p(v) in nats/token, p the token frequencies of `data`.

    The loss of the best model that ignores context (it predicts the frequencies). A val loss below
    this means the model uses the context; at init a model sits near ln(vocab_size), above it.
    """
    counts = np.bincount(np.asarray(data).ravel())
    if counts.sum() == 0:
        raise ValueError("unigram_entropy: empty token array")
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
