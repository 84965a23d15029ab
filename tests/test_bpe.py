"""Byte-level BPE (minillm/tokenizer/bpe.py, pretokenize.py, bpe_files.py) against the peers' ids.

Goldens in tests/data/bpe/ were computed once by bench/peer_bpe_goldens.py (versions inside the
files): llama.cpp's ids for SmolLM2's GGUF, and HF tokenizers' for two small tokenizer.json files in
Llama 3's and GPT-2's layouts, on 360 texts (stdlib source, CJK, Arabic, emoji, combining marks,
numbers, whitespace runs, special tokens inline).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from real_model import smollm2_gguf

from minillm.config import ModelConfig
from minillm.formats.load import load_tokenizer, open_tokenizer
from minillm.generate.text import TextStream
from minillm.model import Llama
from minillm.ship.gguf_writer import write_gguf
from minillm.tokenizer.bpe import BPETokenizer, bytes_to_unicode
from minillm.tokenizer.bpe_files import (
    from_gguf_metadata,
    from_tokenizer_json,
    save_tokenizer_json,
)
from minillm.tokenizer.pretokenize import GPT2, compile_regex, for_gguf, split_pieces

DATA = Path(__file__).parent / "data" / "bpe"
TEXTS = json.loads((DATA / "texts.json").read_text(encoding="utf-8"))["texts"]
TINY = json.loads((DATA / "tiny_goldens.json").read_text(encoding="utf-8"))
SMOLLM2 = json.loads((DATA / "smollm2_goldens.json").read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------------
# the pieces


def test_bytes_to_unicode_is_gpt2s_map():
    m = bytes_to_unicode()
    assert len(m) == 256 and len(set(m.values())) == 256
    assert m[ord(" ")] == "\u0120" and m[ord("\n")] == "\u010a" and m[0] == "\u0100"
    assert m[ord("A")] == "A" and m[0xAD] == "\u0143" and m[0xFF] == "\xff"


def test_gpt2_regex_pieces():
    rx = compile_regex(GPT2)
    assert split_pieces(["Hello world  42"], rx) == ["Hello", " world", " ", " 42"]
    assert split_pieces(["I'm here's x"], rx) == ["I", "'m", " here", "'s", " x"]
    # \s is White_Space: U+001C is not, U+00A0 and U+3000 are (Python's own \s differs)
    assert split_pieces(["a\x1cb"], rx) == ["a", "\x1c", "b"]
    assert split_pieces(["a\u3000\u3000b"], rx) == ["a", "\u3000", "\u3000", "b"]
    # \p{L} / \p{N} are Unicode classes: CJK letters, Arabic-Indic digits, superscripts
    assert split_pieces(["中文 ٣٤²"], rx) == ["中文", " ٣٤²"]
    assert split_pieces(["x \n\n"], rx) == ["x", " \n\n"]


def test_smollm_pre_splits_digits_then_gpt2():
    pre = for_gguf("smollm", "test")
    assert pre.split("\n    76") == ["\n    ", "7", "6"]
    assert pre.split("a1b22") == ["a", "1", "b", "2", "2"]


def test_unknown_pre_is_refused():
    with pytest.raises(ValueError, match=r"tokenizer.ggml.pre is 'nope', which minillm does not"):
        for_gguf("nope", "x.gguf")


def reference_merge(symbols: list[str], ranks: dict) -> list[str]:
    """llama.cpp's llm_tokenizer_bpe_session, transcribed: a priority queue of (rank, left index)
    with stale entries skipped."""
    import heapq
    parts = list(symbols)
    alive = list(range(len(parts)))
    heap = [(ranks[(parts[i], parts[i + 1])], i, i + 1) for i in range(len(parts) - 1)
            if (parts[i], parts[i + 1]) in ranks]
    heapq.heapify(heap)
    text = {i: parts[i] for i in alive}
    nxt = {i: i + 1 for i in range(len(parts) - 1)}
    prv = {i + 1: i for i in range(len(parts) - 1)}
    while heap:
        r, left, right = heapq.heappop(heap)
        if left not in text or right not in text or nxt.get(left) != right:
            continue
        if ranks.get((text[left], text[right])) != r:
            continue
        text[left] += text.pop(right)
        if right in nxt:
            nxt[left] = nxt.pop(right)
            prv[nxt[left]] = left
        else:
            nxt.pop(left, None)
        for a, b in ((prv.get(left), left), (left, nxt.get(left))):
            if a is not None and b is not None and (text[a], text[b]) in ranks:
                heapq.heappush(heap, (ranks[(text[a], text[b])], a, b))
    return [text[i] for i in sorted(text)]


def test_merge_order_matches_the_priority_queue_reference():
    tok = from_tokenizer_json(DATA / "tiny_llama3")
    rng = random.Random(0)
    alphabet = "abcdeflmnorst _\n"
    for _ in range(300):
        word = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
        symbols = "".join(bytes_to_unicode()[b] for b in word.encode())
        want = [tok.token_to_id[p] for p in reference_merge(list(symbols), tok.ranks)]
        assert tok._merge(symbols) == want, word


# --------------------------------------------------------------------------------------------------
# tokenizer.json against HF tokenizers


@pytest.mark.parametrize("kind", ["llama3", "gpt2"])
def test_tokenizer_json_matches_hf(kind):
    tok = from_tokenizer_json(DATA / f"tiny_{kind}")
    gold = TINY[kind]
    assert [tok.encode(t, bos=False) for t in TEXTS] == gold["plain"]
    hand = TEXTS[:len(gold["with_special_hand"])]
    assert [tok.encode(t) for t in hand] == gold["with_special_hand"]
    assert [tok.decode(tok.encode(t)) for t in hand] == gold["decoded_hand"]
    assert tok.add_bos == (kind == "llama3") and tok.ignore_merges == (kind == "llama3")


def test_decode_of_an_id_outside_the_vocabulary():
    tok = from_tokenizer_json(DATA / "tiny_llama3")
    with pytest.raises(ValueError, match=r"decode: id 702 is outside the vocabulary \(0..701\)"):
        tok.decode(iter([5, 702]))


def test_merges_as_strings_or_pairs(tmp_path):
    obj = json.loads((DATA / "tiny_llama3" / "tokenizer.json").read_text(encoding="utf-8"))
    obj["model"]["merges"] = [" ".join(m) for m in obj["model"]["merges"]]
    (tmp_path / "tokenizer.json").write_text(json.dumps(obj), encoding="utf-8")
    tok = from_tokenizer_json(tmp_path)
    assert [tok.encode(t, bos=False) for t in TEXTS[:120]] == TINY["llama3"]["plain"][:120]


def _broken(tmp_path, edit) -> Path:
    obj = json.loads((DATA / "tiny_llama3" / "tokenizer.json").read_text(encoding="utf-8"))
    edit(obj)
    (tmp_path / "tokenizer.json").write_text(json.dumps(obj), encoding="utf-8")
    return tmp_path / "tokenizer.json"


@pytest.mark.parametrize("edit, message", [
    (lambda o: o["model"]["merges"].__setitem__(3, "abc"), r"merges\[3\] is 'abc', expected two"),
    (lambda o: o["model"]["merges"].__setitem__(5, ["Ġ", "zzqq"]),
     r"merges\[5\] \['Ġ', 'zzqq'\]: 'zzqq' is not in the vocabulary"),
    (lambda o: o["model"]["vocab"].pop("a"), r"ids run to \d+ but id \d+ has no token"),
    (lambda o: o["model"].__setitem__("type", "WordPiece"), r"model.type is 'WordPiece'"),
    (lambda o: o.__setitem__("pre_tokenizer", {"type": "Whitespace"}), r"no ByteLevel step"),
    (lambda o: o["pre_tokenizer"]["pretokenizers"].insert(0, {"type": "Punctuation"}),
     r"pre_tokenizer 'Punctuation' is not supported"),
    (lambda o: o.__setitem__("normalizer", {"type": "Precompiled"}),
     r"normalizer 'Precompiled' is not supported"),
])
def test_broken_tokenizer_json_is_one_clear_line(tmp_path, edit, message):
    path = _broken(tmp_path, edit)
    with pytest.raises(ValueError, match=message) as e:
        from_tokenizer_json(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_load_tokenizer_picks_the_kind(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_bytes((DATA / "tiny_llama3/tokenizer.json").read_bytes())
    assert isinstance(load_tokenizer(tmp_path), BPETokenizer)
    assert isinstance(open_tokenizer(tmp_path / "tokenizer.json"), BPETokenizer)


# --------------------------------------------------------------------------------------------------
# GGUF metadata, written and read back


def tiny_model(vocab_size: int) -> Llama:
    torch.manual_seed(0)
    return Llama(ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=64,
                             vocab_size=vocab_size, max_seq_len=32))


def test_gguf_and_hf_export_round_trip(tmp_path):
    """tokenizer.json -> GGUF (gpt2 vocabulary, pre "llama-bpe") -> read back, and -> a new
    tokenizer.json: the same ids and BOS rule every way (llama.cpp's ids for such a file come from
    bench/peer_bpe_export_check.py --tiny-gguf)."""
    tok = from_tokenizer_json(DATA / "tiny_llama3")
    model = tiny_model(tok.vocab_size)
    write_gguf(tmp_path / "t.gguf", model.config, model.state_dict().items(), tok, "f32")
    back = load_tokenizer(tmp_path / "t.gguf")
    assert isinstance(back, BPETokenizer) and back.pre.gguf_pre == "llama-bpe"
    assert back.add_bos and back.bos_id == tok.bos_id and back.ignore_merges
    # llama.cpp 0.3.36 on this GGUF gives HF's ids except where HF's lstrip / rstrip flags act
    # (a GGUF has no such flags): those two texts hold its ids
    want = list(TINY["llama3"]["plain"])
    want[60], want[61] = [700, 223, 700, 90], [67, 701, 68, 223, 701, 281]
    assert TEXTS[60:62] == ["<mask> <mask>x", "a<tool>b <tool> c"]
    assert [back.encode(t, bos=False) for t in TEXTS] == want
    keep = [i for i, t in enumerate(TEXTS) if "<mask>" not in t and "<tool>" not in t]
    d = tmp_path / "hf"
    d.mkdir()
    save_tokenizer_json(back, d)
    again = from_tokenizer_json(d)
    assert [again.encode(TEXTS[i]) for i in keep] == [back.encode(TEXTS[i]) for i in keep]


def test_gguf_writer_refuses_what_llama_cpp_cannot_run(tmp_path):
    tok = from_tokenizer_json(DATA / "tiny_gpt2")  # ByteLevel(add_prefix_space): no pre name
    model = tiny_model(tok.vocab_size)
    with pytest.raises(ValueError, match="no llama.cpp tokenizer.ggml.pre name"):
        write_gguf(tmp_path / "t.gguf", model.config, model.state_dict().items(), tok, "f32")
    assert not (tmp_path / "t.gguf").exists()


def test_gguf_metadata_refusals():
    meta = {"tokenizer.ggml.tokens": ["a", "b", "ab", "a"], "tokenizer.ggml.merges": ["a b"],
            "tokenizer.ggml.pre": "gpt-2"}
    with pytest.raises(ValueError, match=r"token 'a' appears twice \(ids 0 and 3\)"):
        from_gguf_metadata(meta, "x.gguf")
    meta["tokenizer.ggml.tokens"] = ["a", "b", "ab"]
    meta["tokenizer.ggml.bos_token_id"] = 7
    with pytest.raises(ValueError, match=r"bos_token_id is 7, outside the vocabulary \(0..2\)"):
        from_gguf_metadata(meta, "x.gguf")
    del meta["tokenizer.ggml.bos_token_id"]
    meta["tokenizer.ggml.merges"] = ["a b", "ab"]
    with pytest.raises(ValueError, match=r"merges\[1\] is 'ab', expected two symbols"):
        from_gguf_metadata(meta, "x.gguf")


# --------------------------------------------------------------------------------------------------
# the real SmolLM2 GGUF against llama.cpp


@pytest.fixture(scope="module")
def smollm2():
    return load_tokenizer(smollm2_gguf())


def test_smollm2_matches_llama_cpp(smollm2):
    assert isinstance(smollm2, BPETokenizer) and smollm2.pre.gguf_pre == "smollm"
    assert (smollm2.vocab_size, smollm2.bos_id, smollm2.eos_id, smollm2.add_bos) == \
        (49152, 1, 2, False)
    assert [smollm2.encode(t) for t in TEXTS] == SMOLLM2["llama_cpp"]
    hand = SMOLLM2["llama_cpp_decoded_hand"]
    assert [smollm2.decode(smollm2.encode(t)) for t in TEXTS[:len(hand)]] == hand
    assert smollm2.chat_template.startswith("{% for message in messages %}")


def test_smollm2_where_transformers_differs(smollm2):
    """transformers' GGUF loader ignores tokenizer.ggml.pre; llama.cpp and minillm split digits."""
    i = TEXTS.index("\n    76")
    assert SMOLLM2["transformers_differs"][str(i)] == [472, 216, 39, 38]
    assert smollm2.encode("\n    76") == [2367, 39, 38]


