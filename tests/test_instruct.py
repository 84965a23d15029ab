"""templates.py, instruct.py and data/stdlib_qa.py: formats, errors with file + line/index,
exact templates, label masks, truncation, padding, packing (packed logits == unpacked logits),
splits, the stdlib dataset."""

import json
import string
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny import CharTokenizer

sys.path.insert(0, str(Path(__file__).parent))
from tiny import STDLIB, tiny_tokenizer  # noqa: E402

from minillm.config import ModelConfig  # noqa: E402
from minillm.data.instruct import (  # noqa: E402
    collate,
    collate_packed,
    get_instruct_batch,
    iter_batches,
    load_instruct_data,
    read_examples,
    split_examples,
    tokenize_example,
)
from minillm.data.stdlib_qa import (  # noqa: E402
    build_stdlib_dataset,
    first_sentence,
    short_answer_subset,
    stdlib_records,
)
from minillm.data.templates import format_prompt  # noqa: E402
from minillm.model import Llama  # noqa: E402

TOK = CharTokenizer()
CFG = ModelConfig(
    dim=40, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=52, vocab_size=TOK.vocab_size,
    max_seq_len=64
)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def jsonl(path: Path, records) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in records))


# --------------------------------------------------------------------------------------------------
# templates


def test_alpaca_and_vicuna_templates_exact():
    assert format_prompt("alpaca", "Add the numbers.", "2 and 3") == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd the numbers.\n\n"
        "### Input:\n2 and 3\n\n### Response:\n"
    )
    assert (
        format_prompt("alpaca", "Say hi.")
        == format_prompt("alpaca", "Say hi.", "")
        == (
            "Below is an instruction that describes a task. Write a response that appropriately "
            "completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:\n"
        )
    )
    assert format_prompt("vicuna", "Hi?") == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the user's questions. USER: Hi? ASSISTANT:"
    )
    assert format_prompt("none", "Hi?", "x") == "Hi?\n\nx"
    assert format_prompt("chatml", "Hi?", "x") == (
        "<|im_start|>user\nHi?\n\nx<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="unknown template 'zephyr'"):
        format_prompt("zephyr", "Hi?")


# --------------------------------------------------------------------------------------------------
# formats and errors


def test_formats_autodetected(tmp_path):
    a = read_examples(
        write(
            tmp_path / "a.json",
            json.dumps(
                [
                    {"instruction": "I1", "input": "", "output": "O1"},
                    {"instruction": "I2", "input": "X2", "output": "O2", "category": "qa"},
                ]
            ),
        )
    )
    assert [(e.kind, e.instruction, e.input, e.output, e.source) for e in a] == [
        ("alpaca", "I1", "", "O1", f"{tmp_path}/a.json[0]"),
        ("alpaca", "I2", "X2", "O2", f"{tmp_path}/a.json[1]"),
    ]
    assert a[1].meta == {"category": "qa"}
    b = read_examples(
        write(
            tmp_path / "b.jsonl",
            '{"instruction": "I", "output": "O"}\n\n'
            '{"instruction": "J", "input": null, "output": "P"}\n',
        )
    )
    assert [(e.instruction, e.input, e.output, e.source) for e in b] == [
        ("I", "", "O", f"{tmp_path}/b.jsonl:1"),
        ("J", "", "P", f"{tmp_path}/b.jsonl:3"),
    ]
    s = read_examples(
        jsonl(
            tmp_path / "s.jsonl",
            [
                {
                    "conversations": [
                        {"from": "system", "value": "Be brief."},
                        {"from": "human", "value": "H1"},
                        {"from": "gpt", "value": "G1"},
                        {"from": "human", "value": "H2"},
                        {"from": "gpt", "value": "G2"},
                    ]
                }
            ],
        )
    )
    assert (s[0].kind, s[0].system, s[0].turns) == (
        "sharegpt",
        "Be brief.",
        [("human", "H1"), ("gpt", "G1"), ("human", "H2"), ("gpt", "G2")],
    )
    c = read_examples(jsonl(tmp_path / "c.jsonl", [{"text": "plain text"}]))
    assert (c[0].kind, c[0].text) == ("completion", "plain text")
    with pytest.raises(
        ValueError, match=r"c.jsonl:1: alpaca record is missing the string field 'instruction'"
    ):
        read_examples(tmp_path / "c.jsonl", fmt="alpaca")


BAD = [
    (
        "bad.jsonl",
        '{"instruction": "I", "output": "O"}\n{"instruction": "I", "output": \n',
        r"bad.jsonl:2: invalid JSON",
    ),
    (
        "bad.jsonl",
        '{"instruction": "I", "output": "O"}\n{"instruction": "I"}\n',
        r"bad.jsonl:2: alpaca record is missing the string field 'output'",
    ),
    (
        "bad.json",
        '[{"instruction": "I", "output": "O"}, {"instruction": 3, "output": "O"}]',
        r"bad.json\[1\]: field 'instruction' must be a string, found int",
    ),
    (
        "bad.json",
        '[{"instruction": "I", "output": "O"}, {"instruction": "I", "output": "  "}]',
        r"bad.json\[1\]: field 'output' is empty; expected a non-empty response",
    ),
    (
        "bad.jsonl",
        '{"conversations": [{"from": "human", "value": "H"}, {"from": "bot", "value": "G"}]}\n',
        r"bad.jsonl:1: conversations\[1\]: unknown role 'bot'; "
        r"expected one of \['system', 'human', 'gpt'\]",
    ),
    (
        "bad.jsonl",
        '{"conversations": [{"from": "human", "value": "H"}, {"from": "human", "value": "G"}]}\n',
        r"bad.jsonl:1: conversations\[1\]: role 'human' out of order; expected 'gpt'",
    ),
    (
        "bad.jsonl",
        '{"conversations": [{"from": "human", "value": "H"}]}\n',
        r"bad.jsonl:1: the conversation must end with a 'gpt' turn",
    ),
    (
        "bad.jsonl",
        '{"prompt": "P", "completion": "C"}\n',
        r"bad.jsonl:1: cannot tell the data format; expected a key 'instruction'",
    ),
    (
        "bad.json",
        '[{"text": "t"}, ["not", "an", "object"]]',
        r"bad.json\[1\]: expected a JSON object, found list",
    ),
]


@pytest.mark.parametrize("name,content,message", BAD)
def test_bad_data_errors_name_file_and_line(tmp_path, name, content, message):
    with pytest.raises(ValueError, match=message):
        read_examples(write(tmp_path / name, content))


@pytest.mark.parametrize("name,content,message", [
    ("bad.jsonl", b'{"text": "a"}\n{"text": "caf\xe9"}\n',  # byte 14 + len('{"text": "caf') = 27
     "bad.jsonl:2: not UTF-8 text (byte 0xe9 at offset 27)"),
    ("bad.json", b'[{"text": "\xff"}]', "bad.json:1: not UTF-8 text (byte 0xff at offset 11)"),
    ("bad.jsonl", b'{"text": "a"}\n' + b"[" * 100_000 + b"]" * 100_000 + b"\n",
     "bad.jsonl:2: invalid JSON (nested too deeply to parse)"),
    ("bad.json", b"[" * 100_000 + b"]" * 100_000,
     "bad.json: invalid JSON (nested too deeply to parse)"),
])
def test_undecodable_data_names_file_line_and_byte(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError) as e:
        read_examples(tmp_path / name)
    assert str(e.value) == f"{tmp_path}/{message}"


# --------------------------------------------------------------------------------------------------
# tokens and labels


def alpaca_example(tmp_path, instruction="ab", output="cd", name="e.jsonl"):
    return read_examples(jsonl(tmp_path / name,
                               [{"instruction": instruction, "output": output}]))[0]


def test_label_mask_exact_positions(tmp_path):
    ex = alpaca_example(tmp_path)
    t = tokenize_example(ex, TOK, "none", max_seq_len=32)
    a, b, c, d = (3 + string.printable.index(ch) for ch in "abcd")
    assert t.ids == [1, a, b, c, d, 2]
    assert t.labels == [-100, -100, -100, c, d, 2]
    x, y = collate([t], pad_id=0)
    assert x.tolist() == [[1, a, b, c, d]] and y.tolist() == [[-100, -100, c, d, 2]]
    t2 = tokenize_example(ex, TOK, "none", max_seq_len=32, train_on_inputs=True)
    assert t2.labels == [-100, a, b, c, d, 2]
    t3 = tokenize_example(ex, TOK, "alpaca", max_seq_len=512)
    prompt = format_prompt("alpaca", "ab")
    assert t3.ids == [1] + TOK.encode(prompt, bos=False) + [c, d, 2]
    assert t3.labels == [-100] * (1 + len(prompt)) + [c, d, 2]


def test_sharegpt_masks_every_human_turn(tmp_path):
    ex = read_examples(
        jsonl(
            tmp_path / "s.jsonl",
            [
                {
                    "conversations": [
                        {"from": "system", "value": "S"},
                        {"from": "human", "value": "h"},
                        {"from": "gpt", "value": "g"},
                        {"from": "human", "value": "i"},
                        {"from": "gpt", "value": "j"},
                    ]
                }
            ],
        )
    )[0]
    t = tokenize_example(ex, TOK, None, max_seq_len=64)
    p1, p2 = "S USER: h ASSISTANT:", "USER: i ASSISTANT:"
    g, j = TOK.encode("g", bos=False)[0], TOK.encode("j", bos=False)[0]
    assert t.ids == [1] + TOK.encode(p1, bos=False) + [g, 2] + TOK.encode(p2, bos=False) + [j, 2]
    assert t.labels == [-100] * (1 + len(p1)) + [g, 2] + [-100] * len(p2) + [j, 2]
    with pytest.raises(ValueError, match=r"s.jsonl:1: conversations need the multi-turn "
                                         r"template 'vicuna'"):
        tokenize_example(ex, TOK, "alpaca", max_seq_len=64)


def test_truncation_keeps_eos_and_is_counted(tmp_path):
    jsonl(
        tmp_path / "t.jsonl", [{"instruction": "x" * 30, "output": "yz"},
                               {"instruction": "s", "output": "t"}]
    )
    full = tokenize_example(read_examples(tmp_path / "t.jsonl")[0], TOK, "none", max_seq_len=100)
    data = load_instruct_data(tmp_path / "t.jsonl", TOK, template="none", max_seq_len=8,
                              test_frac=0.0)
    t = data.train[0]
    assert t.truncated and len(t.ids) == 9
    assert t.ids == [1] + full.ids[-8:] and t.ids[-1] == 2 and t.labels[-3:] == full.labels[-3:]
    assert data.n_truncated == {"train": 1, "test": 0} and not data.train[1].truncated
    assert "truncated 1 train, 0 test" in data.summary()


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return Llama(CFG).eval()


def some_examples(tmp_path, n=5):
    records = [{"instruction": "q" * (2 + 3 * i), "output": "a" * (1 + 2 * i) + str(i)}
               for i in range(n)]
    return load_instruct_data(
        jsonl(tmp_path / "d.jsonl", records), TOK, template="none", max_seq_len=40, test_frac=0.0
    ).train


def test_padding_is_ignored_by_the_loss(tmp_path):
    model, exs = tiny_model(), some_examples(tmp_path)[:3]
    x, y = collate(exs, TOK.pad_id)
    assert x.shape == (3, len(exs[2].ids) - 1) and (x[0, len(exs[0].ids) - 1 :] == TOK.pad_id).all()
    with torch.no_grad():
        _, loss = model(x, y)
        total, count = 0.0, 0
        for e in exs:  # each example alone, unpadded
            xi, yi = collate([e], TOK.pad_id)
            _, li = model(xi, yi)
            n = int((yi != -100).sum())
            total, count = total + li.item() * n, count + n
    torch.testing.assert_close(loss.item(), total / count, atol=1e-6, rtol=1e-6)


def test_packing_matches_unpacked_logits_and_loss(tmp_path):
    model, exs = tiny_model(), some_examples(tmp_path)
    g = torch.Generator().manual_seed(7)
    x, y, mask = get_instruct_batch(exs, 3, g, TOK.pad_id, packing=True, max_seq_len=40)
    assert mask.shape == (3, 1, x.shape[1], x.shape[1]) and mask.dtype == torch.bool
    # replay the draws to know which examples landed in row 0
    g2 = torch.Generator().manual_seed(7)
    row, used = [], 0
    while True:
        e = exs[int(torch.randint(len(exs), (1,), generator=g2))]
        if used + len(e.ids) - 1 > 40:
            break
        row.append(e)
        used += len(e.ids) - 1
    assert len(row) >= 2
    with torch.no_grad():
        logits, _ = model(x, y, mask=mask)
        t, unpacked_sum = 0, 0.0
        for e in row:
            n = len(e.ids) - 1
            xi, yi = collate([e], TOK.pad_id)
            li, _ = model(xi)
            torch.testing.assert_close(logits[0, t : t + n], li[0], atol=1e-5, rtol=1e-5)
            unpacked_sum += F.cross_entropy(li[0], yi[0], ignore_index=-100, reduction="sum").item()
            # the example's last target is its EOS, not the next BOS
            assert y[0, t + n - 1].item() == 2
            t += n
        packed_sum = F.cross_entropy(logits[0], y[0], ignore_index=-100, reduction="sum").item()
    # loss does not leak either
    torch.testing.assert_close(packed_sum, unpacked_sum, atol=1e-4, rtol=1e-6)
    assert (y != 1).all()  # no position ever predicts a BOS
    assert not mask[0, 0, t - 1, 0]  # the last example of the row cannot see the first


def test_packed_mask_is_block_diagonal_causal(tmp_path):
    exs = some_examples(tmp_path)[:2]  # 5 and 10 positions
    n0, n1 = len(exs[0].ids) - 1, len(exs[1].ids) - 1
    assert (n0, n1) == (5, 10)
    x, y, mask = collate_packed([[exs[0], exs[1]]], TOK.pad_id, pad_to=18)
    doc = [0] * n0 + [1] * n1 + [-1] * 3
    expected = [[doc[i] == doc[j] and j <= i for j in range(18)] for i in range(18)]
    assert mask[0, 0].tolist() == expected
    assert y[0, n0 + n1 :].eq(-100).all() and x[0, n0 + n1 :].eq(TOK.pad_id).all()


def test_batches_are_a_function_of_the_generator_state(tmp_path):
    exs = some_examples(tmp_path)
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    a = get_instruct_batch(exs, 4, g, 0)
    b = get_instruct_batch(exs, 4, g, 0, packing=True, max_seq_len=40, pad_to_max=True)
    g.set_state(state)
    a2 = get_instruct_batch(exs, 4, g, 0)
    b2 = get_instruct_batch(exs, 4, g, 0, packing=True, max_seq_len=40, pad_to_max=True)
    assert a[2] is None and torch.equal(a[0], a2[0]) and torch.equal(a[1], a2[1])
    assert b[0].shape == (4, 40) and all(torch.equal(u, v) for u, v in zip(b, b2, strict=True))
    r1 = get_instruct_batch(exs, 4, torch.Generator().manual_seed(3), 0, rank=1, world_size=2)
    assert torch.equal(r1[0], a[0][2:, : r1[0].shape[1]])
    assert [x.shape[0] for x, _ in iter_batches(exs, 2, 0)] == [2, 2, 1]


def test_split_is_deterministic(tmp_path):
    items = list(range(100))
    train, test = split_examples(items, test_frac=0.1, seed=3)
    assert (train, test) == split_examples(items, test_frac=0.1, seed=3)
    assert len(test) == 10 and sorted(train + test) == items and test == sorted(test)
    assert test != split_examples(items, test_frac=0.1, seed=4)[1]
    assert len(split_examples(items, test_count=7)[1]) == 7
    with pytest.raises(ValueError, match=r"test size 100 must be in \[0, 100\)"):
        split_examples(items, test_count=100)


def test_real_sentencepiece_alpaca_roundtrip(tmp_path):
    tok = tiny_tokenizer(tmp_path / "tok.model")
    ex = alpaca_example(tmp_path, "Which module defines `dumps`?", "json")
    t = tokenize_example(ex, tok, "alpaca", max_seq_len=256)
    prompt_ids = tok.encode(format_prompt("alpaca", ex.instruction), bos=True)
    assert t.ids[: len(prompt_ids)] == prompt_ids and t.ids[-1] == tok.eos_id
    assert tok.decode(t.ids[len(prompt_ids) : -1]) == "json"
    assert t.labels == [-100] * len(prompt_ids) + t.ids[len(prompt_ids) :]


# --------------------------------------------------------------------------------------------------
# the stdlib dataset


def test_stdlib_records_known_answers_and_determinism(tmp_path):
    root = tmp_path / "lib"
    (root / "json").mkdir(parents=True)
    for name in ("json/__init__.py", "json/decoder.py", "textwrap.py"):
        (root / name).write_text((STDLIB / name).read_text())
    (root / "_private.py").write_text("def f():\n    'Private.'\n")
    (root / "shapes.py").write_text(
        "class Point:\n    'A point in the plane. Immutable.'\n"
        "    def __init__(self, x, y=0):\n        pass\n"
    )
    records, stats = stdlib_records(root)
    assert records == stdlib_records(root)[0] and stats["modules"] == 4  # _private skipped
    by_question = {r["instruction"]: r for r in records}
    assert (
        by_question["Write the signature of `textwrap.wrap`."]["output"]
        == "wrap(text, width=70, **kwargs)"
    )
    assert by_question["Which module defines `dumps`?"]["output"] == "json"
    assert (
        by_question["What does `json.dumps` do?"]["output"]
        == "Serialize ``obj`` to a JSON formatted ``str``."
    )
    assert by_question["Write the signature of `shapes.Point`."]["output"] == "Point(x, y=0)"
    assert by_question["What does `shapes.Point` do?"]["output"] == "A point in the plane."
    assert "Which module defines `f`?" not in by_question
    assert first_sentence("Return the thing.  More text.\n\nDetails.") == "Return the thing."


def test_stdlib_dataset_build_and_cache(tmp_path):
    ds = build_stdlib_dataset(tmp_path, test_frac=0.05)
    train = read_examples(ds.train_path)
    test = read_examples(ds.test_path)
    assert len(train) > 3000 and len(test) > 100, (len(train), len(test))
    assert {e.meta["kind"] for e in train} == {"describe", "signature", "module"}
    # held out by symbol
    assert not {e.meta["name"] for e in train} & {e.meta["name"] for e in test}
    short = short_answer_subset(test)
    assert len(short) == ds.meta["n_test_short"] > 20 and all(len(e.output) <= 100 for e in short)
    mtime = ds.train_path.stat().st_mtime_ns
    again = build_stdlib_dataset(tmp_path, test_frac=0.05)  # cache hit: files untouched
    assert again.meta == ds.meta and ds.train_path.stat().st_mtime_ns == mtime
