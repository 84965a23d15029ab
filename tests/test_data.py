"""Data pipeline: corpus sources, the cached train/val token files,
batches and the unigram baseline.

Expected token streams are rebuilt here the slow obvious way (encode each document, order
documents by sha256 with hashlib directly, concatenate) and compared with the files on
disk element for element.
"""

import hashlib
import json
import math
import os

import numpy as np
import pytest
import torch

import minillm.data.pretrain as data
from minillm.data.pretrain import (
    get_batch,
    load_split,
    prepare_dataset,
    read_corpus,
    read_directory,
    read_jsonl_corpus,
    read_stdlib,
    read_text_file,
    token_dtype,
    train_corpus_tokenizer,
    unigram_entropy,
)
from minillm.tokenizer.sentencepiece import train_tokenizer

DOCS = {
    "a.py": "def add(a, b):\n    return a + b\n",
    "b.py": "import os\n\nprint(os.getcwd())\n",
    "pkg/c.py": "class C:\n\tx = 1\n\n\ty = 'café'\n",
    "pkg/d.py": "for i in range(10):\n    print(i * i)\n",
    "notes.txt": "Plain text notes, not code.\n",
    "image.png": "not matched by any default pattern",
}


def write_tree(root, docs=DOCS):
    for name, text in docs.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    # the vocab must hold 261 fixed pieces (unk, bos, eos, "\n", "\t", 256 bytes)
    # plus every character seen
    texts = list(DOCS.values()) * 20 + ["the quick brown fox jumps over the lazy dog\n"] * 20
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok") / "tiny.model", vocab_size=350)


@pytest.fixture
def tree(tmp_path):
    return write_tree(tmp_path / "corpus")


def expected_stream(corpus, tok, seed):
    """[BOS] doc [EOS] per document, documents ordered by sha256(f"{seed}:{name}")."""
    key = {n: hashlib.sha256(f"{seed}:{n}".encode()).hexdigest() for n in corpus.names}
    by_name = dict(zip(corpus.names, corpus.texts, strict=True))
    out = []
    for name in sorted(corpus.names, key=key.get):
        out += [tok.bos_id] + tok.sp.EncodeAsIds(by_name[name]) + [tok.eos_id]
    return np.array(out)


# --------------------------------------------------------------------------------------------------
# sources


def test_read_text_file_is_one_document(tree):
    c = read_text_file(tree / "a.py")
    assert (c.names, c.texts, c.skipped) == (["a.py"], [DOCS["a.py"]], [])
    assert read_corpus(tree / "a.py").fingerprint == c.fingerprint
    fp = c.fingerprint
    (tree / "a.py").write_text(DOCS["a.py"] + "#\n")
    assert read_text_file(tree / "a.py").fingerprint != fp


def test_read_directory_globs_sorted(tree):
    c = read_directory(tree)  # default patterns: py, txt, md
    assert c.names == ["a.py", "b.py", "notes.txt", "pkg/c.py", "pkg/d.py"]
    assert c.texts[3] == DOCS["pkg/c.py"]
    only_py = read_directory(tree, patterns=("**/*.py",))
    assert only_py.names == ["a.py", "b.py", "pkg/c.py", "pkg/d.py"]
    assert only_py.fingerprint != c.fingerprint
    # deterministic, and dispatched on a directory
    assert read_corpus(tree).fingerprint == c.fingerprint
    with pytest.raises(ValueError, match=r"corpus: no files match \['\*\*/\*.rs'\]"):
        read_directory(tree, patterns=("**/*.rs",))


def test_read_stdlib_fake_tree_skips_tests_and_non_utf8(tmp_path, monkeypatch, tok):
    root = write_tree(
        tmp_path / "lib",
        {
            "os.py": "import sys\n",
            "json/__init__.py": "x = 1\n",
            "test/test_os.py": "skipped: test suite\n",
            "lib2to3/tests/data/x.py": "skipped too\n",
            "site-packages/torch/x.py": "skipped: installed package\n",
            "README.txt": "not *.py\n",
        },
    )
    (root / "latin1.py").write_bytes("s = 'caf\xe9'\n".encode("latin-1"))
    with pytest.warns(
        UserWarning, match=r"skipped 1 of 3 files that are not valid UTF-8 \(e.g. \['latin1.py'\]\)"
    ):
        c = read_stdlib(root)
    assert c.names == ["json/__init__.py", "os.py"]
    assert c.skipped == ["latin1.py"]
    monkeypatch.setattr(data, "stdlib_dir", lambda: root)
    with pytest.warns(UserWarning):
        assert read_corpus("stdlib").fingerprint == c.fingerprint
    d = prepare_dataset(c, tok, tmp_path / "cache", val_frac=0.5, num_workers=1, verbose=False)
    assert d.meta["skipped_files"] == ["latin1.py"] and d.meta["source"] == f"stdlib:{root}"


