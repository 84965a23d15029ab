"""Byte-level BPE tokenizers from the files real models ship, and back (docs chapter 3).

Read:
- HF: `tokenizer.json` (model BPE: vocab, merges as "a b" strings or [a, b] pairs, ignore_merges;
  added_tokens with their flags; normalizer; pre_tokenizer; post_processor TemplateProcessing
  for the BOS), with `tokenizer_config.json` / `special_tokens_map.json` for the bos / eos / pad
  / unk names and add_bos_token, and the chat template (tokenizer_config.json's "chat_template"
  or transformers 5's separate chat_template.jinja).
- GGUF (`tokenizer.ggml.model = "gpt2"`): tokens, token_type, merges, pre, the special ids,
  add_bos_token / add_eos_token, tokenizer.chat_template. `from_gguf_metadata` takes the metadata
  dict formats/gguf_reader.py read.
Write: `save_tokenizer_json` (tokenizer.json + tokenizer_config.json that transformers'
AutoTokenizer loads with the same ids); the GGUF keys are written by ship/gguf_writer.py.

A broken file is one error line naming the file and the entry: a merges entry that is not two
symbols, a merge whose parts or result are not in the vocabulary, an id out of range, a token given
twice (llama.cpp asserts on that), ids with holes.
"""

from __future__ import annotations

import json
from pathlib import Path

from minillm.tokenizer.bpe import CONTROL, NORMAL, UNKNOWN, USER_DEFINED, AddedToken, BPETokenizer
from minillm.tokenizer.pretokenize import GGUF_PRE, for_gguf
from minillm.tokenizer.pretokenize import from_tokenizer_json as pre_from_json
from minillm.util.fileio import atomic_write_bytes, read_json_object, read_text


def check_merges(merges: list, token_to_id: dict[str, int], where: str) -> list[tuple[str, str]]:
    """Merges as (left, right) pairs; "a b" strings are cut at the first space after the first
    character (llama.cpp's rule; byte-level symbols hold no space)."""
    out = []
    for i, m in enumerate(merges):
        if isinstance(m, str):
            cut = m.find(" ", 1)
            pair = (m[:cut], m[cut + 1:]) if cut > 0 else None
        else:
            pair = tuple(m) if isinstance(m, list) and len(m) == 2 else None
        if pair is None or not all(isinstance(s, str) and s for s in pair):
            raise ValueError(f"{where}: merges[{i}] is {m!r}, expected two symbols "
                             f'("a b" or ["a", "b"])')
        for s in (*pair, pair[0] + pair[1]):
            if s not in token_to_id:
                raise ValueError(f"{where}: merges[{i}] {m!r}: {s!r} is not in the vocabulary")
        out.append(pair)
    return out


def _check_unique(tokens: list[str], where: str):
    seen: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if t in seen:
            raise ValueError(f"{where}: token {t!r} appears twice (ids {seen[t]} and {i}); "
                             f"llama.cpp refuses such a vocabulary")
        seen[t] = i


def _check_id(i, n: int, what: str, where: str) -> int | None:
    if i is None:
        return None
    if isinstance(i, bool) or not isinstance(i, int) and not hasattr(i, "__index__"):
        raise ValueError(f"{where}: {what} is {i!r}, expected a token id")
    if not 0 <= int(i) < n:
        raise ValueError(f"{where}: {what} is {int(i)}, outside the vocabulary (0..{n - 1})")
    return int(i)


# --------------------------------------------------------------------------------------------------
# GGUF


