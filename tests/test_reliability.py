"""Reliability, as a hostile or careless user finds it: nothing minillm did not write is deleted or
overwritten, broken files are never certified or loaded, and every bad input is one line naming the
file, key or flag. Ends with the kill -9 and full-disk probes at a small size (the full-disk one in
a tmpfs of its own, through `unshare`; skipped where that is not allowed).

The CLIs run in-process through util.cli.run_cli, as `python3 run.py JOB` runs them, so an error's
text is exactly what a user reads on stderr; the probes run real processes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny import script, stdlib_texts, tiny_tokenizer, write_hf_checkpoint

from minillm.config import ModelConfig
from minillm.eval.harness import main as harness_main
from minillm.eval.ledger import main as ledger_main
from minillm.finetune.adapters import apply_lora, lora_modules, mark_only_lora_trainable
from minillm.finetune.peft_io import load_adapter, save_adapter
from minillm.formats.gguf_reader import read_gguf
from minillm.formats.load import load_pretrained
from minillm.model import Llama
from minillm.ship.doctor import check_gguf
from minillm.ship.gguf_lora import write_lora_gguf
from minillm.ship.gguf_writer import write_gguf
from minillm.training.config import TrainConfig, apply_overrides
from minillm.training.loop import train
from minillm.util.cli import run_cli

ROOT = Path(__file__).resolve().parents[1]
export_cli, generate_cli, train_cli = script("export"), script("generate"), script("train")
CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=384,
                  max_seq_len=64)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny HF checkpoint (with its tokenizer) and a LoRA adapter trained on nothing."""
    d = tmp_path_factory.mktemp("reliability")
    tok = tiny_tokenizer(d / "tok.model")
    write_hf_checkpoint(d / "hf", CFG, seed=1, fmt="safetensors", tokenizer=tok)
    model = load_pretrained(d / "hf")
    apply_lora(model, ["q", "v"], r=4, alpha=8)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
    save_adapter(model, d / "adapter", str(d / "hf"))
    return d, tok


def cli(main, argv, capsys) -> tuple[int, str]:
    """(exit status, stderr) of a job run as `python3 run.py JOB` runs it."""
    try:
        rc = run_cli(main, [str(a) for a in argv])
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    return rc, capsys.readouterr().err


def one_line_error(rc: int, err: str, *needles: str):
    """Exit status 1 and exactly one `error: ...` line on stderr (no traceback; a progress bar
    before it is fine), holding each needle."""
    assert rc == 1, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in errors[0], err


