"""The pieces of the real-model tour (minillm/tour_real.py) and of the fine-tune it runs
(configs/smollm2-*.toml), each on tiny inputs with exact expected values: the held-out questions it
picks, its before/after table, data.kinds, the training sample asked in the run's own chat
template, the module multiple choice in a Jinja template, and the adapter naming its base by hub id.
The whole tour on the real model runs in tests/test_tour.py (the README's CI cell)."""

import json
from pathlib import Path

import pytest

from minillm.data.chat_template import JinjaTemplate
from minillm.data.instruct import Example, load_instruct_data, prompt_text
from minillm.eval.harness import module_choice_examples
from minillm.formats.known_models import base_model_name
from minillm.tour_real import held_out_questions, table
from minillm.training.config import load_config
from minillm.training.loop import InstructExamples

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def records(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(dict(instruction=q, input="", output=a, kind=k, name=q))
                            + "\n" for q, a, k in rows))
    return path


def test_held_out_questions_keep_file_order_per_kind(tmp_path):
    path = records(tmp_path / "test.jsonl", [("m1", "a", "module"), ("d1", "x", "describe"),
                                            ("s1", "f()", "signature"), ("m2", "b", "module"),
                                            ("m3", "c", "module")])
    got = held_out_questions(path, 2)
    assert {k: [e.instruction for e in v] for k, v in got.items()} == {
        "module": ["m1", "m2"], "signature": ["s1"]}


def test_before_after_table():
    def numbers(exact, has, acc, norm, loss):
        return {"module": {"exact": exact, "contains": has, "n": 72},
                "signature": {"exact": exact / 2, "contains": has / 2, "n": 101},
                "mc": {"acc": acc, "acc_norm": norm, "n": 72}, "loss": loss}

    got = table(numbers(0.0, 0.05, 0.25, 0.5, 4.5), numbers(0.25, 0.375, 0.5, 0.625, 2.25),
                {"kl": 0.0123, "top1": 0.955})
    assert got.splitlines() == [
        "| | SmolLM2-135M-Instruct | + LoRA | change |",
        "|---|---|---|---|",
        "| module exact (72 held-out) | 0.0% | 25.0% | +25.0 pts |",
        "| module contains (72 held-out) | 5.0% | 37.5% | +32.5 pts |",
        "| signature exact (101 held-out) | 0.0% | 12.5% | +12.5 pts |",
        "| signature contains (101 held-out) | 2.5% | 18.8% | +16.2 pts |",
        "| module multiple choice acc (72, chance 25%) | 25.0% | 50.0% | +25.0 pts |",
        "| module multiple choice acc_norm (72, chance 25%) | 50.0% | 62.5% | +12.5 pts |",
        "| held-out loss (answer tokens) | 4.5000 | 2.2500 | -2.2500 |",
        "| KL tuned → q4_k_m GGUF (nats/token), top-1 agreement | – | 0.0123, 95.5% |  |",
    ]


def test_real_model_configs():
    for name, method, dora in (("lora", "lora", False), ("qlora", "qlora", False),
                               ("dora", "lora", True)):
        cfg = load_config(CONFIGS / f"smollm2-{name}.toml")
        assert (cfg.init_from, cfg.out_dir) == ("smollm2-135m-instruct", f"out/smollm2-{name}")
        assert (cfg.finetune.method, cfg.finetune.use_dora) == (method, dora)
        assert (cfg.data.format, cfg.data.corpus, cfg.data.template) == ("instruct", "stdlib", "")
        assert cfg.data.kinds == ["module", "signature"] and cfg.dtype == "auto"
        assert (cfg.finetune.lora_r, cfg.finetune.lora_alpha, cfg.finetune.lora_dropout) == (
            16, 32.0, 0.0)
        assert (cfg.schedule.total_steps, cfg.schedule.max_lr, cfg.batch_size) == (150, 1e-3, 16)


class Chars:
    """Characters as ids (enough for load_instruct_data's alpaca path)."""
    bos_id, eos_id, pad_id = 0, 1, 2

    def encode(self, text, bos=True, eos=False):
        return [self.bos_id] * bos + [3 + ord(c) % 200 for c in text] + [self.eos_id] * eos


def test_kinds_keep_only_those_records_in_train_and_test(tmp_path):
    train = records(tmp_path / "train.jsonl", [("m1", "a", "module"), ("d1", "x", "describe"),
                                               ("s1", "f()", "signature")])
    test = records(tmp_path / "test.jsonl", [("d2", "y", "describe"), ("m2", "b", "module")])
    data = load_instruct_data(train, Chars(), "alpaca", test_paths=test, kinds=["module"])
    assert [e.example.instruction for e in data.train] == ["m1"]
    assert [e.example.instruction for e in data.test] == ["m2"]
    every = load_instruct_data(train, Chars(), "alpaca", test_paths=test, kinds=[])
    assert (len(every.train), len(every.test)) == (3, 2)
    with pytest.raises(ValueError) as e:
        load_instruct_data(train, Chars(), "alpaca", test_paths=test, kinds=["modules"])
    assert str(e.value) == (f"{train}: no example of kind modules (data.kinds); the records' kinds "
                            "are describe, module, signature")


def test_training_sample_is_asked_in_the_runs_own_template():
    jinja = JinjaTemplate(CHATML, "the model's own")
    cfg = load_config(CONFIGS / "smollm2-lora.toml")
    data = InstructExamples(cfg, Chars(), [], [], template=jinja)
    assert data.prompt("Which module defines `dumps`?") == (
        "<|im_start|>user\nWhich module defines `dumps`?<|im_end|>\n<|im_start|>assistant\n")
    alpaca = InstructExamples(cfg, Chars(), [], [], template="alpaca")
    assert alpaca.prompt("Hi").endswith("### Instruction:\nHi\n\n### Response:\n")


def test_module_choices_in_a_jinja_template():
    rec = dict(instruction="Which module defines `dumps`?", output="json", kind="module",
               name="json.dumps")
    jinja = JinjaTemplate(CHATML, "the model's own")
    [mc] = module_choice_examples([rec], ["json", "os", "re", "sys", "ast"], 4, jinja)
    assert mc.context == prompt_text(Example("alpaca", "x", instruction=rec["instruction"]), jinja)
    assert mc.context.startswith("<|im_start|>user\n") and mc.target_delimiter == ""
    assert len(mc.choices) == 4 and mc.choices[mc.answer] == "json"
    [plain] = module_choice_examples([rec], ["json", "os", "re", "sys", "ast"], 4)
    assert plain.choices == mc.choices and plain.context.endswith("### Response:\n")


def test_an_adapter_names_a_known_base_by_its_hub_id():
    assert base_model_name("smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model_name("out/tiny") == "out/tiny"