def test_smollm2_stream_decode_holds_partial_characters(smollm2):
    text = "日本語 😀👍🏽 é مرحبا"
    ids = smollm2.encode(text)
    stream = TextStream(smollm2)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


# --------------------------------------------------------------------------------------------------
# the rest of minillm on a BPE tokenizer


def test_add_pieces_save_model_and_instruct_without_bos(tmp_path):
    from minillm.data.instruct import Example, tokenize_example
    from minillm.formats.native import save_model

    tok = from_tokenizer_json(DATA / "tiny_gpt2")  # adds no BOS, as SmolLM2
    V = tok.vocab_size
    grown = tok.add_pieces(["<|im_start|>", "<|im_end|>"], tmp_path / "run" / "tokenizer.json")
    assert grown.vocab_size == V + 2 and grown.added_ids >= {V, V + 1}
    assert grown.encode("<|im_start|>hi<|im_end|>") == [V] + tok.encode("hi") + [V + 1]
    with pytest.raises(ValueError, match="is given twice or is already a token"):
        grown.add_pieces(["<|im_end|>"], tmp_path / "again.json")
    model = tiny_model(grown.vocab_size)
    save_model(model, tmp_path / "ckpt", grown.path)
    back = load_tokenizer(tmp_path / "ckpt")
    assert back.encode("<|im_start|>hi") == [V] + tok.encode("hi") and not back.add_bos
    ex = Example(kind="completion", source="t", text="abc " * 40)
    t = tokenize_example(ex, back, None, 16)
    assert t.truncated and len(t.ids) == 17 and t.ids[-1] == back.eos_id
    assert t.ids == back.encode(ex.text, eos=True)[-17:]  # no BOS kept in front