def from_gguf_metadata(meta: dict, where: str) -> BPETokenizer:
    """The tokenizer of a GGUF whose tokenizer.ggml.model is "gpt2", exactly as llama.cpp runs it
    (its special-token convention, its regex table, its add_bos default per pre type)."""
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise ValueError(f"{where}: tokenizer.ggml.tokens is missing or not an array of strings")
    _check_unique(tokens, where)
    n = len(tokens)
    types = meta.get("tokenizer.ggml.token_type")
    types = [NORMAL] * n if types is None else [int(t) for t in types]
    if len(types) != n:
        raise ValueError(f"{where}: tokenizer.ggml.token_type has {len(types)} entries, "
                         f"tokenizer.ggml.tokens {n}")
    if "tokenizer.ggml.merges" not in meta:
        raise ValueError(f"{where}: tokenizer.ggml.merges is missing (a gpt2 tokenizer needs it)")
    token_to_id = {t: i for i, t in enumerate(tokens)}
    merges = check_merges(list(meta["tokenizer.ggml.merges"]), token_to_id,
                          f"{where}: tokenizer.ggml")
    pre_name = meta.get("tokenizer.ggml.pre", "default")
    pre = for_gguf(pre_name, where)
    _, default_bos, ignore_merges = GGUF_PRE[pre_name]
    ids = {k: _check_id(meta.get(f"tokenizer.ggml.{k}_token_id"), n, f"tokenizer.ggml.{k}_token_id",
                        where) for k in ("bos", "eos", "unknown", "padding")}
    added = [AddedToken(tokens[i], i) for i in range(n)
             if types[i] in (CONTROL, USER_DEFINED, UNKNOWN)]
    return BPETokenizer(
        tokens, merges, pre, token_types=types, added=added, specials="llama.cpp",
        bos_id=ids["bos"], eos_id=ids["eos"], unk_id=ids["unknown"], pad_id=ids["padding"],
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", default_bos)),
        add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        ignore_merges=ignore_merges, chat_template=meta.get("tokenizer.chat_template"),
        source={"gguf": where}, path=Path(where))


# --------------------------------------------------------------------------------------------------
# tokenizer.json