def edit_json(path: Path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# --------------------------------------------------------------------------------------------------
# 1-3. writes never destroy what minillm did not write; one writer per run directory


def test_export_never_replaces_what_minillm_did_not_write(base, tmp_path, capsys):
    d, _ = base
    users = tmp_path / "mine"
    (users / "photos").mkdir(parents=True)
    (users / "notes.txt").write_text("mine")
    report = tmp_path / "report.txt"
    report.write_text("mine")
    run = tmp_path / "run"  # a training run's own directory: not an export
    run.mkdir()
    (run / ".minillm").write_text('{"kind": "training run"}')
    (run / "ckpt.pt").write_bytes(b"state")
    for target, fmt, found in ((users, "hf", "files minillm did not write"),
                               (report, "meta", "is a file"),
                               (run, "hf", "minillm's training run, not a minillm hf export"),
                               (tmp_path / "theirs.gguf", "gguf", "a file minillm did not write")):
        if fmt == "gguf":
            target.write_bytes(b"GGUF written by someone else")
        rc, err = cli(export_cli.main, ["--checkpoint", d / "hf", "--out", target, "--format",
                                        fmt], capsys)
        one_line_error(rc, err, str(target), found)
    assert (users / "notes.txt").read_text() == "mine" and (users / "photos").is_dir()
    assert report.read_text() == "mine" and (run / "ckpt.pt").read_bytes() == b"state"
    # and replacing its own export of the same kind is fine, atomically
    out = tmp_path / "hf-export"
    for _ in range(2):
        assert cli(export_cli.main, ["--checkpoint", d / "hf", "--out", out, "--format", "hf"],
                   capsys)[0] == 0
    assert (out / "config.json").is_file() and not list(tmp_path.glob(".minillm-tmp*"))


def test_export_refuses_a_device_node(base, tmp_path, capsys):
    node = tmp_path / "null"
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a copy of /dev/null
    except PermissionError:
        pytest.skip("mknod needs root")
    rc, err = cli(export_cli.main, ["--checkpoint", base[0] / "hf", "--out", node, "--format",
                                    "hf"], capsys)
    one_line_error(rc, err, str(node), "not a directory")
    assert stat.S_ISCHR(node.stat().st_mode)


def test_out_dir_must_be_named_and_must_be_minillms(base, tmp_path, capsys):
    d, tok = base
    flags = ["--data.tokenizer", tok.path, "--data.corpus", d / "tok.model", "--device", "cpu"]
    one_line_error(*cli(train_cli.main, ["--out_dir", "", *flags], capsys), "must be named")
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("mine")
    one_line_error(*cli(train_cli.main, ["--out_dir", tmp_path / "home", *flags], capsys),
                   "files minillm did not write")
    assert (tmp_path / "home" / "thesis.tex").read_text() == "mine"


# --------------------------------------------------------------------------------------------------
# 4-5. broken files are never certified or loaded


def corrupt_first_scale(path: Path, name: str, value: bytes = b"\x00\x7e"):
    """Overwrite the first block's fp16 scale of tensor `name` (the first 2 bytes of a Q8_0 /
    Q4_0 / Q4_1 block; d of a K-quant super-block is at 0 too for Q4_K / Q5_K) with `value`
    (0x7e00: a NaN)."""
    g = read_gguf(path)
    at = g.data_start + g.tensors[name].offset
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(value)


@pytest.mark.parametrize("outtype", ["q8_0", "q4_1", "q4_k_s"])
def test_a_nan_block_scale_is_named_and_never_loaded(base, tmp_path, outtype):
    d, tok = base
    cfg = ModelConfig(**{**CFG.to_dict(), "dim": 256, "n_layers": 1, "hidden_dim": 256})
    model = Llama(cfg)
    path = tmp_path / f"m-{outtype}.gguf"
    write_gguf(path, cfg, model.state_dict().items(), tok, outtype, progress=False)
    corrupt_first_scale(path, "blk.0.attn_q.weight")
    with pytest.raises(ValueError, match=rf"{path}: tensor 'blk.0.attn_q.weight' \(\w+\) decodes "
                                         r"to nan in block 0"):
        load_pretrained(path)


def test_the_doctor_faults_nan_and_names_an_adapter(base, tmp_path):
    d, tok = base
    hf = load_pretrained(d / "hf")
    path = tmp_path / "nan.gguf"
    write_gguf(path, CFG, hf.state_dict().items(), tok, "q8_0", progress=False)
    corrupt_first_scale(path, "blk.0.attn_q.weight")
    lines = []
    report = check_gguf(path, d / "hf", out=lines.append)
    assert report.faults and lines[-1].startswith("VERDICT: FAULT: tensors: ")
    assert "blk.0.attn_q.weight" in lines[-1] and "nan" in lines[-1]
    model = load_pretrained(d / "hf")
    load_adapter(model, d / "adapter")
    write_lora_gguf(tmp_path / "lora.gguf", model, "f32")
    lines = []
    assert check_gguf(tmp_path / "lora.gguf", d / "hf", out=lines.append).faults
    assert len(lines) == 3 and "is a LoRA adapter GGUF" in lines[-1]


def test_nan_weights_in_safetensors_are_refused(base, tmp_path):
    from safetensors.torch import load_file, save_file

    d, _ = base
    shutil.copytree(d / "hf", tmp_path / "hf")
    st = tmp_path / "hf" / "model.safetensors"
    state = load_file(st)
    state["model.layers.1.mlp.up_proj.weight"][3, 5] = float("inf")
    save_file(state, st)
    with pytest.raises(ValueError, match=r"model.safetensors: tensor "
                                         r"'model.layers.1.mlp.up_proj.weight' holds inf"):
        load_pretrained(tmp_path / "hf")


@pytest.mark.parametrize("key, value, message", [
    ("lora_alpha", float("nan"), r"lora_alpha must be a finite number > 0 .*, found nan"),
    ("lora_alpha", float("inf"), r"lora_alpha must be a finite number > 0 .*, found inf"),
    ("lora_alpha", -16, r"lora_alpha must be a finite number > 0 .*, found -16"),
    ("lora_alpha", 0, r"lora_alpha must be a finite number > 0 .*, found 0"),
    ("lora_alpha", 1e308, "makes the update of 'layers.0.self_attn.q_proj' overflow"),
    ("r", 8.5, "r must be an integer >= 1, found 8.5"),
    ("r", 1e400, r"r must be an integer >= 1, found inf"),  # JSON 1e400 reads as inf
    ("target_modules", ["q_proj", "qkv"], r"target_modules names \['qkv'\]"),
    ("modules_to_save", ["norm"], r"modules_to_save names \['norm'\]"),
])
def test_adapter_config_is_checked_as_training_checks_it(base, tmp_path, key, value, message):
    d, _ = base
    shutil.copytree(d / "adapter", tmp_path / "a")
    edit_json(tmp_path / "a" / "adapter_config.json", **{key: value})
    with pytest.raises(ValueError, match=rf"adapter_config.json: .*{message}"):
        load_adapter(load_pretrained(d / "hf"), tmp_path / "a")


def test_adapter_tensors_and_files_are_checked(base, tmp_path):
    from safetensors.torch import load_file, save_file

    d, _ = base
    shutil.copytree(d / "adapter", tmp_path / "a")
    st = tmp_path / "a" / "adapter_model.safetensors"
    state = load_file(st)
    key = next(k for k in state if k.endswith("lora_B.weight"))
    state[key][0, 0] = float("nan")
    save_file(state, st)
    with pytest.raises(ValueError, match=rf"tensor '{key}' holds nan"):
        load_adapter(load_pretrained(d / "hf"), tmp_path / "a")
    st.unlink()
    (tmp_path / "a" / "adapter_model.bin").write_bytes(b"not a zip at all")
    with pytest.raises(ValueError) as e:
        load_adapter(load_pretrained(d / "hf"), tmp_path / "a")
    assert "not a PyTorch zip checkpoint" in str(e.value) and "weights_only" not in str(e.value)
    (tmp_path / "a" / "base_quantization.json").write_text(
        '{"quant_method": "nf4", "blocksize": 0, "double_quant": false}')
    from minillm.finetune.peft_io import read_base_quantization

    with pytest.raises(ValueError, match="blocksize.*a power of two in"):
        read_base_quantization(tmp_path / "a")


def test_lora_with_modules_to_save_on_a_tied_base(base, tmp_path):
    """new_tokens' setting on the default (tied) tiny model: trains, saves, and loads back."""
    d, tok = base
    cfg = ModelConfig(**{**CFG.to_dict(), "tie_embeddings": True})
    write_hf_checkpoint(tmp_path / "tied", cfg, seed=2, fmt="safetensors", tokenizer=tok)
    model = load_pretrained(tmp_path / "tied")
    apply_lora(model, ["q"], r=2, alpha=4)
    mark_only_lora_trainable(model, ["embed_tokens", "lm_head"])
    with torch.no_grad():
        model.embed_tokens.weight.add_(0.5)  # "trained": differs from the base
    save_adapter(model, tmp_path / "adapter", str(tmp_path / "tied"), ["embed_tokens", "lm_head"])
    back = load_pretrained(tmp_path / "tied")
    load_adapter(back, tmp_path / "adapter")
    assert torch.equal(back.embed_tokens.weight, model.embed_tokens.weight.float())
    assert back.lm_head.weight is back.embed_tokens.weight  # still tied


# --------------------------------------------------------------------------------------------------
# 7-9. every remaining bad input is one line naming the file, key or flag


def test_bad_flags_are_one_line(base, tmp_path, capsys):
    d, tok = base
    ckpt = ["--checkpoint", d / "hf"]
    for flag, value in (("--temperature", "nan"), ("--repetition-penalty", "nan"),
                        ("--max-new-tokens", "-1")):
        rc, err = cli(generate_cli.main, [*ckpt, "--prompt", "x", flag, value], capsys)
        assert rc == 2 and f"argument {flag}: expected" in err
    for flag, value in (("--limit", "0"), ("--limit", "-1"), ("--batch-size", "-1")):
        rc, err = cli(harness_main, [*ckpt, "--task", "stdlib-modules", flag, value], capsys)
        assert rc == 2 and f"argument {flag}: expected an integer >= 1" in err
    one_line_error(*cli(generate_cli.main, [*ckpt, "--prompt", "caf\udce9"], capsys),
                   "--prompt: not valid Unicode text: a lone surrogate U+DCE9 at character 3")
    (tmp_path / "empty").mkdir()
    one_line_error(*cli(generate_cli.main, ["--checkpoint", tmp_path / "empty"], capsys),
                   "empty: not a checkpoint directory (expected one of minillm_config.json")


def test_bad_files_are_one_line_naming_the_file(base, tmp_path, capsys):
    d, _ = base
    ckpt = ["--checkpoint", d / "hf"]
    (tmp_path / "p.txt").write_bytes(b"ok\n\xff\xfe\n")
    (tmp_path / "deep.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    (tmp_path / "surrogate.jsonl").write_text('{"prompt": "a\\ud800b"}\n')
    for name, needle in (("p.txt", "p.txt:2: not UTF-8 text (byte 0xff"),
                         ("deep.jsonl", "deep.jsonl:1: invalid JSON (nested too deeply"),
                         ("surrogate.jsonl", "surrogate.jsonl:1: not valid Unicode text")):
        one_line_error(*cli(generate_cli.main, [*ckpt, "--prompts", tmp_path / name], capsys),
                       needle)
    one_line_error(*cli(generate_cli.main, [*ckpt, "--prompts", "/dev/zero"], capsys),
                   "/dev/zero: expected a prompts file, found not a regular file")
    one_line_error(*cli(harness_main, [*ckpt, "--task", tmp_path / "deep.jsonl"], capsys),
                   "deep.jsonl:1: invalid JSON (nested too deeply")
    one_line_error(*cli(train_cli.main, [tmp_path], capsys),
                   "expected a config file, found a directory")
    rc, err = cli(ledger_main, ["--base", d / "hf", "--adapter", d / "adapter", "--data",
                                tmp_path / "missing.jsonl"], capsys)
    one_line_error(rc, err, "missing.jsonl: instruction data file not found")


def test_a_gguf_with_a_duplicate_piece_is_named(base, tmp_path):
    d, tok = base
    path = tmp_path / "dup.gguf"
    write_gguf(path, CFG, load_pretrained(d / "hf").state_dict().items(), tok, "f32",
               progress=False)
    piece = tok.id_to_piece(10).encode()  # rename piece 11 to piece 10, same byte length
    raw = bytearray(path.read_bytes())
    other = tok.id_to_piece(11).encode()
    at = raw.index(len(other).to_bytes(8, "little") + other)
    if len(piece) != len(other):
        pytest.skip("pieces 10 and 11 differ in length")
    raw[at + 8:at + 8 + len(other)] = piece
    path.write_bytes(bytes(raw))
    from minillm.formats.load import load_tokenizer

    with pytest.raises(ValueError, match=r"dup.gguf: tokenizer.ggml.tokens holds the piece "
                                         r".* twice \(ids 10 and 11\)"):
        load_tokenizer(path)


def test_a_huge_batch_is_refused_before_allocating(base, tmp_path, capsys):
    d, tok = base
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(stdlib_texts()))
    rc, err = cli(train_cli.main, ["--out_dir", tmp_path / "run", "--data.corpus", corpus,
                                   "--data.tokenizer", tok.path, "--data.cache_dir",
                                   tmp_path / "cache", "--model.vocab_size", "384",
                                   "--batch_size", "100000000", "--device", "cpu",
                                   "--log.progress_bar", "false"], capsys)
    one_line_error(rc, err, "batch_size=100000000 x block_size=128", "GiB free",
                   "lower batch_size")


def test_instruct_data_without_val_examples_is_refused(base, tmp_path, capsys):
    d, _ = base
    data = tmp_path / "few.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"q{i}", "output": "a"}) + "\n"
                            for i in range(5)))
    rc, err = cli(train_cli.main, ["--out_dir", tmp_path / "run", "--init_from", d / "hf",
                                   "--finetune.method", "lora", "--data.format", "instruct",
                                   "--data.corpus", data, "--data.val_frac", "0.01",
                                   "--block_size", "32", "--device", "cpu",
                                   "--log.progress_bar", "false"], capsys)
    one_line_error(rc, err, "few.jsonl: data.val_frac=0.01 leaves no example of 5")
    (tmp_path / "dir").mkdir()
    rc, err = cli(train_cli.main, ["--out_dir", tmp_path / "run2", "--init_from", d / "hf",
                                   "--finetune.method", "lora", "--data.format", "instruct",
                                   "--data.corpus", tmp_path / "dir", "--device", "cpu"], capsys)
    one_line_error(rc, err, "dir: expected a instruction data file, found a directory")


