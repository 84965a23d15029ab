"""Preference data: pairs of a prompt with a chosen and a rejected response, read from TRL's
standard formats, tokenized with TRL's truncation, batched as one [chosen; rejected] forward; and
the embedded preference set built from the stdlib questions.

Formats (one JSON array, or JSONL with one object per line), TRL's "standard" and
"conversational" preference records (https://huggingface.co/docs/trl/dataset_formats):

    standard        {"prompt": str, "chosen": str, "rejected": str}
    conversational  {"prompt": [{"role": "system"|"user"|"assistant", "content": str}, ...],
                     "chosen": [{"role": "assistant", "content": str}],
                     "rejected": [{"role": "assistant", "content": str}]}

and TRL's implicit-prompt form of both (no "prompt"; or chosen / rejected conversations that open
with the prompt's turns, as in UltraFeedback): their common prefix is the prompt (extract_prompt).

Other string fields (e.g. "kind") are kept in `meta`. A bad record raises one ValueError naming
the file and its line (`pairs.jsonl:7`) or array index (`pairs.json[6]`).

Templates. A standard prompt is used as written (template "none") or wrapped by
templates.format_prompt (e.g. "alpaca", what the embedded set uses); a conversational prompt is
rendered by templates.chat_token_ids, the same function that tokenizes chat for training and
`generate.py --chat`, so another chat template (the model's own Jinja) plugs in there.

Tokens. Prompt and response are encoded on their own (as instruct.py does), so the prompt tokens are
exactly those `generate` is given:

    prompt_ids  = BOS prompt…          (the same for both responses)
    chosen_ids  = chosen… EOS          rejected_ids = rejected… EOS

Truncation, TRL's rules: a prompt longer than max_prompt_length keeps its end (BOS and the last
max_prompt_length − 1 ids: the question is usually at the end); then prompt + response longer than
max_length ids keeps the response's start. A pair whose prompt leaves no room for a response token
is dropped (counted in `PreferenceData.n_dropped`, as TRL filters them). There is no packing: the
losses need one sequence log-prob per response.

Batches: B pairs → 2B rows, the chosen first, then the rejected in the same order,

    x (2B, T)  ids[:-1], pad_id after the end       y (2B, T)  ids[1:], −100 on prompt and pad

so one forward gives every response's log-prob (training/preference.py), and only response tokens
count.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minillm.data.templates import TEMPLATES, chat_token_ids, format_prompt
from minillm.util.fileio import atomic_write_bytes, check_unicode, read_json_records

IGNORE = -100
ROLES = ("system", "user", "assistant")


@dataclass
class PreferencePair:
    source: str  # "file:line" or "file[index]", for error messages
    prompt: str | list[dict]  # a string (standard) or messages (conversational)
    chosen: str  # the response texts
    rejected: str
    meta: dict = field(default_factory=dict)  # other string fields of the record

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


@dataclass
class TokenizedPair:
    prompt_ids: list[int]  # BOS + prompt, after truncation
    chosen_ids: list[int]  # response + EOS, after truncation
    rejected_ids: list[int]
    truncated: bool
    pair: PreferencePair


# --------------------------------------------------------------------------------------------------
# reading and validating


def _messages(value, where: str, key: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: {key!r} must be a non-empty list of {{'role', 'content'}} "
                         f"messages, found {value!r:.60}")
    out = []
    for i, m in enumerate(value):
        at = f"{where}: {key}[{i}]"
        if not isinstance(m, dict) or set(m) - {"role", "content"} or "content" not in m:
            raise ValueError(f"{at}: expected {{'role': ..., 'content': str}}, found {m!r:.60}")
        if m.get("role") not in ROLES:
            raise ValueError(f"{at}: unknown role {m.get('role')!r}; expected one of {list(ROLES)}")
        if not isinstance(m["content"], str):
            raise ValueError(f"{at}: 'content' must be a string, "
                             f"found {type(m['content']).__name__}")
        out.append({"role": m["role"], "content": check_unicode(m["content"], at)})
    return out


def _response(value, where: str, key: str, conversational: bool) -> str:
    if conversational:
        msgs = _messages(value, where, key)
        if len(msgs) != 1 or msgs[0]["role"] != "assistant":
            raise ValueError(f"{where}: {key!r} must be one assistant message, "
                             f"found roles {[m['role'] for m in msgs]}")
        text = msgs[0]["content"]
    elif not isinstance(value, str):
        raise ValueError(f"{where}: {key!r} must be a string (the prompt is one), "
                         f"found {type(value).__name__}")
    else:
        text = check_unicode(value, f"{where}: field {key!r}")
    if not text.strip():
        raise ValueError(f"{where}: {key!r} is empty; expected a non-empty response")
    return text


def extract_prompt(rec: dict) -> dict:
    """TRL's implicit-prompt form ({"chosen", "rejected"} that both start with the prompt) made
    explicit, as trl.data_utils.extract_prompt does: the longest common prefix (of messages, or of
    characters, less a space before the split) becomes the prompt, appended to any given one."""
    chosen, rejected = rec["chosen"], rec["rejected"]
    if type(chosen) is not type(rejected) or not isinstance(chosen, (str, list)):
        return rec
    idx = 0
    for idx in range(min(len(chosen), len(rejected))):
        if chosen[idx] != rejected[idx]:
            if isinstance(chosen, str) and idx and chosen[idx - 1] == " ":
                idx -= 1
            break
    head = rec.get("prompt", [] if isinstance(chosen, list) else "")
    if type(head) is not type(chosen):
        return rec
    return dict(rec, prompt=head + chosen[:idx], chosen=chosen[idx:], rejected=rejected[idx:])


def parse_pair(rec, where: str) -> PreferencePair:
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, found {type(rec).__name__}")
    missing = [k for k in ("chosen", "rejected") if k not in rec]
    if missing:
        raise ValueError(f"{where}: preference record is missing {missing}; expected keys "
                         f"'prompt', 'chosen', 'rejected', found {sorted(rec)}")
    implicit = "prompt" not in rec or (isinstance(rec["chosen"], list)
                                       and len(rec["chosen"]) > 1)
    if implicit:  # the prompt is inside chosen and rejected (TRL's implicit-prompt records)
        rec = extract_prompt(rec)
    prompt = rec["prompt"]
    conversational = isinstance(prompt, list)
    if conversational:
        prompt = _messages(prompt, where, "prompt")
        if prompt[-1]["role"] != "user":
            raise ValueError(f"{where}: the prompt's last message must be from the user, "
                             f"found {prompt[-1]['role']!r}")
    elif not isinstance(prompt, str):
        raise ValueError(f"{where}: 'prompt' must be a string or a list of messages, "
                         f"found {type(prompt).__name__}")
    else:
        prompt = check_unicode(prompt, f"{where}: field 'prompt'")
    chosen = _response(rec["chosen"], where, "chosen", conversational)
    rejected = _response(rec["rejected"], where, "rejected", conversational)
    meta = {k: v for k, v in rec.items()
            if k not in ("prompt", "chosen", "rejected") and isinstance(v, str)}
    return PreferencePair(where, prompt, chosen, rejected, meta)


def read_pairs(path: str | Path) -> list[PreferencePair]:
    """Every pair of one file (JSON array or JSONL)."""
    out = [parse_pair(rec, where) for where, rec in read_json_records(path, "preference file")]
    if not out:
        raise ValueError(f"{path}: no preference records found")
    return out


# --------------------------------------------------------------------------------------------------
# tokenizing and truncating


def prompt_ids(pair: PreferencePair, tokenizer, template: str) -> list[int]:
    """BOS + the prompt as the model sees it before a response: a standard prompt through
    format_prompt(template) ("none": as written), a conversation through chat_token_ids."""
    if pair.conversational:
        try:
            return chat_token_ids(tokenizer, template, pair.prompt)
        except ValueError as e:
            raise ValueError(f"{pair.source}: {e}") from None
    text = pair.prompt if template == "none" else format_prompt(template, pair.prompt)
    return [tokenizer.bos_id] + (tokenizer.encode(text, bos=False) if text else [])


def tokenize_pair(pair: PreferencePair, tokenizer, template: str, max_length: int,
                  max_prompt_length: int = 0) -> TokenizedPair | None:
    """The pair's ids under TRL's truncation (module docstring); None if the prompt leaves no
    room for a response token. max_length: ids per sequence (prompt + response), so a sequence
    has at most max_length − 1 positions with a target."""
    p = prompt_ids(pair, tokenizer, template)
    c = tokenizer.encode(pair.chosen, bos=False, eos=True)
    r = tokenizer.encode(pair.rejected, bos=False, eos=True)
    truncated = False
    if max_prompt_length and len(p) > max_prompt_length:  # keep BOS and the prompt's end
        p, truncated = p[:1] + p[len(p) - max_prompt_length + 1:], True
    room = max_length - len(p)
    if room < 1:
        return None
    truncated = truncated or len(c) > room or len(r) > room
    return TokenizedPair(p, c[:room], r[:room], truncated, pair)  # responses keep their start


def default_template(pairs: list[PreferencePair], configured: str, embedded: bool) -> str:
    """data.template if set; else "vicuna" for conversations, "alpaca" for the embedded set (the
    template the stdlib instructions train with), "none" (the prompt as written) otherwise."""
    if configured:
        if configured not in TEMPLATES:
            raise ValueError(f"unknown template {configured!r}; expected one of {list(TEMPLATES)}")
        return configured
    if pairs and pairs[0].conversational:
        return "vicuna"
    return "alpaca" if embedded else "none"


@dataclass
class PreferenceData:
    train: list[TokenizedPair]
    test: list[TokenizedPair]
    template: str
    max_length: int
    n_truncated: int
    n_dropped: int

    def summary(self) -> str:
        return (f"preference data: {len(self.train):,d} train / {len(self.test):,d} test pairs, "
                f"template {self.template}, max_length {self.max_length}; "
                f"truncated {self.n_truncated}, dropped {self.n_dropped} (prompt too long)")


def load_preference_data(paths, tokenizer, template: str, max_length: int,
                         max_prompt_length: int = 0, test_frac: float = 0.05, test_paths=None,
                         seed: int = 1337, embedded: bool = False) -> PreferenceData:
    """Read → split (a seeded permutation, or the test_paths files) → tokenize."""
    from minillm.data.instruct import split_examples

    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    pairs = [p for path in paths for p in read_pairs(path)]
    if test_paths is not None:
        train, test = pairs, [p for path in test_paths for p in read_pairs(path)]
    else:
        train, test = split_examples(pairs, test_frac, None, seed)
    template = default_template(pairs, template, embedded)
    tok = {}
    for split, items in (("train", train), ("test", test)):
        tok[split] = [tokenize_pair(p, tokenizer, template, max_length, max_prompt_length)
                      for p in items]
    dropped = sum(t is None for ts in tok.values() for t in ts)
    tok = {s: [t for t in ts if t is not None] for s, ts in tok.items()}
    if not tok["train"]:
        raise ValueError(f"{paths[0]}: every pair's prompt fills max_length={max_length}; "
                         f"raise block_size or set preference.max_prompt_length")
    truncated = sum(t.truncated for ts in tok.values() for t in ts)
    return PreferenceData(tok["train"], tok["test"], template, max_length, truncated, dropped)


# --------------------------------------------------------------------------------------------------
# batches: [chosen; rejected]


def collate_pairs(rows: list[TokenizedPair], pad_id: int, pad_to: int | None = None):
    """B pairs → x, y (2B, T): rows 0..B-1 the chosen sequences, B..2B-1 the rejected, right-padded
    (x with pad_id, y with -100); y is −100 on the prompt. T = the longest, or pad_to."""
    seqs = [(t.prompt_ids, t.chosen_ids) for t in rows] + [(t.prompt_ids, t.rejected_ids)
                                                          for t in rows]
    T = max(max(len(p) + len(r) - 1 for p, r in seqs), pad_to or 0)
    x = torch.full((len(seqs), T), pad_id, dtype=torch.long)  # (2B, T)
    y = torch.full((len(seqs), T), IGNORE, dtype=torch.long)  # (2B, T)
    for b, (p, r) in enumerate(seqs):
        ids = p + r
        x[b, :len(ids) - 1] = torch.tensor(ids[:-1])
        y[b, len(p) - 1:len(ids) - 1] = torch.tensor(r)  # position len(p)-1 predicts r[0]
    return x, y


def get_preference_batch(pairs: list[TokenizedPair], batch_size: int, generator: torch.Generator,
                         pad_id: int, pad_to: int | None = None, rank: int = 0,
                         world_size: int = 1):
    """A random batch of pairs → (x (2B/W, T), y (2B/W, T), index (B/W,)): the indices into
    `pairs` (a precomputed reference table is looked up by them). A pure function of the
    generator's state; every rank draws the same B indices and keeps its B/W."""
    per_rank = batch_size // world_size
    ix = torch.randint(len(pairs), (batch_size,), generator=generator)  # (B,)
    ix = ix[rank * per_rank:(rank + 1) * per_rank]
    x, y = collate_pairs([pairs[i] for i in ix.tolist()], pad_id, pad_to)
    return x, y, ix