def _token_name(v) -> str | None:
    """tokenizer_config.json spells a special token as "<s>" or {"content": "<s>", ...}."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def _added_tokens(obj: dict, where: str) -> list[AddedToken]:
    out = []
    for k, a in enumerate(obj.get("added_tokens") or []):
        if not isinstance(a, dict) or not isinstance(a.get("content"), str) or \
                not isinstance(a.get("id"), int):
            raise ValueError(f"{where}: added_tokens[{k}] needs a string content and an int id")
        out.append(AddedToken(a["content"], a["id"], bool(a.get("special", False)),
                              bool(a.get("lstrip")), bool(a.get("rstrip")),
                              bool(a.get("single_word")), bool(a.get("normalized", False))))
    return out


def _vocab_list(model: dict, added: list[AddedToken], where: str) -> list[str]:
    """id -> token over model.vocab and the added tokens; ids must be 0..n-1 without holes."""
    vocab = model.get("vocab")
    if not isinstance(vocab, dict):
        raise ValueError(f"{where}: model.vocab must be an object {{token: id}}")
    by_id: dict[int, str] = {}
    for tok, i in [*vocab.items(), *((a.content, a.id) for a in added)]:
        if not isinstance(i, int) or i < 0:
            raise ValueError(f"{where}: token {tok!r} has id {i!r}, expected an int >= 0")
        if by_id.setdefault(i, tok) != tok:
            raise ValueError(f"{where}: id {i} is both {by_id[i]!r} and {tok!r}")
    n = max(by_id, default=-1) + 1
    if len(by_id) != n:
        hole = next(i for i in range(n) if i not in by_id)
        raise ValueError(f"{where}: ids run to {n - 1} but id {hole} has no token")
    return [by_id[i] for i in range(n)]


def _post_processor_bos(post: dict | None, where: str) -> tuple[str | None, bool, bool]:
    """(bos token, add_bos, add_eos) from a TemplateProcessing's single template (inside a
    Sequence too); ByteLevel / None add nothing."""
    items = post.get("processors", []) if post and post.get("type") == "Sequence" else [post]
    bos, add_bos, add_eos = None, False, False
    for p in items:
        t = p.get("type") if isinstance(p, dict) else None
        if t == "TemplateProcessing":
            single = p.get("single") or []
            seq = [i for i, s in enumerate(single) if "Sequence" in s]
            for i, s in enumerate(single):
                if "SpecialToken" in s and seq and i < seq[0]:
                    bos, add_bos = s["SpecialToken"]["id"], True
                elif "SpecialToken" in s:
                    add_eos = True
        elif t not in (None, "ByteLevel"):
            raise ValueError(f"{where}: post_processor {t!r} is not supported (minillm reads "
                             f"TemplateProcessing, ByteLevel and Sequence of them)")
    return bos, add_bos, add_eos


def _chat_template(d: Path, config: dict) -> str | None:
    t = config.get("chat_template")
    if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
        t = next((x.get("template") for x in t if x.get("name") == "default"), None)
    if isinstance(t, str):
        return t
    jinja = d / "chat_template.jinja"
    return read_text(jinja, "chat template") if jinja.is_file() else None


def from_tokenizer_json(path: str | Path) -> BPETokenizer:
    """A tokenizer.json (or a directory holding one), with the configs beside it; HF's
    conventions for special tokens and BOS."""
    path = Path(path)
    d, file = (path, path / "tokenizer.json") if path.is_dir() else (path.parent, path)
    obj = read_json_object(file, "tokenizer.json")
    where = str(file)
    model = obj.get("model")
    if not isinstance(model, dict) or model.get("type", "BPE") != "BPE":
        kind = model.get("type") if isinstance(model, dict) else None
        raise ValueError(f'{where}: model.type is {kind!r}, expected "BPE" (minillm reads '
                         f"byte-level BPE tokenizer.json files)")
    for key in ("continuing_subword_prefix", "end_of_word_suffix", "dropout"):
        if model.get(key):
            raise ValueError(f"{where}: model.{key} is {model[key]!r}; minillm supports none")
    added = _added_tokens(obj, where)
    vocab = _vocab_list(model, added, where)
    token_to_id = {t: i for i, t in enumerate(vocab)}
    merges = check_merges(model.get("merges") or [], token_to_id, f"{where}: model")
    pre = pre_from_json(obj.get("pre_tokenizer"), obj.get("normalizer"), where)
    config = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins
        if (d / name).is_file():
            config.update(read_json_object(d / name, name))
    bos_name, add_bos, add_eos = _post_processor_bos(obj.get("post_processor"), where)
    if isinstance(config.get("add_bos_token"), bool):  # LlamaTokenizerFast's keys win
        add_bos = config["add_bos_token"]
    if isinstance(config.get("add_eos_token"), bool):
        add_eos = config["add_eos_token"]
    names = {k: _token_name(config.get(f"{k}_token")) for k in ("bos", "eos", "unk", "pad")}
    names["bos"] = names["bos"] or bos_name
    names["unk"] = names["unk"] or model.get("unk_token")
    ids = {}
    for k, name in names.items():
        if name is not None and name not in token_to_id:
            raise ValueError(f"{d}: {k}_token {name!r} is not in the vocabulary")
        ids[k] = None if name is None else token_to_id[name]
    specials = {a.id for a in added if a.special}
    types = [CONTROL if i in specials else USER_DEFINED if i in {a.id for a in added} else NORMAL
             for i in range(len(vocab))]
    return BPETokenizer(
        vocab, merges, pre, token_types=types, added=added, specials="hf", bos_id=ids["bos"],
        eos_id=ids["eos"], unk_id=ids["unk"], pad_id=ids["pad"], add_bos=add_bos and
        ids["bos"] is not None, add_eos=add_eos, ignore_merges=bool(model.get("ignore_merges")),
        chat_template=_chat_template(d, config),
        source={"tokenizer.json": obj, "config": config}, path=file)


# --------------------------------------------------------------------------------------------------
# writing tokenizer.json


def tokenizer_json(tok: BPETokenizer) -> dict:
    """The tokenizer.json of tok: the file it was read from, or one built from a GGUF's vocabulary
    (its pre rule as Split steps + ByteLevel, its specials as added tokens, a TemplateProcessing
    BOS when add_bos)."""
    if "tokenizer.json" in tok.source:
        return tok.source["tokenizer.json"]
    added = [{"id": i, "content": tok.vocab[i], "single_word": False, "lstrip": False,
              "rstrip": False, "normalized": False, "special": t != USER_DEFINED}
             for i, t in enumerate(tok.token_types) if t in (CONTROL, USER_DEFINED, UNKNOWN)]
    if tok.add_bos:
        bos = tok.vocab[tok.bos_id]
        post = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                           {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}},
                         {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos, "type_id": 1}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos: {"id": bos, "ids": [tok.bos_id], "tokens": [bos]}}}
    else:
        post = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                "use_regex": False}
    model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
             "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
             "ignore_merges": tok.ignore_merges,
             "vocab": {t: i for i, t in enumerate(tok.vocab)},
             "merges": [list(m) for m in tok.merges]}
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": None, "pre_tokenizer": tok.pre.json, "post_processor": post,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                        "use_regex": True},
            "model": model}


def save_tokenizer_json(tok: BPETokenizer, d: str | Path, chat_template: str | None = None):
    """Write tokenizer.json and tokenizer_config.json into directory d (atomically each)."""
    d = Path(d)
    atomic_write_bytes(d / "tokenizer.json",
                       json.dumps(tokenizer_json(tok), ensure_ascii=False).encode())
    config = dict(tok.source.get("config", {}))
    for k, i in (("bos", tok._bos), ("eos", tok._eos), ("unk", tok._unk), ("pad", tok._pad)):
        if i is not None:
            config[f"{k}_token"] = tok.vocab[i]
    config.update(add_bos_token=tok.add_bos, add_eos_token=tok.add_eos,
                  tokenizer_class=config.get("tokenizer_class", "PreTrainedTokenizerFast"),
                  clean_up_tokenization_spaces=False)
    template = chat_template if chat_template is not None else tok.chat_template
    if template is not None:
        config["chat_template"] = template
    atomic_write_bytes(d / "tokenizer_config.json", json.dumps(config, indent=2).encode())


def add_tokens(tok: BPETokenizer, pieces: list[str], out_path: str | Path) -> BPETokenizer:
    """tok + `pieces` as special added tokens at the end (BPETokenizer.add_pieces)."""
    for p in pieces:
        if not p or any(c.isspace() for c in p):
            raise ValueError(f"add_pieces: {p!r} must be non-empty and contain no whitespace")
        if pieces.count(p) > 1 or p in tok.token_to_id:
            raise ValueError(f"add_pieces: {p!r} is given twice or is already a token of "
                             f"{tok.path or 'this'} vocabulary")
    out_path = Path(out_path)
    obj = json.loads(json.dumps(tokenizer_json(tok)))  # a deep copy
    obj["added_tokens"] = (obj.get("added_tokens") or []) + [
        {"id": tok.vocab_size + k, "content": p, "single_word": False, "lstrip": False,
         "rstrip": False, "normalized": False, "special": True} for k, p in enumerate(pieces)]
    grown = BPETokenizer(
        tok.vocab + pieces, tok.merges, tok.pre, token_types=tok.token_types + [CONTROL] * len(
            pieces), added=tok.added + [AddedToken(p, tok.vocab_size + k)
                                        for k, p in enumerate(pieces)],
        specials=tok.specials, bos_id=tok._bos, eos_id=tok._eos, unk_id=tok._unk,
        pad_id=tok._pad, add_bos=tok.add_bos, add_eos=tok.add_eos,
        ignore_merges=tok.ignore_merges, chat_template=tok.chat_template,
        source={"tokenizer.json": obj, "config": tok.source.get("config", {})})
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_tokenizer_json(grown, out_path.parent)
    if out_path.name != "tokenizer.json":
        atomic_write_bytes(out_path, (out_path.parent / "tokenizer.json").read_bytes())
    return from_tokenizer_json(out_path)