# --------------------------------------------------------------------------------------------------
# 10. a moved run resumes


def run_flags(tok, corpus, out, **over) -> dict:
    flat = {"out_dir": str(out), "seed": 3, "data.corpus": str(corpus),
            "data.tokenizer": str(tok.path), "data.cache_dir": str(out.parent / "cache"),
            "data.num_workers": 0, "model.dim": 32, "model.n_layers": 2, "model.n_heads": 2,
            "model.hidden_dim": 64, "model.vocab_size": 384, "model.max_seq_len": 64,
            "batch_size": 4, "block_size": 32, "schedule.total_steps": 6,
            "schedule.warmup_steps": 2, "eval.interval": 0, "eval.iters": 1,
            "eval.sample_tokens": 0, "checkpoint.interval": 2, "log.progress_bar": False,
            "log.tensorboard": False, "device": "cpu"}
    return flat | over


def test_a_moved_run_directory_resumes_exactly(base, tmp_path):
    _, tok = base
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(stdlib_texts()))
    full = train(apply_overrides(TrainConfig(), run_flags(tok, corpus, tmp_path / "a"), "t"))
    half = run_flags(tok, corpus, tmp_path / "b", max_steps=4)
    train(apply_overrides(TrainConfig(), half, "t"))
    shutil.move(tmp_path / "b", tmp_path / "moved")
    rest = run_flags(tok, corpus, tmp_path / "moved")
    resumed = train(apply_overrides(TrainConfig(), rest, "t"), resume=True)
    assert resumed.losses == {k: v for k, v in full.losses.items() if k >= 4}