def iter_pair_batches(pairs: list[TokenizedPair], batch_size: int,
                      pad_id: int) -> Iterator[tuple]:
    """The pairs in order, batch_size at a time → (x, y, index), for eval and precomputing."""
    for i in range(0, len(pairs), batch_size):
        x, y = collate_pairs(pairs[i:i + batch_size], pad_id)
        yield x, y, torch.arange(i, min(i + batch_size, len(pairs)))


# --------------------------------------------------------------------------------------------------
# the embedded preference set, from the stdlib questions (data/stdlib_qa.py)


def _pick(options: list[str], key: str, avoid: str) -> str | None:
    """A deterministic choice from `options` other than `avoid` (crc32 of key)."""
    options = [o for o in options if o != avoid]
    return options[zlib.crc32(key.encode()) % len(options)] if options else None


def wrong_answer(rec: dict, modules: list[str], arg_lists: list[str]) -> str | None:
    """A plausible wrong answer to a stdlib question: for "module", another module (a sibling in
    the same package when there is one); for "signature", the name with another symbol's
    arguments (a mangled signature). None for other kinds."""
    if rec["kind"] == "module":
        package = rec["output"].rpartition(".")[0]
        siblings = [m for m in modules if package and m.rpartition(".")[0] == package]
        return _pick(siblings if len(siblings) > 1 else modules, rec["name"], rec["output"])
    if rec["kind"] == "signature":
        name, _, args = rec["output"].partition("(")
        other = _pick(arg_lists, rec["name"], args)
        return None if other is None else f"{name}({other}"
    return None


