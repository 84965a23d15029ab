"""TrainConfig loading: TOML overrides, command-line flags, and the errors for
unknown keys and types."""

import argparse
from pathlib import Path

import pytest

from minillm.config import ModelConfig
from minillm.training.config import (
    TrainConfig,
    add_config_flags,
    apply_overrides,
    load_config,
    resume_mismatches,
    save_config,
    to_dict,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path, text: str) -> Path:
    p = tmp_path / "run.toml"
    p.write_text(text)
    return p


def parse_flags(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    return vars(parser.parse_args(argv))


def test_toml_overrides_only_what_it_names(tmp_path):
    p = write(tmp_path, 'batch_size = 4\n[optim]\nweight_decay = 0.0\n[schedule]\nmax_lr = 1\n'
                        'name = "wsd"\n[finetune]\nlora_targets = ["q_proj", "o_proj"]\n')
    cfg = load_config(p)
    assert cfg.batch_size == 4 and cfg.optim.weight_decay == 0.0
    # TOML int widened to float
    assert cfg.schedule.max_lr == 1.0 and type(cfg.schedule.max_lr) is float
    assert cfg.schedule.name == "wsd" and cfg.finetune.lora_targets == ["q_proj", "o_proj"]
    default = TrainConfig()
    assert (cfg.block_size == default.block_size and cfg.model == default.model
            and cfg.optim.beta2 == 0.95)


@pytest.mark.parametrize("text, message", [
    ("batchsize = 4\n", r"run\.toml: unknown config key 'batchsize'"),
    ("[optim]\nlr = 3e-4\n", r"run\.toml: unknown config key 'optim\.lr' \('lr' is not a "
                             r"field of optim"),
    ("[modle]\ndim = 4\n", r"run\.toml: unknown config key 'modle\.dim'"),
    ("[model.dim]\nx = 1\n", r"run\.toml: unknown config key 'model\.dim\.x'"),
])
def test_unknown_keys_name_the_key_and_file(tmp_path, text, message):
    with pytest.raises(KeyError, match=message):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize("text, message", [
    ('batch_size = "4"\n', r"run\.toml: batch_size must be int, found str '4'"),
    ("batch_size = 4.0\n", r"run\.toml: batch_size must be int, found float 4\.0"),
    ("compile = 1\n", r"run\.toml: compile must be bool, found int 1"),
    ("[model]\nn_layers = true\n", r"run\.toml: model\.n_layers must be int, found bool True"),
    ('[finetune]\nlora_targets = "q_proj"\n', r"run\.toml: finetune\.lora_targets must be a "
                                              r"list of str"),
    ("model = 3\n", r"run\.toml: model is a section \(\[model\] in TOML\), found value 3"),
])
def test_wrong_types_name_the_key_and_file(tmp_path, text, message):
    with pytest.raises(TypeError, match=message):
        load_config(write(tmp_path, text))


def test_cross_field_checks_name_the_file(tmp_path):
    message = r"run\.toml: TrainConfig: block_size=512 exceeds model\.max_seq_len=256"
    with pytest.raises(ValueError, match=message):
        load_config(write(tmp_path, "block_size = 512\n"))
    with pytest.raises(ValueError, match=r"run\.toml: dtype must be one of .* found 'fp8'"):
        load_config(write(tmp_path, 'dtype = "fp8"\n'))
    with pytest.raises(ValueError, match=r"run\.toml: .*unknown schedule 'cosin'"):
        load_config(write(tmp_path, '[schedule]\nname = "cosin"\n'))
    with pytest.raises(ValueError, match=r"run\.toml: ModelConfig: dim=100 is not divisible "
                                         r"by n_heads=3"):
        load_config(write(tmp_path, "[model]\ndim = 100\nn_heads = 3\n"))
    with pytest.raises(ValueError, match=r"run\.toml: cannot parse"):
        load_config(write(tmp_path, "batch_size = \n"))


@pytest.mark.parametrize("key, value, message", [
    ("optim.weight_decay", -0.1, r"optim\.weight_decay must be >= 0 \(0: no decay\), found -0\.1"),
    ("optim.grad_clip", -1.0, r"optim\.grad_clip must be >= 0 \(0: no clipping\), found -1\.0"),
    ("optim.grad_clip", float("nan"), r"optim\.grad_clip must be >= 0 .*, found nan"),
    ("optim.beta1", 1.0, r"optim\.beta1 must be in \[0, 1\) .*, found 1\.0"),
    ("optim.beta2", -0.5, r"optim\.beta2 must be in \[0, 1\) .*, found -0\.5"),
    ("optim.eps", 0.0, r"optim\.eps must be > 0 .*, found 0\.0"),
    ("eval.iters", 0, r"eval\.iters must be >= 1, found 0"),
    ("eval.interval", -5, r"eval\.interval must be >= 0 \(0: only at the end\), found -5"),
    ("checkpoint.interval", -1, r"checkpoint\.interval must be >= 0 .*, found -1"),
    ("log.interval", 0, r"log\.interval must be >= 1, found 0"),
    ("cpu_threads", -2, r"cpu_threads must be >= 0 .*, found -2"),
    ("finetune.lora_alpha", 0.0, r"finetune\.lora_alpha must be > 0 .*, found 0\.0"),
    ("finetune.lora_alpha", -16.0, r"finetune\.lora_alpha must be > 0 .*, found -16\.0"),
    ("finetune.lora_r", 0, r"finetune\.lora_r must be >= 1, found 0"),
    ("schedule.max_lr", 0.0, r"ScheduleConfig\.max_lr must be > 0, found 0\.0"),
    ("schedule.max_lr", -1e-3, r"ScheduleConfig\.max_lr must be > 0, found -0\.001"),
    ("device", "gpu", r"device must be auto, cpu, cuda, cuda:N or mps, found 'gpu'"),
    ("device", "cuda:x", r"device must be auto, cpu, cuda, cuda:N or mps, found 'cuda:x'"),
    ("data.num_workers", -1, r"data\.num_workers must be >= 0, found -1"),
])
def test_values_that_make_no_sense_name_the_key_and_value(key, value, message):
    with pytest.raises(ValueError, match=r"^command line: " + message + "$"):
        load_config(None, {key: value})


def test_devices_that_are_accepted():
    for device in ("auto", "cpu", "cuda", "cuda:1", "mps"):
        assert load_config(None, {"device": device}).device == device


def test_a_toml_that_is_not_utf8_names_file_and_offset(tmp_path):
    p = tmp_path / "run.toml"
    p.write_bytes(b"batch_size = 4\n# caf\xe9\n")
    with pytest.raises(ValueError) as e:
        load_config(p)
    assert str(e.value) == f"{p}:2: not UTF-8 text (byte 0xe9 at offset 20)"  # 15 + len("# caf")


def test_command_line_beats_toml(tmp_path):
    p = write(tmp_path, "batch_size = 4\n[schedule]\nmax_lr = 1e-3\n")
    flags = parse_flags(["--schedule.max_lr", "5e-4", "--optim.weight_decay=0.05",
                         "--compile", "true", "--finetune.lora_targets", "q_proj,v_proj,o_proj",
                         "--model.n_kv_heads", "none"])
    assert flags == {"schedule.max_lr": 5e-4, "optim.weight_decay": 0.05, "compile": True,
                     "finetune.lora_targets": ["q_proj", "v_proj", "o_proj"],
                     "model.n_kv_heads": None}
    cfg = load_config(p, flags)
    assert cfg.batch_size == 4 and cfg.schedule.max_lr == 5e-4 and cfg.optim.weight_decay == 0.05
    assert cfg.compile is True and cfg.finetune.lora_targets == ["q_proj", "v_proj", "o_proj"]


def test_command_line_errors():
    with pytest.raises(SystemExit):
        parse_flags(["--optim.lr", "1e-3"])  # argparse: unrecognized arguments
    with pytest.raises(SystemExit):
        parse_flags(["--batch_size", "four"])
    with pytest.raises(SystemExit):
        parse_flags(["--compile", "yes"])
    with pytest.raises(TypeError, match=r"command line: batch_size must be int, found str"):
        load_config(None, {"batch_size": "4"})


def test_n_kv_heads_follows_n_heads_unless_given():
    cfg = apply_overrides(TrainConfig(), {"model.n_heads": 2}, "test")
    assert (cfg.model.n_heads, cfg.model.n_kv_heads) == (2, 2)
    cfg = apply_overrides(TrainConfig(), {"model.n_heads": 8, "model.n_kv_heads": 2}, "test")
    assert (cfg.model.n_heads, cfg.model.n_kv_heads) == (8, 2)


def test_saved_config_round_trips(tmp_path):
    flat = {"schedule.max_lr": 1e-3, "model.n_kv_heads": 2, "eval.sample_prompt": "class "}
    cfg = apply_overrides(TrainConfig(), flat, "test")
    save_config(cfg, tmp_path / "train_config.json")
    assert load_config(tmp_path / "train_config.json") == cfg


def test_resume_mismatches_allow_only_harmless_changes():
    saved = to_dict(TrainConfig())
    now = apply_overrides(TrainConfig(),
                          {"max_steps": 10, "eval.interval": 5, "log.tensorboard": False}, "t")
    assert resume_mismatches(saved, now) == []
    now = apply_overrides(TrainConfig(), {"batch_size": 4, "optim.beta2": 0.99}, "t")
    assert resume_mismatches(saved, now) == [
        "batch_size: checkpoint 16, now 4", "optim.beta2: checkpoint 0.95, now 0.99"]
    # a checkpoint older than a key (distributed, cpu_offload) ran that key's default
    older = {k: v for k, v in saved.items() if k not in ("distributed", "cpu_offload")}
    assert resume_mismatches(older, TrainConfig()) == []
    assert resume_mismatches(older, TrainConfig(distributed="fsdp")) == [
        "distributed: checkpoint 'ddp', now 'fsdp'"]


def test_shipped_configs():
    tiny = load_config(CONFIGS / "tiny.toml")
    assert tiny == TrainConfig()  # the file spells out the defaults
    small = load_config(CONFIGS / "small-125m.toml")
    assert small.model == ModelConfig.from_name("small-125m")
    assert (small.dtype, small.compile, small.block_size) == ("bfloat16", True, 1024)
    assert small.batch_size * small.block_size * small.grad_accum_steps == 524_288
    big = load_config(CONFIGS / "1b.toml")
    assert big.model == ModelConfig.from_name("1b")
    assert (big.dtype, big.compile, big.block_size) == ("bfloat16", True, 2048)
    sharded = load_config(CONFIGS / "openllama-7b-lora-fsdp.toml")
    assert (sharded.distributed, sharded.finetune.method, sharded.dtype) == ("fsdp", "lora",
                                                                             "bfloat16")
    assert big.activation_checkpointing is True
    assert big.batch_size * big.block_size * big.grad_accum_steps == 524_288