# --------------------------------------------------------------------------------------------------
# the probes: kill -9 at random moments, and a full disk


def probe_config(tmp: Path, tok, out: Path) -> Path:
    corpus = tmp / "corpus.txt"
    if not corpus.exists():
        corpus.write_text("\n\n".join(stdlib_texts()))
    flags = run_flags(tok, corpus, out, **{"schedule.total_steps": 60, "checkpoint.interval": 1,
                                           "cpu_threads": 1})
    path = tmp / f"{out.name}.json"
    path.write_text(json.dumps({k: v for k, v in flags.items()}))
    return path


def train_command(config: Path, *extra: str) -> list[str]:
    flags = []
    for key, value in json.loads(config.read_text()).items():
        flags += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return [sys.executable, str(ROOT / "train.py"), *flags, *extra]


def steps_of(out: Path) -> tuple[int, int]:
    """(step in model.safetensors' metadata, step in ckpt.pt)."""
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        model_step = int(f.metadata()["minillm_step"])
    ckpt = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
    return model_step, ckpt["step"]


def test_kill_9_at_random_moments_leaves_a_consistent_pair_and_resumes(base, tmp_path):
    _, tok = base
    out = tmp_path / "run"
    config = probe_config(tmp_path, tok, out)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONSAFEPATH="1")
    for i, delay in enumerate((0.05, 0.13, 0.21, 0.34)):  # after a checkpoint lands: mid-step
        proc = subprocess.Popen(train_command(config, *(["--resume"] if i else [])), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        before = (out / "ckpt.pt").stat().st_mtime_ns if (out / "ckpt.pt").exists() else 0
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:  # wait for a new checkpoint
            if (out / "ckpt.pt").exists() and (out / "ckpt.pt").stat().st_mtime_ns != before:
                break
            time.sleep(0.01)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        model_step, ckpt_step = steps_of(out)
        # ckpt.pt is written last: the export is never behind it (at most one checkpoint ahead)
        assert ckpt_step <= model_step <= ckpt_step + 1, (model_step, ckpt_step)
    done = subprocess.run(train_command(config, "--resume"), env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert steps_of(out) == (60, 60)
    assert not list(out.glob(".minillm-tmp*"))  # every killed writer's temp file was swept


def in_a_full_tmpfs(tmp_path: Path, size: str, script_text: str) -> subprocess.CompletedProcess:
    """Run a bash script in a private mount namespace with a tmpfs of `size` at tmp_path/full."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare")
    full = tmp_path / "full"
    full.mkdir()
    wrapper = f"mount -t tmpfs -o size={size} tmpfs {full} && {script_text}"
    proc = subprocess.run(["unshare", "-rm", "bash", "-c", wrapper], capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, PYTHONSAFEPATH="1"))
    if "mount:" in proc.stderr and proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    return proc


def test_a_full_disk_is_named_and_leaves_no_temp_file(base, tmp_path):
    d, tok = base
    full = tmp_path / "full"
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(stdlib_texts()) * 8)  # a token cache larger than the disk
    train = " ".join(train_command(probe_config(tmp_path, tok, full / "run"),
                                   "--data.corpus", str(corpus), "--data.cache_dir",
                                   str(full / "cache")))
    export = (f"{sys.executable} {ROOT / 'export.py'} --checkpoint {d / 'hf'} --outtype f32 "
              f"--out {full / 'm.gguf'}")
    proc = in_a_full_tmpfs(tmp_path, "96k", f"{train}; echo train=$?; {export}; echo export=$?; "
                                            f"find {full} -name '.minillm-tmp*'")
    out = proc.stdout.split()
    assert "train=1" in out and "export=1" in out, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 2 and all("the disk is full" in line for line in lines), proc.stderr
    assert str(full / "cache") in lines[0] and str(full / "m.gguf") in lines[1]
    assert not [w for w in out if ".minillm-tmp" in w]  # no temp file left behind
