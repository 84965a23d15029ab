"""Instruction data for supervised fine-tuning: read → validate → template → tokenize with a loss
mask → split → batch (padded, or packed with a block-diagonal attention mask).

Formats (one JSON array, or JSONL with one object per line;
detected per file from the first record):

    alpaca      {"instruction": str, "input": str (optional, may be ""), "output": str}
    sharegpt    {"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}
                (an optional system turn first, then human/gpt alternating, ending with gpt)
    completion  {"text": str}                       (plain text, every token trained)

Bad data raises one ValueError naming the file and the JSONL line (`data.jsonl:7`) or the array
index (`data.json[6]`) and what was expected: invalid JSON, a missing or non-string field, an empty
response, an unknown role.

Tokens and labels. An example is a list of segments (text, is_response) from templates.py; each
segment is encoded on its own, so the prompt tokens are exactly those `generate` will be given:

    ids    = BOS  prompt…          response… EOS
    labels = -100 -100 … -100      response… EOS  (train_on_inputs=True: labels = ids, BOS excepted)
    x = ids[:-1], y = labels[1:]   so y[t] is the target of position t,
                                   and -100 positions add no loss

Truncation to max_seq_len (the number of positions T the model sees, so ≤ max_seq_len + 1 ids): keep
BOS and the last max_seq_len ids, i.e. cut the prompt from its start first, then the start of the
response; the response's end and its EOS always survive (a model that never sees EOS never learns to
stop). Truncated examples are counted in `InstructData.n_truncated`.

Padding: x is padded with pad_id, y with -100; pads come after the real tokens, so causal attention
never lets a real token see them, and the loss ignores them.

Packing: examples are concatenated into rows of ≤ max_seq_len positions, each as its own (x, y)
pair, so no position's target is the next example's first token; the attention mask is
block-diagonal and causal

    mask[b, 0, i, j] = doc[i] == doc[j] and j <= i       (B, 1, T, T), True = may attend

so neither attention nor loss crosses examples. RoPE makes attention depend only on relative
positions, so a packed example's logits equal its unpacked logits (up to float rounding).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minillm.data.chat_template import template_segments, template_token_ids
from minillm.data.templates import TEMPLATES, as_jinja, conversation_segments, format_prompt
from minillm.util.fileio import check_unicode, read_json_records

FORMATS = ("alpaca", "sharegpt", "completion")
IGNORE = -100
ROLES = ("system", "human", "gpt")


@dataclass
class Example:
    kind: str  # one of FORMATS
    source: str  # "file:line" (JSONL) or "file[index]" (JSON array), for error messages
    instruction: str = ""
    input: str = ""
    output: str = ""  # alpaca: the response
    turns: list[tuple[str, str]] = field(default_factory=list)  # sharegpt: (role, text), human/gpt
    system: str | None = None  # sharegpt: the system turn, if any
    text: str = ""  # completion
    meta: dict = field(default_factory=dict)  # other string fields of the record (e.g. "kind")


@dataclass
class TokenizedExample:
    ids: list[int]  # BOS + prompt + response + EOS, after truncation (n ≤ max_seq_len + 1)
    labels: list[int]  # ids, or -100 where no loss is wanted
    truncated: bool
    example: Example


# --------------------------------------------------------------------------------------------------
# reading and validating


def detect_format(rec: dict, where: str) -> str:
    if "conversations" in rec:
        return "sharegpt"
    if "instruction" in rec:
        return "alpaca"
    if "text" in rec:
        return "completion"
    raise ValueError(f"{where}: cannot tell the data format; expected a key 'instruction' "
                     "(Alpaca), 'conversations' (ShareGPT) or 'text' (completion), "
                     f"found keys {sorted(rec)}")


def _string(rec: dict, key: str, where: str, kind: str, required: bool = True,
            nonempty: bool = False) -> str:
    if key not in rec or rec[key] is None:
        if required:
            raise ValueError(f"{where}: {kind} record is missing the string field {key!r}")
        return ""
    value = rec[key]
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {key!r} must be a string, found {type(value).__name__}")
    if nonempty and not value.strip():
        raise ValueError(f"{where}: field {key!r} is empty; expected a non-empty response")
    return check_unicode(value, f"{where}: field {key!r}")


def parse_record(rec, kind: str, where: str) -> Example:
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, found {type(rec).__name__}")
    if kind == "alpaca":
        known = ("instruction", "input", "output")
        ex = Example("alpaca", where,
                     instruction=_string(rec, "instruction", where, kind, nonempty=True),
                     input=_string(rec, "input", where, kind, required=False),
                     output=_string(rec, "output", where, kind, nonempty=True))
    elif kind == "completion":
        known = ("text",)
        ex = Example("completion", where, text=_string(rec, "text", where, kind, nonempty=True))
    elif kind == "sharegpt":
        known = ("conversations",)
        ex = Example("sharegpt", where)
        conv = rec.get("conversations")
        if not isinstance(conv, list) or not conv:
            raise ValueError(f"{where}: 'conversations' must be a non-empty list of turns, "
                             f"found {conv!r:.60}")
        for i, turn in enumerate(conv):
            at = f"{where}: conversations[{i}]"
            if not isinstance(turn, dict):
                raise ValueError(f"{at}: expected an object {{'from': ..., 'value': ...}}, "
                                 f"found {turn!r:.60}")
            role = turn.get("from")
            if role not in ROLES:
                raise ValueError(f"{at}: unknown role {role!r}; expected one of {list(ROLES)}")
            value = _string(turn, "value", at, kind, nonempty=role == "gpt")
            if role == "system":
                if i != 0:
                    raise ValueError(f"{at}: a 'system' turn may only come first")
                ex.system = value
                continue
            expected = "human" if len(ex.turns) % 2 == 0 else "gpt"
            if role != expected:
                raise ValueError(f"{at}: role {role!r} out of order; expected {expected!r} "
                                 "(turns alternate human, gpt)")
            ex.turns.append((role, value))
        if not ex.turns or ex.turns[-1][0] != "gpt":
            raise ValueError(f"{where}: the conversation must end with a 'gpt' turn "
                             "(the response to train on)")
    else:
        raise ValueError(f"unknown data format {kind!r}; expected 'auto' or one of {list(FORMATS)}")
    ex.meta = {k: v for k, v in rec.items() if k not in known and isinstance(v, str)}
    return ex


def read_examples(path: str | Path, fmt: str = "auto") -> list[Example]:
    """All examples of one file; fmt "auto" detects the format from the first record."""
    path = Path(path)  # read_json_records names a missing file, a directory, a device
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; expected 'auto' or one of {list(FORMATS)}")
    out, kind = [], None if fmt == "auto" else fmt
    for where, rec in read_json_records(path, "instruction data file"):
        if kind is None:
            if not isinstance(rec, dict):
                raise ValueError(f"{where}: expected a JSON object, found {type(rec).__name__}")
            kind = detect_format(rec, where)
        out.append(parse_record(rec, kind, where))
    if not out:
        raise ValueError(f"{path}: no examples found")
    return out


# --------------------------------------------------------------------------------------------------
# templating and tokenizing


def example_messages(ex: Example) -> list[dict]:
    """An alpaca or sharegpt example as chat messages, for a Jinja template (a model's own): the
    instruction (+ "\n\n" + input) is the user's, the output the assistant's."""
    if ex.kind == "alpaca":
        user = f"{ex.instruction}\n\n{ex.input}" if ex.input else ex.instruction
        return [{"role": "user", "content": user}, {"role": "assistant", "content": ex.output}]
    roles = {"human": "user", "gpt": "assistant"}
    system = [{"role": "system", "content": ex.system}] if ex.system else []
    return system + [{"role": roles[r], "content": text} for r, text in ex.turns]


def example_segments(ex: Example, template=None) -> list[tuple[str, bool]]:
    """[(text, is_response)]; template None picks the natural one:
    alpaca → "alpaca", sharegpt → "vicuna"; a Jinja template (a model's own, or "chatml") cuts its
    rendering (chat_template.template_segments)."""
    if ex.kind == "completion":
        return [(ex.text, True)]
    if (jinja := as_jinja(template)) is not None:
        return template_segments(jinja.source, example_messages(ex), where=jinja.where)
    if template is not None and template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; expected one of {list(TEMPLATES)}")
    if ex.kind == "alpaca":
        template = template or "alpaca"
        if template == "vicuna":
            user = f"{ex.instruction}\n\n{ex.input}" if ex.input else ex.instruction
            return conversation_segments([("human", user), ("gpt", ex.output)])
        return [(format_prompt(template, ex.instruction, ex.input), False), (ex.output, True)]
    try:
        return conversation_segments(ex.turns, template or "vicuna", ex.system)
    except ValueError as e:
        raise ValueError(f"{ex.source}: {e}") from None


def prompt_text(ex: Example, template: str | None = None) -> str:
    """The text to generate from for evaluation: everything before the last response."""
    segments = example_segments(ex, template)
    if ex.kind == "completion":
        return ""
    if ex.kind == "sharegpt" and len(segments) > 2:
        raise ValueError(f"{ex.source}: multi-turn conversations have no single prompt "
                         "to generate from")
    return segments[0][0]


def reference_text(ex: Example) -> str:
    """The answer the example trains on (the last gpt turn for a conversation)."""
    if ex.kind == "alpaca":
        return ex.output
    return ex.text if ex.kind == "completion" else ex.turns[-1][1]


def tokenize_example(ex: Example, tokenizer, template: str | None, max_seq_len: int,
                     train_on_inputs: bool = False) -> TokenizedExample:
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be >= 2, found {max_seq_len}")
    jinja = as_jinja(template)
    if jinja is not None and ex.kind != "completion":
        # the template writes BOS and the end of each turn itself; its mask says what is trained
        ids, trained = template_token_ids(tokenizer, jinja.source, example_messages(ex), False,
                                          jinja.where)
        labels = [i if (t or train_on_inputs) else IGNORE
                  for i, t in zip(ids, trained, strict=True)]
        labels[0] = IGNORE  # nothing predicts the first token
        head = []  # truncation keeps the end; the template's own start goes with the rest
    else:
        head = tokenizer.encode("")  # [BOS], or nothing for a tokenizer that adds none (SmolLM2)
        ids, labels = list(head), [IGNORE] * len(head)
        for text, is_response in example_segments(ex, template):
            t = tokenizer.encode(text, bos=False, eos=is_response)
            ids += t
            labels += t if (is_response or train_on_inputs) else [IGNORE] * len(t)
    keep = max_seq_len + 1  # ids for T = max_seq_len positions (x = ids[:-1], y = labels[1:])
    truncated = len(ids) > keep
    if truncated:  # [BOS] + the last ids: the prompt start goes first, EOS always stays
        n = len(head)
        ids, labels = ids[:n] + ids[-(keep - n):], labels[:n] + labels[-(keep - n):]
    return TokenizedExample(ids, labels, truncated, ex)


def split_examples(items: list, test_frac: float = 0.0, test_count: int | None = None,
                   seed: int = 1337) -> tuple[list, list]:
    """Deterministic split: a seeded permutation picks the test items;
    both splits keep file order."""
    n = len(items)
    k = test_count if test_count is not None else round(n * test_frac)
    if not 0 <= k < n:
        raise ValueError(f"split: test size {k} must be in [0, {n}) for {n} examples "
                         f"(test_frac={test_frac}, test_count={test_count})")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    test_idx = set(perm[:k].tolist())
    train = [x for i, x in enumerate(items) if i not in test_idx]
    return train, [x for i, x in enumerate(items) if i in test_idx]


def keep_kinds(examples: list[Example], kinds, paths) -> list[Example]:
    """The examples whose record "kind" is in `kinds` (all of them when kinds is empty); an error
    naming the files and the kinds they hold when none is left."""
    if not kinds:
        return examples
    kept = [ex for ex in examples if ex.meta.get("kind") in kinds]
    if not kept:
        found = sorted({str(ex.meta.get("kind")) for ex in examples})
        raise ValueError(f"{', '.join(map(str, paths))}: no example of kind "
                         f"{', '.join(kinds)} (data.kinds); the records' kinds are "
                         f"{', '.join(found)}")
    return kept


@dataclass
class InstructData:
    train: list[TokenizedExample]
    test: list[TokenizedExample]
    template: str | None
    max_seq_len: int
    n_truncated: dict  # {"train": count, "test": count}

    def summary(self) -> str:
        n_tok = sum(len(e.ids) - 1 for e in self.train)
        n_loss = sum(sum(1 for v in e.labels[1:] if v != IGNORE) for e in self.train)
        return (f"instruct data: {len(self.train):,d} train / {len(self.test):,d} test examples, "
                f"template {self.template or 'auto'}, max_seq_len {self.max_seq_len}; "
                f"train tokens {n_tok:,d} "
                f"({n_loss:,d} with loss); truncated {self.n_truncated['train']} train, "
                f"{self.n_truncated['test']} test")


def load_instruct_data(paths, tokenizer, template: str | None = None, fmt: str = "auto",
                       max_seq_len: int = 512, train_on_inputs: bool = False,
                       test_frac: float = 0.05, test_count: int | None = None, test_paths=None,
                       seed: int = 1337, kinds=None) -> InstructData:
    """Read `paths` (one or several files),
    split off a test set (or read it from `test_paths`), tokenize. `kinds`: keep only the records
    whose "kind" field is one of these (the stdlib set's describe / signature / module)."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    examples = keep_kinds([ex for p in paths for ex in read_examples(p, fmt)], kinds, paths)
    if test_paths is not None:
        test_paths = [test_paths] if isinstance(test_paths, (str, Path)) else list(test_paths)
        train = examples
        test = keep_kinds([ex for p in test_paths for ex in read_examples(p, fmt)], kinds,
                          test_paths)
    else:
        train, test = split_examples(examples, test_frac, test_count, seed)
    tok = {split: [tokenize_example(ex, tokenizer, template, max_seq_len, train_on_inputs)
                   for ex in exs]
           for split, exs in (("train", train), ("test", test))}
    n_truncated = {split: sum(e.truncated for e in exs) for split, exs in tok.items()}
    return InstructData(tok["train"], tok["test"], template, max_seq_len, n_truncated)


# --------------------------------------------------------------------------------------------------
# batches


def collate(rows: list[TokenizedExample], pad_id: int, pad_to: int | None = None):
    """One example per row → x (B, T) pad_id-padded, y (B, T) -100-padded;
    T = longest, or pad_to."""
    T = max(len(e.ids) - 1 for e in rows)
    T = max(T, pad_to or 0)
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (B, T)
    y = torch.full((len(rows), T), IGNORE, dtype=torch.long)  # (B, T)
    for b, e in enumerate(rows):
        n = len(e.ids) - 1
        x[b, :n] = torch.tensor(e.ids[:-1])
        y[b, :n] = torch.tensor(e.labels[1:])
    return x, y


def collate_packed(rows: list[list[TokenizedExample]], pad_id: int, pad_to: int | None = None):
    """Several examples per row → x, y (B, T) and the block-diagonal causal mask (B, 1, T, T)."""
    T = max(max(sum(len(e.ids) - 1 for e in row) for row in rows), pad_to or 0)
    B = len(rows)
    x = torch.full((B, T), pad_id, dtype=torch.long)
    y = torch.full((B, T), IGNORE, dtype=torch.long)
    doc = torch.full((B, T), -1, dtype=torch.long)  # example index within the row; pads share -1
    for b, row in enumerate(rows):
        t = 0
        for j, e in enumerate(row):
            n = len(e.ids) - 1
            x[b, t:t + n] = torch.tensor(e.ids[:-1])
            y[b, t:t + n] = torch.tensor(e.labels[1:])  # targets stay inside the example
            doc[b, t:t + n] = j
            t += n
    same = doc[:, :, None] == doc[:, None, :]  # (B, T, T)
    # (T, T); the diagonal keeps every row non-empty
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    return x, y, (same & causal)[:, None]  # (B, 1, T, T)


def get_instruct_batch(examples: list[TokenizedExample], batch_size: int,
                       generator: torch.Generator, pad_id: int, packing: bool = False,
                       max_seq_len: int | None = None, pad_to_max: bool = False, rank: int = 0,
                       world_size: int = 1):
    """A random batch → (x (B/W, T) long, y (B/W, T) long with -100,
    attn_mask (B/W, 1, T, T) or None).

    The batch is a pure function of the generator's state (save `generator.get_state()` to resume
    exactly). Unpacked: B indices from one torch.randint call. Packed: indices are drawn one at a
    time and appended to the current row while it has room for max_seq_len positions, else they open
    the next row; the draw that would open row B+1 is dropped. pad_to_max pads T to max_seq_len
    (fixed shapes for torch.compile). Data parallel: every rank draws the same global batch and
    keeps its B/W rows.
    """
    if not examples:
        raise ValueError("get_instruct_batch: no examples")
    if batch_size % world_size != 0 or not 0 <= rank < world_size:
        raise ValueError("get_instruct_batch: need batch_size % world_size == 0 "
                         "and 0 <= rank < world_size, "
                         f"found batch_size={batch_size}, world_size={world_size}, rank={rank}")
    if (packing or pad_to_max) and max_seq_len is None:
        raise ValueError("get_instruct_batch: packing and pad_to_max need max_seq_len")
    per_rank = batch_size // world_size
    pad_to = max_seq_len if pad_to_max else None
    if not packing:
        ix = torch.randint(len(examples), (batch_size,), generator=generator)  # (B,)
        ix = ix[rank * per_rank:(rank + 1) * per_rank].tolist()
        x, y = collate([examples[i] for i in ix], pad_id, pad_to)
        return x, y, None
    rows: list[list[TokenizedExample]] = []
    row, used = [], 0
    while True:
        e = examples[int(torch.randint(len(examples), (1,), generator=generator))]
        n = len(e.ids) - 1
        if n > max_seq_len:
            raise ValueError(f"get_instruct_batch: example {e.example.source} has {n} positions > "
                             f"max_seq_len={max_seq_len} (tokenize with the same max_seq_len)")
        if used + n > max_seq_len:
            rows.append(row)
            if len(rows) == batch_size:
                break
            row, used = [], 0
        row.append(e)
        used += n
    return collate_packed(rows[rank * per_rank:(rank + 1) * per_rank], pad_id, pad_to)


def iter_batches(examples: list[TokenizedExample], batch_size: int, pad_id: int) -> Iterator[tuple]:
    """The examples in order, `batch_size` at a time (the last batch may be smaller)
    → (x, y), for eval."""
    for i in range(0, len(examples), batch_size):
        yield collate(examples[i:i + batch_size], pad_id)