def test_non_utf8_text_file_names_the_file_and_byte(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"ok\n\xff rest\n")
    with pytest.warns(UserWarning), pytest.raises(ValueError) as e:
        read_corpus(path)
    assert str(e.value) == (f"file:{path}: no readable UTF-8 documents among 1 files; "
                            f"{path}: not valid UTF-8 (invalid start byte at byte 3)")


def test_real_stdlib_is_found():
    c = read_stdlib()
    assert "os.py" in c.names and "json/decoder.py" in c.names and len(c.names) > 500
    assert not any(n.startswith(("site-packages/", "test/")) or "/tests/" in n for n in c.names)


def test_read_jsonl(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "first"}\n\n{"text": "sec\\nond", "id": 7}\n')
    c = read_corpus(path)
    assert (c.names, c.texts) == (["c.jsonl:1", "c.jsonl:3"], ["first", "sec\nond"])
    assert read_jsonl_corpus(path, field="text").fingerprint == c.fingerprint


@pytest.mark.parametrize(
    "line, message",
    [
        # only our own words: json's message and even its column for this one differ in Python 3.13
        ('{"text": "a",}', r"c.jsonl:2: invalid JSON at column 1[34] \(.+\)$"),
        ('{"text" 1}', r"c.jsonl:2: invalid JSON at column 9 \("),
        ('{"body": "a", "id": 1}', r"c.jsonl:2: missing field 'text' \(found keys "
                                   r"\['body', 'id'\]\)"),
        ('{"text": 3}', r"c.jsonl:2: field 'text' must be a string, found int 3"),
        ('{"text": null}', r"c.jsonl:2: field 'text' must be a string, found NoneType None"),
        ('["text"]', r"c.jsonl:2: expected a JSON object with a string field 'text', found list"),
    ],
)
def test_read_jsonl_errors_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "ok"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        read_jsonl_corpus(path)


