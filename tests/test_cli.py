"""train.py, generate.py and export.py: a user's error is one line `error: <message>` on
stderr and exit status 1; the traceback only with --debug or MINILLM_DEBUG=1; negative numbers
are values, not flags."""

import importlib.util
import re
import runpy
import sys
from pathlib import Path

import pytest

from minillm.training.config import add_config_flags
from minillm.util.cli import ArgumentParser, run_cli

ROOT = Path(__file__).resolve().parents[1]


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(capsys, name: str, argv: list[str]) -> tuple[int, str]:
    status = run_cli(script(name).main, argv)
    err = capsys.readouterr().err
    return status, err


def test_negative_numbers_are_values():
    parser = ArgumentParser()
    add_config_flags(parser)
    args = vars(parser.parse_args(["--schedule.max_lr", "-1e-3", "--seed", "-7",
                                   "--optim.eps", "-inf", "--log.peak_flops=-2.5E3",
                                   "--data.corpus", "-"]))
    assert args == {"schedule.max_lr": -1e-3, "seed": -7, "optim.eps": float("-inf"),
                    "log.peak_flops": -2500.0, "data.corpus": "-", "debug": False}
    with pytest.raises(SystemExit):  # a flag without its value is still argparse's error
        parser.parse_args(["--schedule.max_lr", "--seed", "1"])


@pytest.mark.parametrize("name", ["train", "generate", "export"])
def test_each_script_runs_its_main_through_run_cli(capsys, monkeypatch, name):
    # as a user runs it (`python train.py ...`: the script's __main__ block), without paying for a
    # new interpreter; train.py gets the negative learning rate of the issue
    argv = {"train": ["--schedule.max_lr", "-1e-3"],
            "generate": ["--checkpoint", "nowhere", "--device", "cpu"],
            "export": ["--checkpoint", "nowhere", "--out", "x.gguf", "--outtype", "q3_k"]}[name]
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *argv])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / f"{name}.py"), run_name="__main__")
    captured = capsys.readouterr()
    assert (e.value.code, captured.out) == (1, "")
    expected = {  # one line; the loader's own wording for a missing checkpoint is not pinned here
        "train": r"error: command line: ScheduleConfig\.max_lr must be > 0, found -0\.001",
        "generate": r"error: nowhere: [^\n]+",
        "export": r"error: outtype 'q3_k' is not supported for gguf; expected one of "
                  r"\('f32', [^\n]+\)",
    }[name]
    assert re.fullmatch(expected + "\n", captured.err)


@pytest.mark.parametrize("argv, line", [
    (["nope.toml"], "error: nope.toml: config file not found"),
    (["--eval.iters", "0"], "error: command line: eval.iters must be >= 1, found 0"),
    (["--optim.weight_decay", "-0.1"], "error: command line: optim.weight_decay must be >= 0 "
                                       "(0: no decay), found -0.1"),
    (["--device", "gpu"], "error: command line: device must be auto, cpu, cuda, cuda:N or mps, "
                          "found 'gpu'"),
])
def test_train_user_errors(capsys, argv, line):
    assert run(capsys, "train", argv) == (1, line + "\n")


def test_train_unknown_key_in_a_toml_has_no_keyerror_quotes(capsys, tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("[optim]\nlr = 1e-3\n")
    status, err = run(capsys, "train", [str(toml)])
    assert status == 1 and err.startswith(f"error: {toml}: unknown config key 'optim.lr' ('lr' is "
                                          "not a field")
    assert err.count("\n") == 1


def test_export_and_generate_user_errors(capsys, tmp_path):
    status, err = run(capsys, "export", ["--checkpoint", str(tmp_path), "--out", "x.gguf",
                                         "--outtype", "q3_k"])
    assert status == 1 and err.startswith("error: outtype 'q3_k' is not supported for gguf; "
                                          "expected one of ('f32', 'f16', 'bf16', 'q8_0', "
                                          "'q4_0', 'q4_k_m'")
    assert err.count("\n") == 1
    status, err = run(capsys, "generate",
                      ["--checkpoint", str(tmp_path / "missing"), "--device", "cpu"])
    assert status == 1 and err.startswith("error: ") and str(tmp_path / "missing") in err
    assert err.count("\n") == 1


def test_debug_shows_the_traceback(capsys, monkeypatch):
    train = script("train")
    with pytest.raises(ValueError, match="eval.iters must be >= 1"):
        run_cli(train.main, ["--eval.iters", "0", "--debug"])
    monkeypatch.setenv("MINILLM_DEBUG", "1")
    with pytest.raises(ValueError, match="eval.iters must be >= 1"):
        run_cli(train.main, ["--eval.iters", "0"])
    assert capsys.readouterr().err == ""


def test_a_bug_keeps_its_traceback():
    def buggy(argv):
        return None.shape  # AttributeError: minillm's fault, not the user's

    with pytest.raises(AttributeError):
        run_cli(buggy, [])