def stdlib_pairs(records: list[dict]) -> list[dict]:
    """TRL standard records {"prompt", "chosen", "rejected", "kind", "name"} from the stdlib
    question records: chosen the right answer, rejected a plausible wrong one."""
    modules = sorted({r["output"] for r in records if r["kind"] == "module"})
    arg_lists = sorted({r["output"].partition("(")[2] for r in records if r["kind"] == "signature"})
    out = []
    for r in records:
        wrong = wrong_answer(r, modules, arg_lists)
        if wrong is not None:
            out.append(dict(prompt=r["instruction"], chosen=r["output"], rejected=wrong,
                            kind=r["kind"], name=r["name"]))
    return out


def build_stdlib_preferences(cache_dir: str | Path) -> tuple[Path, Path]:
    """stdlib_pref_{train,test}.jsonl under cache_dir (atomic), from the stdlib question set and
    its held-out symbols; rebuilt when the question files change (their sha256 is in the name's
    record, stdlib_pref_meta.json)."""
    from minillm.data.stdlib_qa import build_stdlib_dataset

    ds = build_stdlib_dataset(Path(cache_dir))
    cache_dir = Path(cache_dir)
    paths = cache_dir / "stdlib_pref_train.jsonl", cache_dir / "stdlib_pref_test.jsonl"
    meta_path = cache_dir / "stdlib_pref_meta.json"
    key = {"train_sha256": ds.meta["train_sha256"], "test_sha256": ds.meta["test_sha256"]}
    if meta_path.is_file() and all(p.is_file() for p in paths):
        if json.loads(meta_path.read_text()) == key:
            return paths
    for src, dst in ((ds.train_path, paths[0]), (ds.test_path, paths[1])):
        records = [json.loads(line) for line in src.read_text().splitlines() if line]
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in stdlib_pairs(records))
        atomic_write_bytes(dst, data.encode())
    atomic_write_bytes(meta_path, (json.dumps(key) + "\n").encode())
    return paths

