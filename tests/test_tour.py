"""The tour (`python -m minillm.tour --quick`) runs the whole path end to end, and every artifact it
reports is real: checkpoints and adapters load, the adapter reproduces the merged model, the reports
have their rows, the GGUF files read back with the right types and generate text through minillm.

The tour runs once, as a subprocess like a user's command (without the TRITON_INTERPRET the conftest
sets: on a CPU the NF4 layers then take the PyTorch path; with OMP_NUM_THREADS=1, which keeps a busy
CI machine from OpenMP oversubscription); the tests below inspect what it wrote.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from real_model import smollm2_gguf

from minillm.finetune.nf4_linear import nf4_hook
from minillm.finetune.peft_io import load_adapter
from minillm.formats.gguf_reader import read_gguf, sentencepiece_model_from_gguf
from minillm.formats.load import load_pretrained
from minillm.generate.decode import generate_tokens
from minillm.generate.sampling import SamplingConfig
from minillm.model import Llama
from minillm.tokenizer.sentencepiece import Tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tour(tmp_path_factory):
    out = tmp_path_factory.mktemp("tour")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "minillm.tour", "--quick", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"tour failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    summary = json.loads((out / "summary.json").read_text())
    return dict(out=out, stdout=proc.stdout, summary=summary)


def test_tour_prints_every_stage_and_the_summary_table(tour):
    text = tour["stdout"]
    for n in range(1, 8):
        assert f"[tour {n}/7]" in text
    assert "| model | held-out loss | perplexity | exact | contains |" in text
    for label in ("base (pretrained on code)", "LoRA r=16", "QLoRA r=16 (NF4 base)", "GGUF q8_0",
                  "GGUF q4_0"):
        assert label in text
    assert "python train.py --out_dir" in text and "llama-cli -m" in text


def test_summary_numbers(tour):
    s = tour["summary"]
    assert s["quick"] is True and s["n_eval_examples"] == 64
    assert math.isfinite(s["pretrain_val_loss"]) and 0 < s["pretrain_val_loss"] < math.log(1024) + 1
    for name in ("base", "lora", "qlora", "gguf_q8_0", "gguf_q4_0"):
        loss = s["models"][name]["loss"]
        assert math.isfinite(loss) and loss > 0, (name, loss)
    for name in ("base", "lora", "qlora"):
        m = s["models"][name]
        assert 0 <= m["exact"] <= m["contains"] <= 1 and m["n_short"] == 4
        assert math.isclose(m["ppl"], math.exp(m["loss"]), rel_tol=1e-9)
    # 16 module questions under --quick
    for name in ("base", "lora", "qlora", "gguf_q8_0", "gguf_q4_0"):
        m = s["models"][name]
        assert all(0 <= m[k] <= 1 and float(16 * m[k]).is_integer()
                   for k in ("mc_acc", "mc_acc_norm")), m
    # quantizing the merged LoRA model changes its loss a little: q8_0 less than q4_0
    lora = s["models"]["lora"]["loss"]
    assert abs(s["models"]["gguf_q8_0"]["loss"] - lora) < 0.05
    assert abs(s["models"]["gguf_q4_0"]["loss"] - lora) < 0.5
    assert set(s["seconds"]) >= {"pretrain", "lora", "qlora", "evaluate", "export", "generate",
                                 "total"}


def test_checkpoints_and_adapters_load(tour):
    a = tour["summary"]["artifacts"]
    x = torch.randint(3, 1024, (2, 16))
    models = {k: Llama.from_pretrained(a[k]) for k in ("base", "lora", "qlora")}
    for m in models.values():
        assert m.config.vocab_size == 1024 and m.config.dim == 128
    for method in ("lora", "qlora"):
        cfg = json.loads((Path(a[f"{method}_adapter"]) / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["r"] == 16
        # base + adapter (unmerged, LoRALinear) computes what the exported merged model computes
        hook = nf4_hook(compute_dtype=torch.float32) if method == "qlora" else None
        base = load_pretrained(a["base"], linear_hook=hook)
        names = load_adapter(base, a[f"{method}_adapter"])
        assert len(names) == 4 * 7  # every projection of the 4 layers
        with torch.no_grad():
            torch.testing.assert_close(base(x)[0], models[method](x)[0], atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # and fine-tuning changed the model
        assert (models["lora"](x)[0] - models["base"](x)[0]).abs().max() > 1e-3


def test_reports_have_a_row_per_question(tour):
    for method in ("lora", "qlora"):
        text = Path(tour["summary"]["artifacts"][f"report_{method}"]).read_text(encoding="utf-8")
        assert text.startswith(f"# Base vs {method.upper()}")
        assert "| held-out loss |" in text and "| exact match |" in text
        rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
        assert len(rows) == 4, rows
        assert all("Which module defines" in r or "signature" in r for r in rows)


@pytest.mark.parametrize("outtype,ggml_type,file_type", [("q8_0", 8, 7), ("q4_0", 2, 2)])
def test_gguf_files_read_back_and_generate(tour, outtype, ggml_type, file_type):
    path = Path(tour["summary"]["artifacts"][f"gguf_{outtype}"])
    g = read_gguf(path)
    assert (g.metadata["general.architecture"] == "llama"
            and g.metadata["general.file_type"] == file_type)
    assert g.tensors["blk.0.attn_q.weight"].ggml_type == ggml_type
    assert g.tensors["blk.0.attn_norm.weight"].ggml_type == 0  # norms stay F32
    assert len(g.metadata["tokenizer.ggml.tokens"]) == 1024
    model = Llama.from_pretrained(path)
    tok = Tokenizer(model_bytes=sentencepiece_model_from_gguf(g))
    ids = list(generate_tokens(model, tok.encode("def parse(", bos=True),
                               SamplingConfig(max_new_tokens=12, temperature=0.0, top_k=None)))
    assert len(ids) == 12 and all(0 <= i < 1024 for i in ids)
    assert isinstance(tok.decode(ids), str)
    assert f"→ {tour['summary']['models'][f'gguf_{outtype}']['answer']!r}" in tour["stdout"]


def test_tour_help_documents_every_flag():
    proc = subprocess.run([sys.executable, "-m", "minillm.tour", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for flag in ("--out", "--quick", "--base", "--device", "--eval-examples", "--short-answers"):
        assert flag in proc.stdout
    assert "--real" in proc.stdout


# --------------------------------------------------------------------------------------------------
# the real-model tour (minillm/tour_real.py) on SmolLM2-135M-Instruct, shrunk: 2 steps, 3 questions


def test_real_tour_end_to_end(tmp_path):
    gguf = smollm2_gguf()  # skips, saying how to fetch it, when the model is not downloaded
    out = tmp_path / "real"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "minillm.tour", "--real", "--steps", "2",
                           "--questions", "3", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"tour failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    for n in range(1, 9):
        assert f"[real tour {n}/8]" in proc.stdout
    assert "| | SmolLM2-135M-Instruct | + LoRA | change |" in proc.stdout
    assert f"llama-cli -m {out / 'smollm2-lora-q4_k_m.gguf'}" in proc.stdout
    s = json.loads((out / "summary.json").read_text())
    for when in ("before", "after"):
        for kind in ("module", "signature"):
            r = s[when][kind]
            assert r["n"] == 3 and 0 <= r["exact"] <= r["contains"] <= 1
            assert len(r["answers"]) == 3 and all(a["prediction"] for a in r["answers"])
        assert s[when]["mc"]["n"] == 3 and math.isfinite(s[when]["loss"])
    # two steps of LoRA already lower the held-out loss on the answers (4.5 nats before)
    assert s["after"]["loss"] < s["before"]["loss"]
    assert 0 <= s["kl_q4_k_m"] < 1 and 0.5 < s["top1_q4_k_m"] <= 1
    config = json.loads((out / "lora" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    shipped = read_gguf(out / "smollm2-lora-q4_k_m.gguf")
    assert shipped.metadata["tokenizer.ggml.model"] == "gpt2"
    assert shipped.metadata["tokenizer.chat_template"] == read_gguf(gguf).metadata[
        "tokenizer.chat_template"]
