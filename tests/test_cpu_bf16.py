"""dtype = "auto" on a CPU (util/device.py): bfloat16 autocast for training where the CPU multiplies
bfloat16 in hardware and the model is wide enough to gain, float32 everywhere else. Both paths are
tested on every machine: the CPU probes are replaced, not read."""

from __future__ import annotations

import io
import json

import pytest
import torch
from tiny import tiny_tokenizer, write_hf_checkpoint

from minillm.config import ModelConfig
from minillm.formats.load import model_width
from minillm.formats.native import save_model
from minillm.model import Llama
from minillm.ship.gguf_writer import write_gguf
from minillm.training.log import precision
from minillm.util import device as dev

CPU = torch.device("cpu")


@pytest.fixture
def x86(monkeypatch):
    """An x86 machine whose torch.cpu probes answer (amx, avx512_bf16)."""
    def set_probes(amx: bool, avx512_bf16: bool):
        monkeypatch.setattr(dev.platform, "machine", lambda: "x86_64")
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16,
                            raising=False)
    return set_probes


@pytest.mark.parametrize("amx, avx512_bf16, native", [
    (True, False, True), (False, True, True), (False, False, False)])
def test_x86_asks_torch_for_amx_and_avx512_bf16(x86, amx, avx512_bf16, native):
    x86(amx, avx512_bf16)
    assert dev.native_bf16_matmul() is native


@pytest.mark.parametrize("features, native", [
    ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp bf16 i8mm", True),  # Gv3
    ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp", False)])  # Gv2
def test_arm_reads_the_bf16_feature_of_cpuinfo(monkeypatch, features, native):
    monkeypatch.setattr(dev.platform, "machine", lambda: "aarch64")
    cpuinfo = f"processor\t: 0\nBogoMIPS\t: 2100.00\nFeatures\t: {features}\n"
    monkeypatch.setattr(dev, "open", lambda *a, **k: io.StringIO(cpuinfo), raising=False)
    assert dev.native_bf16_matmul() is native


def test_unreadable_cpuinfo_means_float32(monkeypatch):
    monkeypatch.setattr(dev.platform, "machine", lambda: "riscv64")

    def refuse(*args, **kwargs):
        raise PermissionError("/proc/cpuinfo")
    monkeypatch.setattr(dev, "open", refuse, raising=False)
    assert dev.native_bf16_matmul() is False


@pytest.mark.parametrize("amx, training, width, expected", [
    (True, True, 576, torch.bfloat16),   # SmolLM2-135M on a Xeon with AMX
    (True, True, 256, torch.bfloat16),   # the narrowest that gains
    (True, True, 128, torch.float32),    # the tiny model: bfloat16 measured 0.90x
    (True, True, None, torch.float32),   # width unknown
    (True, False, 576, torch.float32),   # generation and export stay float32 on a CPU
    (False, True, 576, torch.float32),   # an AMD EPYC without AVX512-BF16
])
def test_auto_on_a_cpu(x86, amx, training, width, expected):
    x86(amx, False)
    assert dev.pick_dtype("auto", CPU, training=training, width=width) == expected


def test_a_named_dtype_is_taken_as_named(x86):
    x86(False, False)
    assert dev.pick_dtype("bf16", CPU, training=True, width=32) == torch.bfloat16
    assert dev.pick_dtype("float32", CPU, training=True, width=4096) == torch.float32
    with pytest.raises(ValueError, match=r"dtype must be auto or one of .* found 'bf15'"):
        dev.pick_dtype("bf15", CPU)


def test_the_log_says_why_auto_chose(x86):
    x86(True, False)
    assert precision("auto", torch.bfloat16, CPU) == (
        "bfloat16 autocast (auto: this CPU multiplies bfloat16 in hardware)")
    assert precision("auto", torch.float32, CPU) == (
        "float32 (auto: this CPU multiplies bfloat16 in hardware, but a model narrower than 256 "
        "runs faster in float32)")
    assert precision("float32", torch.float32, CPU) == "float32"
    x86(False, False)
    assert precision("auto", torch.float32, CPU) == "float32"


CFG = ModelConfig(dim=48, n_layers=1, n_heads=2, n_kv_heads=2, hidden_dim=96, vocab_size=384,
                  max_seq_len=32)


def test_model_width_reads_each_format_without_weights(tmp_path):
    """The width is read from the config alone: each directory below has no weights at all after
    its config is written, except where the format keeps both in one file (GGUF)."""
    tok = tiny_tokenizer(tmp_path / "tok.model")
    model = Llama(CFG)
    save_model(model, tmp_path / "native")
    (tmp_path / "native" / "model.safetensors").unlink()
    write_hf_checkpoint(tmp_path / "hf", CFG, fmt="safetensors", tokenizer=tok)
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "params.json").write_text(json.dumps({"dim": 4096, "n_layers": 32}))
    write_gguf(tmp_path / "m.gguf", CFG, model.state_dict().items(), tok, "f32", progress=False)
    assert [model_width(tmp_path / d) for d in ("native", "hf", "meta", "m.gguf")] == [
        48, 48, 4096, 48]
    assert model_width(tmp_path) is None  # no config: load_pretrained says what is missing
    (tmp_path / "meta" / "params.json").write_text(json.dumps({"dim": "wide"}))
    assert model_width(tmp_path / "meta") is None
