"""The training loop: token-normalised accumulation, exact resume, NaN stop,
atomic checkpoints, DDP, CLI.

Every run here is a 2-layer, dim-32 model on five stdlib files with a 384-piece tokenizer, 32-token
windows, a handful of steps: seconds each on a CPU.
"""

import importlib.util
import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny import stdlib_texts, tiny_tokenizer

from minillm.config import ModelConfig
from minillm.data.templates import read_template_record
from minillm.formats.load import load_pretrained
from minillm.model import Llama
from minillm.training import loop as training
from minillm.training.checkpoint import save_checkpoint
from minillm.training.config import TrainConfig, apply_overrides, load_config
from minillm.training.loop import configure_optimizer, forward_backward, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("train_assets")
    corpus = d / "corpus.txt"
    corpus.write_text("\n\n".join(stdlib_texts()))
    tok = tiny_tokenizer(d / "tok.model")
    return dict(corpus=str(corpus), tokenizer=str(tok.path), cache=str(d / "cache"))


def tiny_flat(assets, out_dir, **over) -> dict:
    flat = {
        "out_dir": str(out_dir), "seed": 7,
        "data.corpus": assets["corpus"], "data.tokenizer": assets["tokenizer"],
        "data.cache_dir": assets["cache"],
        "data.num_workers": 0, "data.val_frac": 0.1,
        "model.dim": 32, "model.n_layers": 2, "model.n_heads": 2, "model.hidden_dim": 64,
        "model.vocab_size": 384, "model.max_seq_len": 64,
        "batch_size": 4, "block_size": 32,
        "schedule.total_steps": 6, "schedule.warmup_steps": 2,
        "schedule.max_lr": 1e-2, "schedule.min_lr": 1e-3,
        "eval.interval": 3, "eval.iters": 2, "eval.sample_tokens": 4,
        "checkpoint.interval": 3, "log.progress_bar": False, "log.tensorboard": False,
    }
    flat.update({k.replace("__", "."): v for k, v in over.items()})
    return flat


def tiny_cfg(assets, out_dir, **over) -> TrainConfig:
    return apply_overrides(TrainConfig(), tiny_flat(assets, out_dir, **over), "test")


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------------
# pieces


def test_grad_accumulation_is_token_normalised():
    """k micro-batches with different numbers of -100 targets give the gradient
    of the one big batch."""
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, vocab_size=96, max_seq_len=32)
    a = Llama(cfg)
    b = Llama(cfg)
    b.load_state_dict(a.state_dict())
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 96, (6, 24), generator=g)
    y = torch.randint(0, 96, (6, 24), generator=g)
    y[0, :20] = -100  # micro-batch 1 holds far fewer targets than micro-batch 3
    y[1, 5:] = -100
    y[4, :3] = -100
    n = int((y != -100).sum())
    micro = [(x[0:2], y[0:2]), (x[2:4], y[2:4]), (x[4:6], y[4:6])]
    loss_a = forward_backward(a, micro, n)
    loss_b = forward_backward(b, [(x, y)], n)
    assert abs(loss_a.item() - loss_b.item()) < 1e-4  # sums of ~100 token losses
    max_diff = max((pa.grad - pb.grad).abs().max().item()
                   for pa, pb in zip(a.parameters(), b.parameters(), strict=True))
    assert max_diff < 1e-6
    # the naive mean of per-micro-batch means is a different gradient here
    c = Llama(cfg)
    c.load_state_dict(a.state_dict())
    for xm, ym in micro:
        (c(xm, ym)[1] / len(micro)).backward()
    naive = max((pc.grad - pb.grad).abs().max().item()
                for pc, pb in zip(c.parameters(), b.parameters(), strict=True))
    assert naive > 1e-4