def test_read_jsonl_too_deeply_nested_names_file_and_line(tmp_path):
    path = tmp_path / "c.jsonl"
    # RecursionError in json
    path.write_text('{"text": "ok"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ValueError) as e:
        read_jsonl_corpus(path)
    assert str(e.value) == f"{path}:2: invalid JSON (nested too deeply to parse)"


def test_read_jsonl_not_utf8_and_missing_sources(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(ValueError, match=r"c.jsonl:2: not UTF-8 text"):
        read_jsonl_corpus(path)
    with pytest.raises(FileNotFoundError, match="nope: corpus not found"):
        read_corpus(tmp_path / "nope")


# --------------------------------------------------------------------------------------------------
# cached train.bin / val.bin


def test_token_dtype():
    assert token_dtype(300) == np.uint16
    assert token_dtype(65536) == np.uint16  # ids 0..65535 all fit
    assert token_dtype(65537) == np.uint32


def test_prepare_dataset_content_and_meta(tree, tok, tmp_path):
    corpus = read_directory(tree)
    d = prepare_dataset(corpus, tok, tmp_path / "cache", val_frac=0.2, seed=7, num_workers=1,
                        verbose=False)
    stream = expected_stream(corpus, tok, seed=7)
    n = len(stream)
    split_at = n - int(n * 0.2)
    assert d.train.dtype == np.uint16 and d.val.dtype == np.uint16
    np.testing.assert_array_equal(d.train, stream[:split_at])
    np.testing.assert_array_equal(d.val, stream[split_at:])
    assert (stream == tok.bos_id).sum() == 5 and (stream == tok.eos_id).sum() == 5
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    assert meta == d.meta
    assert meta["format"] == 1 and meta["dtype"] == "uint16" and meta["vocab_size"] == 350
    assert meta["tokenizer_sha256"] == hashlib.sha256(tok.path.read_bytes()).hexdigest()
    assert meta["source_fingerprint"] == corpus.fingerprint
    assert (meta["n_docs"], meta["n_tokens"], meta["split_at"]) == (5, n, split_at)
    assert meta["train"] == {"file": "train.bin", "n_tokens": split_at}
    assert meta["val"] == {"file": "val.bin", "n_tokens": n - split_at}
    assert (meta["val_frac"], meta["seed"], meta["skipped_files"]) == (0.2, 7, [])
    # raw uint16, no header
    assert (tmp_path / "cache" / "train.bin").stat().st_size == 2 * split_at
    np.testing.assert_array_equal(load_split(tmp_path / "cache", "val"), stream[split_at:])


def test_parallel_equals_serial(tree, tok, tmp_path):
    corpus = read_directory(tree)
    one = prepare_dataset(corpus, tok, tmp_path / "w1", num_workers=1, verbose=False)
    two = prepare_dataset(corpus, tok, tmp_path / "w2", num_workers=2, verbose=False)
    np.testing.assert_array_equal(one.train, two.train)
    np.testing.assert_array_equal(one.val, two.val)
    assert ((tmp_path / "w1" / "train.bin").read_bytes()
            == (tmp_path / "w2" / "train.bin").read_bytes())


def test_cache_reused_then_invalidated(tree, tok, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    calls = []
    real = data.tokenize_documents
    monkeypatch.setattr(data, "tokenize_documents",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    kw = dict(num_workers=1, verbose=False)
    first = prepare_dataset(read_directory(tree), tok, cache, **kw)
    mtimes = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    # same inputs: nothing re-tokenized, nothing rewritten
    again = prepare_dataset(read_directory(tree), tok, cache, **kw)
    assert len(calls) == 1
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == mtimes
    np.testing.assert_array_equal(again.train, first.train)
    # changed document -> rebuild with the new text
    (tree / "a.py").write_text("def sub(a, b):\n    return a - b\n")
    changed = prepare_dataset(read_directory(tree), tok, cache, **kw)
    assert len(calls) == 2 and not np.array_equal(
        np.concatenate([changed.train, changed.val]), np.concatenate([first.train, first.val])
    )
    # different split fraction or seed -> rebuild
    prepare_dataset(read_directory(tree), tok, cache, val_frac=0.3, **kw)
    prepare_dataset(read_directory(tree), tok, cache, val_frac=0.3, seed=1, **kw)
    assert len(calls) == 4
    # different tokenizer -> rebuild
    tok2 = train_tokenizer(DOCS.values(), tmp_path / "other.model", vocab_size=320)
    assert (
        prepare_dataset(read_directory(tree), tok2, cache, val_frac=0.3, seed=1,
                        **kw).meta["vocab_size"]
        == 320
    )
    assert len(calls) == 5
    # a truncated .bin -> rebuild
    (cache / "val.bin").write_bytes(b"")
    prepare_dataset(read_directory(tree), tok2, cache, val_frac=0.3, seed=1, **kw)
    assert len(calls) == 6
    # an unreadable meta.json -> rebuild
    (cache / "meta.json").write_text("{")
    prepare_dataset(read_directory(tree), tok2, cache, val_frac=0.3, seed=1, **kw)
    assert len(calls) == 7


def test_failed_build_leaves_no_meta(tree, tok, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    prepare_dataset(read_directory(tree), tok, cache, num_workers=1, verbose=False)
    (tree / "b.py").write_text("changed\n")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "tokenize_documents", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(read_directory(tree), tok, cache, num_workers=1, verbose=False)
    assert not (cache / "meta.json").exists()  # the old meta no longer vouches for anything


def test_temp_files_of_a_killed_build_are_removed(tree, tok, tmp_path):
    cache = tmp_path / "cache"
    prepare_dataset(read_directory(tree), tok, cache, num_workers=1, verbose=False)
    dead = 4194305  # above the largest pid Linux can hand out (2**22): no process has it
    stale = [cache / f".minillm-tmp.{dead}.train.bin", cache / f".minillm-tmp.{dead}.meta.json"]
    live = cache / f".minillm-tmp.{os.getppid()}.val.bin"  # another process still writing: kept
    user = cache / ".val.bin.tmp"  # not minillm's name: never touched
    for p in stale + [live, user]:
        p.write_bytes(b"half a file")
    # reuses the cache
    prepare_dataset(read_directory(tree), tok, cache, num_workers=1, verbose=False)
    assert (sorted(p.name for p in cache.iterdir())
            == sorted([".minillm", "meta.json", "train.bin", "val.bin", live.name, user.name]))


def test_uint32_when_vocab_exceeds_uint16(tree, tmp_path):
    class BigVocab:  # duck-types Tokenizer: only vocab_size, path and encode are used in-process
        vocab_size = 70_000
        path = tree / "a.py"

        def encode(self, text, bos=True, eos=False):
            return [1, 65_536 + len(text), 2]

    corpus = read_directory(tree, patterns=("**/*.py",))
    d = prepare_dataset(corpus, BigVocab(), tmp_path / "cache", val_frac=0.25, num_workers=1,
                        verbose=False)
    assert d.meta["dtype"] == "uint32" and d.train.dtype == np.uint32
    # 12 tokens, the last 3 are val
    assert (tmp_path / "cache" / "train.bin").stat().st_size == 4 * 9
    assert sorted(np.concatenate([d.train, d.val]).tolist()) == sorted(
        [1, 2] * 4 + [65_536 + len(DOCS[n]) for n in ("a.py", "b.py", "pkg/c.py", "pkg/d.py")]
    )


def test_train_corpus_tokenizer_is_cached(tree, tmp_path, monkeypatch):
    corpus = read_directory(tree)
    out = tmp_path / "tok.model"
    tok = train_corpus_tokenizer(corpus, out, vocab_size=330)
    sidecar = json.loads((tmp_path / "tok.model.json").read_text())
    assert sidecar == dict(
        source_fingerprint=corpus.fingerprint,
        vocab_size=330,
        max_chars=4_000_000,
        seed=1337,
        tokenizer_sha256=hashlib.sha256(out.read_bytes()).hexdigest(),
    )
    real = data.train_tokenizer
    calls = []
    monkeypatch.setattr(data, "train_tokenizer", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert train_corpus_tokenizer(corpus, out, vocab_size=330).vocab_size == tok.vocab_size == 330
    assert calls == []
    assert train_corpus_tokenizer(corpus, out, vocab_size=335).vocab_size == 335
    assert calls == [1]


# --------------------------------------------------------------------------------------------------
# batches and the unigram baseline


def test_get_batch_exact_windows_and_resume():
    arr = np.arange(1000, dtype=np.uint16)
    g = torch.Generator().manual_seed(1337)
    state = g.get_state()
    x, y = get_batch(arr, batch_size=4, block_size=8, generator=g)
    # torch.randint(992, (4,)) from seed 1337 draws these starts (CPU Mersenne Twister)
    starts = [119, 925, 796, 360]
    assert x.dtype == torch.int64 and y.dtype == torch.int64 and x.shape == (4, 8)
    assert x.tolist() == [list(range(s, s + 8)) for s in starts]
    assert y.tolist() == [list(range(s + 1, s + 9)) for s in starts]
    x2, _ = get_batch(arr, 4, 8, g)
    assert x2[:, 0].tolist() == [711, 345, 295, 666]
    # restoring the generator state replays both batches exactly
    g.set_state(state)
    assert (torch.equal(get_batch(arr, 4, 8, g)[0], x)
            and torch.equal(get_batch(arr, 4, 8, g)[0], x2))
    # the last window that fits ends at the last token
    xs, ys = get_batch(np.arange(9, dtype=np.uint16), 3, 8, torch.Generator().manual_seed(0))
    assert xs.tolist() == [list(range(8))] * 3 and ys.tolist() == [list(range(1, 9))] * 3


def test_get_batch_ranks_concatenate_to_the_single_process_batch():
    arr = np.arange(5000, dtype=np.uint32) * 3
    single = torch.Generator().manual_seed(42)
    ranks = [torch.Generator().manual_seed(42) for _ in range(4)]
    for _ in range(3):  # several steps: the generators must stay in step
        x, y = get_batch(arr, 8, 16, single)
        shards = [get_batch(arr, 8, 16, g, rank=r, world_size=4) for r, g in enumerate(ranks)]
        assert all(s[0].shape == (2, 16) for s in shards)
        assert torch.equal(torch.cat([s[0] for s in shards]), x)
        assert torch.equal(torch.cat([s[1] for s in shards]), y)
    assert all(torch.equal(g.get_state(), single.get_state()) for g in ranks)


def test_get_batch_errors():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="need more than block_size=8 tokens, found 8"):
        get_batch(np.arange(8), 2, 8, g)
    with pytest.raises(ValueError, match="batch_size=6, world_size=4, rank=0"):
        get_batch(np.arange(100), 6, 8, g, rank=0, world_size=4)
    with pytest.raises(ValueError, match="rank=2"):
        get_batch(np.arange(100), 4, 8, g, rank=2, world_size=2)


def test_unigram_entropy():
    assert unigram_entropy(np.array([0, 1, 2, 3] * 25, dtype=np.uint16)) == pytest.approx(
        math.log(4), abs=1e-12
    )
    assert unigram_entropy(np.array([7] * 10)) == 0.0
    # p = (3/4, 1/4) on ids 5 and 9: H = -(0.75 ln 0.75 + 0.25 ln 0.25)
    expected = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert (unigram_entropy(np.array([5, 5, 9, 5], dtype=np.uint32))
            == pytest.approx(expected, abs=1e-12))
    with pytest.raises(ValueError, match="empty token array"):
        unigram_entropy(np.array([], dtype=np.uint16))