def test_weight_decay_only_on_matrices():
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, vocab_size=96, max_seq_len=32)
    model = Llama(cfg)
    opt = configure_optimizer(model, 0.1, 1e-3, (0.9, 0.95), 1e-8, fused=False)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(p) for p in model.parameters() if p.dim() == 2}
    assert {id(p) for p in no_decay["params"]} == {id(p) for n, p in model.named_parameters()
                                                   if "norm" in n}
    assert len(decay["params"]) == 2 * 7 + 2 and len(no_decay["params"]) == 2 * 2 + 1


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A save killed mid-write leaves the previous ckpt.pt byte for byte, and no temp file."""
    cfg = TrainConfig()
    model = Llama(ModelConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=64, vocab_size=96,
                              max_seq_len=32))
    opt = configure_optimizer(model, 0.1, 1e-3, (0.9, 0.95), 1e-8, fused=False)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model, opt, scaler, 5, torch.Generator().manual_seed(0), cfg)
    before = path.read_bytes()

    def killed_save(obj, f):
        f.write(before[: len(before) // 2])  # half a file, then the process "dies"
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(training.torch, "save", killed_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model, opt, scaler, 6, torch.Generator().manual_seed(0), cfg)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]
    assert training.load_checkpoint(path)["step"] == 5


# --------------------------------------------------------------------------------------------------
# whole runs


def test_resume_is_bit_identical_and_exports(assets, tmp_path):
    full = train(tiny_cfg(assets, tmp_path / "a", log__tensorboard=True))
    assert sorted(full.losses) == list(range(6)) and sorted(full.val_losses) == [3, 6]
    assert full.losses[5] < full.losses[0]

    first = train(tiny_cfg(assets, tmp_path / "b", max_steps=3))
    assert training.load_checkpoint(tmp_path / "b" / "ckpt.pt")["step"] == 3
    second = train(tiny_cfg(assets, tmp_path / "b"), resume=True)
    assert first.losses == {k: full.losses[k] for k in range(3)}
    assert second.losses == {k: full.losses[k] for k in range(3, 6)}  # exact float equality
    assert second.grad_norms == {k: full.grad_norms[k] for k in range(3, 6)}
    assert second.val_losses == {6: full.val_losses[6]}
    assert states_equal(second.model.state_dict(), full.model.state_dict())

    # the inference export loads through load_pretrained and computes the same logits
    out = tmp_path / "a"
    exported = load_pretrained(out)
    x = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(exported(x)[0], full.model.eval()(x)[0])
    assert (out / "tokenizer.model").read_bytes() == Path(assets["tokenizer"]).read_bytes()
    # the resolved config reloads to the same config; tensorboard wrote its events
    assert load_config(out / "train_config.json") == tiny_cfg(assets, out, log__tensorboard=True)
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tb").iterdir())


def test_resume_rejects_a_changed_config(assets, tmp_path):
    train(tiny_cfg(assets, tmp_path, max_steps=1, eval__sample_tokens=0))
    with pytest.raises(ValueError, match=r"schedule\.max_lr: checkpoint 0\.01, now 0\.02"):
        train(tiny_cfg(assets, tmp_path, schedule__max_lr=0.02), resume=True)


def test_nan_loss_stops_and_keeps_last_checkpoint(assets, tmp_path, monkeypatch):
    real = training.token_loss_sum
    calls = []

    def poisoned(model, x, y, mask=None):
        loss = real(model, x, y, mask)
        if torch.is_grad_enabled():  # training micro-batches only (eval runs under no_grad)
            calls.append(1)
            if len(calls) == 5:  # step 4 (one micro-batch per step)
                return loss * float("nan")
        return loss

    monkeypatch.setattr(training, "token_loss_sum", poisoned)
    cfg = tiny_cfg(assets, tmp_path, checkpoint__interval=2, eval__interval=0)
    # an earlier run's, killed (-9) (pids above Linux's 2**22 limit: never alive)
    for stale in (".minillm-tmp.4194305.ckpt.pt", ".minillm-tmp.4194305.events.bin"):
        (tmp_path / stale).write_bytes(b"half a file")
    message = r"step 4: training loss is nan .* last good checkpoint .*ckpt.pt \(step 4\) is kept"
    with pytest.raises(FloatingPointError, match=message):
        train(cfg)
    ckpt = training.load_checkpoint(tmp_path / "ckpt.pt")
    assert ckpt["step"] == 4
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".minillm-tmp")]


def test_diverging_lr_stops_with_the_step(assets, tmp_path):
    # one Adam step moves every weight by ~lr: with lr = 1e30 the next forward overflows to inf/nan
    cfg = tiny_cfg(assets, tmp_path, schedule__name="constant", schedule__max_lr=1e30,
                   schedule__warmup_steps=0, checkpoint__interval=0)
    message = r"^step 1: (training loss|gradient norm) is (nan|inf) .* before any checkpoint"
    with pytest.raises(FloatingPointError, match=message):
        train(cfg)
    assert not (tmp_path / "ckpt.pt").exists()


def test_cli_toml_and_flags(assets, tmp_path):
    spec = importlib.util.spec_from_file_location("train_script", ROOT / "train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    toml = tmp_path / "run.toml"
    flat = tiny_flat(assets, tmp_path / "out", max_steps=2, eval__sample_tokens=0)
    lines = [f"{k} = {json.dumps(v)}" for k, v in flat.items() if "." not in k]
    for section in sorted({k.split(".")[0] for k in flat if "." in k}):
        lines.append(f"[{section}]")
        lines += [f"{k.split('.')[1]} = {json.dumps(v)}"
                  for k, v in flat.items() if k.startswith(section + ".")]
    toml.write_text("\n".join(lines) + "\n")
    script.main([str(toml), "--schedule.max_lr", "0.005", "--optim.weight_decay=0.05",
                 "--compile", "false"])
    saved = json.loads((tmp_path / "out" / "train_config.json").read_text())
    assert saved["schedule"]["max_lr"] == 0.005 and saved["optim"]["weight_decay"] == 0.05
    assert saved["max_steps"] == 2 and saved["model"]["dim"] == 32
    assert training.load_checkpoint(tmp_path / "out" / "ckpt.pt")["step"] == 2
    # the same file as a flag, as the fine-tuning docs write it
    script.main(["--config", str(toml), "--out_dir", str(tmp_path / "out2"), "--max_steps", "1"])
    assert training.load_checkpoint(tmp_path / "out2" / "ckpt.pt")["step"] == 1
    with pytest.raises(SystemExit):
        script.main([str(toml), "--config", str(toml)])


def test_mixed_precision_tracks_float32_and_fp16_resumes_exactly(assets, tmp_path):
    """bf16 autocast, and fp16 autocast with a GradScaler, train like float32 to within bf16/fp16
    rounding; the scaler's state is saved, so an fp16 run stopped and resumed is bit-identical to
    the uninterrupted one."""
    over = dict(schedule__total_steps=4, eval__interval=0, eval__sample_tokens=0,
                checkpoint__export=False)
    fp32 = train(tiny_cfg(assets, tmp_path / "fp32", **over))
    bf16 = train(tiny_cfg(assets, tmp_path / "bf16", dtype="bfloat16", **over))
    fp16 = train(tiny_cfg(assets, tmp_path / "fp16", dtype="float16", **over))
    for run in (bf16, fp16):
        assert max(abs(run.losses[s] - fp32.losses[s]) for s in range(4)) < 0.05
    assert fp16.losses != fp32.losses  # the matmuls did run in half precision
    # bf16 needs no scaler; master weights and optimizer state stay float32 under autocast
    bf16_ckpt = training.load_checkpoint(tmp_path / "bf16" / "ckpt.pt")
    assert bf16_ckpt["scaler"] == {}
    assert {p.dtype for p in bf16.model.parameters()} == {torch.float32}
    moments = [t for s in bf16_ckpt["optimizer"]["state"].values() for t in s.values()
               if torch.is_tensor(t) and t.numel() > 1]
    assert moments and {t.dtype for t in moments} == {torch.float32}
    assert training.load_checkpoint(tmp_path / "fp16" / "ckpt.pt")["scaler"]["scale"] == 2.0**16
    train(tiny_cfg(assets, tmp_path / "fp16b", dtype="float16", **{**over, "max_steps": 2}))
    second = train(tiny_cfg(assets, tmp_path / "fp16b", dtype="float16", **over), resume=True)
    assert second.losses == {k: fp16.losses[k] for k in (2, 3)}
    assert states_equal(second.model.state_dict(), fp16.model.state_dict())


def test_compiled_model_trains_like_eager(assets, tmp_path, monkeypatch):
    """compile = true runs the steps through torch.compile, and the checkpoint still holds the plain
    Llama's keys (no _orig_mod. prefix). The backend here is aot_eager: dynamo's graph capture and
    AOT autograd, the parts that can break a training step, without inductor's C++ build, which a
    CPU test cannot afford."""
    real_compile = torch.compile
    compiled_modules = []

    def compile_aot_eager(model):
        compiled_modules.append(model)
        return real_compile(model, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", compile_aot_eager)
    over = dict(schedule__total_steps=3, eval__interval=0, eval__sample_tokens=0,
                checkpoint__export=False)
    eager = train(tiny_cfg(assets, tmp_path / "eager", **over))
    compiled = train(tiny_cfg(assets, tmp_path / "compiled", compile=True, **over))
    assert compiled_modules == [compiled.model]
    assert max(abs(compiled.losses[s] - eager.losses[s]) for s in range(3)) < 1e-4
    assert abs(compiled.val_losses[3] - eager.val_losses[3]) < 1e-4
    ckpt = training.load_checkpoint(tmp_path / "compiled" / "ckpt.pt")
    assert sorted(ckpt["model"]) == sorted(eager.model.state_dict())


# --------------------------------------------------------------------------------------------------
# data parallel: 2 CPU processes over gloo == 1 process with the same global batch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, flat: dict, out_pattern: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    try:
        result = train(apply_overrides(TrainConfig(), flat, "test"))
        torch.save(dict(losses=result.losses, val=result.val_losses,
                        state=result.model.state_dict()),
                   out_pattern.format(rank=rank))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_ddp_two_ranks_match_one_process(assets, tmp_path):
    over = dict(grad_accum_steps=2, schedule__total_steps=3, eval__interval=0,
                eval__sample_tokens=0, checkpoint__export=False)
    single = train(tiny_cfg(assets, tmp_path / "single", **over))
    pattern = str(tmp_path / "rank{rank}.pt")
    flat = tiny_flat(assets, tmp_path / "ddp", **over)
    mp.spawn(_ddp_worker, args=(2, _free_port(), flat, pattern), nprocs=2)
    r0, r1 = (torch.load(pattern.format(rank=r), weights_only=True) for r in (0, 1))
    assert states_equal(r0["state"], r1["state"])  # the ranks never drift apart
    assert r0["losses"] == r1["losses"]  # the logged loss is the global one on every rank
    for step, loss in single.losses.items():
        assert abs(r0["losses"][step] - loss) < 1e-5
    assert abs(r0["val"][3] - single.val_losses[3]) < 1e-5
    ref = single.model.state_dict()
    assert max((r0["state"][k] - ref[k]).abs().max().item() for k in ref) < 1e-5


# --------------------------------------------------------------------------------------------------
# fine-tuning: LoRA / QLoRA on instruction data, from an HF checkpoint


def alpaca_file(path: Path, n: int = 24) -> Path:
    words = ["list", "dict", "tuple", "set", "string", "number", "file", "class"]
    rows = [dict(instruction=f"Name a Python {words[i % 8]} method.",
                 input="" if i % 3 else "briefly",
                 output=f"The {words[(i * 5) % 8]} type has {'many ' * (1 + i % 4)}methods.")
            for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def base_checkpoint(assets, tmp_path_factory):
    from tiny import write_hf_checkpoint

    from minillm.tokenizer.sentencepiece import Tokenizer

    d = tmp_path_factory.mktemp("hf_base")
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, vocab_size=384, max_seq_len=64)
    write_hf_checkpoint(d, cfg, fmt="safetensors", tokenizer=Tokenizer(assets["tokenizer"]))
    return d


def finetune_cfg(assets, base_checkpoint, out_dir, method, **over) -> TrainConfig:
    flat = dict(init_from=str(base_checkpoint), finetune__method=method, finetune__lora_r=4,
                finetune__lora_targets=["q_proj", "v_proj", "down_proj"], data__format="instruct",
                data__corpus=str(alpaca_file(Path(out_dir).parent / "alpaca.jsonl")),
                data__packing=True, data__tokenizer="", data__val_frac=0.2, block_size=48,
                schedule__total_steps=4, schedule__max_lr=5e-2, eval__interval=2,
                checkpoint__interval=2)
    flat.update(over)
    return tiny_cfg(assets, out_dir, **flat)


def test_lora_instruct_finetune_resumes_exactly_and_exports(assets, base_checkpoint, tmp_path):
    full = train(finetune_cfg(assets, base_checkpoint, tmp_path / "a", "lora"))
    base = load_pretrained(base_checkpoint)
    tuned = full.model.state_dict()
    for k, v in base.state_dict().items():  # the base is frozen: every weight as loaded
        assert torch.equal(tuned.get(k, tuned.get(k.replace(".weight", ".base.weight"))), v), k
    lora_b = [v for k, v in tuned.items() if k.endswith("lora_B.weight")]
    # B starts at 0 and trained
    assert len(lora_b) == 2 * 3 and all(v.abs().sum() > 0 for v in lora_b)
    ckpt = training.load_checkpoint(tmp_path / "a" / "ckpt.pt")
    assert sorted(ckpt["model"]) == sorted(k for k in tuned if ".lora_" in k)  # only the adapters

    first = train(finetune_cfg(assets, base_checkpoint, tmp_path / "b", "lora", max_steps=2))
    second = train(finetune_cfg(assets, base_checkpoint, tmp_path / "b", "lora"), resume=True)
    assert {**first.losses, **second.losses} == full.losses
    assert second.val_losses == {4: full.val_losses[4]}

    # exports: the PEFT adapter, and a plain model with the adapters folded in for generate.py
    assert (tmp_path / "a" / "adapter" / "adapter_config.json").is_file()
    # the template it trained with (alpaca data, data.template
    # unset → alpaca), for export and --chat
    assert (read_template_record(tmp_path / "a")
            == read_template_record(tmp_path / "a" / "adapter") == "alpaca")
    merged = load_pretrained(tmp_path / "a")
    x = torch.randint(0, 384, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(merged(x)[0], full.model.eval()(x)[0], atol=1e-5)


def test_qlora_trains_adapters_over_an_nf4_base(assets, base_checkpoint, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from minillm.finetune.nf4_linear import NF4Linear
    from minillm.training import flops

    cfg = finetune_cfg(assets, base_checkpoint, tmp_path, "qlora", schedule__total_steps=3,
                       eval__interval=0, eval__sample_tokens=0, finetune__double_quant=True,
                       log__tensorboard=True, log__interval=1, log__peak_flops=1e12)
    result = train(cfg)
    # the printed count and the MFU are flops.py's: NF4 weights counted,
    # 4N + 6N_adapter FLOPs per token
    est = flops.estimate(result.model.config, "qlora", cfg.batch_size, cfg.block_size, 4,
                         ("q_proj", "v_proj", "down_proj"))
    assert est.flops_per_token < flops.flops_per_token(result.model.config, cfg.block_size, "full")
    assert (f"model: {est.params / 1e6:.2f}M parameters "
            f"({est.trainable / 1e6:.2f}M trained, qlora), "
            f"{est.flops_per_token / 1e6:.1f} MFLOPs/token") in capsys.readouterr().out
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    speeds, mfus = events.Scalars("perf/tokens_per_s"), events.Scalars("perf/mfu")
    assert [e.step for e in mfus] == [0, 1, 2]
    for speed, mfu in zip(speeds, mfus, strict=True):
        assert mfu.value == pytest.approx(speed.value * est.flops_per_token / 1e12, rel=1e-6)
    assert all(math.isfinite(v) for v in result.losses.values()) and len(result.losses) == 3
    assert isinstance(result.model.layers[0].mlp.gate_proj, NF4Linear)  # quantized, not adapted
    # finetune.double_quant reached the loader
    assert result.model.layers[0].mlp.gate_proj.double_quant
    assert isinstance(result.model.layers[0].self_attn.q_proj.base, NF4Linear)
    trained = {k for k, p in result.model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in k for k in trained)


def test_adapters_need_a_pretrained_model(assets, tmp_path):
    with pytest.raises(ValueError, match=r"finetune.method='lora' adapts a pretrained model: "
                                         r"set init_from"):
        train(tiny_cfg(assets, tmp_path, finetune__method="lora"))
