"""FSDP2 on the CPU: 2 gloo processes with the tiny model of test_train.py equal one process (full
and LoRA) and DDP, a run killed mid-checkpoint resumes bit for bit, and the consolidated export
(at the end of training, or from ckpt/ by the consolidate command) loads.

Starting torch costs ~2 s per process, so each scenario is one mp.spawn of 2 workers that runs
every job of that scenario in turn: the references and comparisons share three spawns in all.
"""

import json
import os
import signal
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_train import _free_port, alpaca_file, assets, base_checkpoint, tiny_flat  # noqa: F401

from minillm.finetune.peft_io import load_adapter
from minillm.formats.load import load_pretrained
from minillm.training import distributed
from minillm.training.config import TrainConfig, apply_overrides
from minillm.training.consolidate import consolidate
from minillm.training.loop import train

pytestmark = pytest.mark.skipif(
    not distributed.FSDP_ON_CPU,
    reason=f"FSDP2 runs on the CPU from torch 2.6 (torch.distributed.fsdp.fully_shard); "
           f"this is torch {torch.__version__}, whose FSDP2 needs CUDA")

# 6 AdamW steps, 2 micro-batches each (the target count summed over ranks), checkpoints at 2, 4, 6,
# an eval and a sampled text (a collective under FSDP) at 3 and 6
FULL = dict(optim__name="adamw", grad_accum_steps=2, checkpoint__interval=2)


def lora_flat(assets, base, out_dir: Path, **over) -> dict:  # noqa: F811
    """LoRA r=4 on q, v, down over an HF checkpoint, on packed alpaca examples; batch 2, so the 5
    held-out examples make 3 eval batches: one rank runs a target-free one too."""
    flat = dict(init_from=str(base), finetune__method="lora", finetune__lora_r=4,
                finetune__lora_targets=["q_proj", "v_proj", "down_proj"], data__format="instruct",
                data__corpus=str(alpaca_file(out_dir.parent / "alpaca.jsonl")),
                data__packing=True, data__tokenizer="", data__val_frac=0.2, block_size=48,
                batch_size=2, schedule__total_steps=4, schedule__max_lr=5e-2, eval__interval=2,
                eval__iters=3, checkpoint__interval=2, optim__name="adamw")
    flat.update(over)
    return tiny_flat(assets, out_dir, **flat)


def _worker(rank: int, port: int, jobs: list[tuple[dict, bool, str]], kill_at: int):
    """Run each (config, resume, result file) in turn as one rank of 2; rank 0 saves the losses and
    the whole model state of each. kill_at > 0: SIGKILL rank 0 while it writes the checkpoint of
    that step (its shards are written, the directory not yet renamed)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=120))
    if kill_at:
        real = distributed.atomic_write_bytes

        def killed_mid_save(path, data):
            if path.name == distributed.TRAIN_STATE and json.loads(data)["step"] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            real(path, data)

        distributed.atomic_write_bytes = killed_mid_save
    try:
        for flat, resume, out in jobs:
            cfg = apply_overrides(TrainConfig(), flat, "test")
            result = train(cfg, resume=resume)
            state = (distributed.gather_full_state(result.model) if cfg.distributed == "fsdp"
                     else result.model.state_dict())
            if rank == 0:
                torch.save(dict(losses=result.losses, grad_norms=result.grad_norms,
                                val=result.val_losses, state=state), out)
    finally:
        dist.destroy_process_group()


def spawn(jobs, kill_at: int = 0):
    mp.spawn(_worker, args=(_free_port(), jobs, kill_at), nprocs=2)


def load(path) -> dict:
    return torch.load(path, weights_only=True)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def runs(assets, base_checkpoint, tmp_path_factory):  # noqa: F811
    """Two spawns: a full FSDP run killed by SIGKILL while it writes its step-4 checkpoint; then
    DDP full, the same FSDP run uninterrupted, FSDP LoRA, and the resume of the killed run. Beside
    them, the full and LoRA runs in this one process."""
    d = tmp_path_factory.mktemp("fsdp")
    full = tiny_flat(assets, d / "fsdp", distributed="fsdp", **FULL)
    killed = {**full, "out_dir": str(d / "killed")}
    with pytest.raises(mp.ProcessExitedException, match="SIGKILL"):
        spawn([(killed, False, d / "unused.pt")], kill_at=4)
    after_kill = dict(step=distributed.read_train_state(d / "killed" / "ckpt")["step"],
                      left=sorted(p.name for p in (d / "killed").iterdir()))
    lora = lora_flat(assets, base_checkpoint, d / "lora", distributed="fsdp")
    spawn([(tiny_flat(assets, d / "ddp", checkpoint__export=False, **FULL), False, d / "ddp.pt"),
           (full, False, d / "fsdp.pt"), (lora, False, d / "lora.pt"),
           (killed, True, d / "resumed.pt")])
    single = train(apply_overrides(TrainConfig(), tiny_flat(assets, d / "single", **FULL), "test"))
    single_lora = train(apply_overrides(TrainConfig(),
                                        lora_flat(assets, base_checkpoint, d / "single-lora"),
                                        "test"))
    return dict(dir=d, full=full, ddp=load(d / "ddp.pt"), fsdp=load(d / "fsdp.pt"),
                lora=load(d / "lora.pt"), resumed=load(d / "resumed.pt"), after_kill=after_kill,
                single=single, single_lora=single_lora)


def test_fsdp_full_training_matches_one_process_and_ddp(runs):
    fsdp, ddp, single = runs["fsdp"], runs["ddp"], runs["single"]
    assert sorted(fsdp["losses"]) == list(range(6)) and sorted(fsdp["val"]) == [3, 6]
    for other in (single.losses, ddp["losses"]):
        assert max(abs(fsdp["losses"][s] - other[s]) for s in range(6)) < 1e-5
    for other in (single.grad_norms, ddp["grad_norms"]):  # clip_grad_norm_ over DTensor shards
        assert max(abs(fsdp["grad_norms"][s] - other[s]) for s in range(6)) < 1e-5
    assert abs(fsdp["val"][6] - single.val_losses[6]) < 1e-5
    assert max_diff(fsdp["state"], single.model.state_dict()) < 1e-5
    assert max_diff(fsdp["state"], ddp["state"]) < 1e-5
    ckpt = runs["dir"] / "fsdp" / "ckpt"  # sharded: one file per rank, and each rank's RNG
    assert sorted(p.name for p in ckpt.iterdir()) == [
        ".metadata", ".minillm", "__0_0.distcp", "__1_0.distcp", "rng.rank0.pt", "rng.rank1.pt",
        "train_state.json"]
    assert distributed.read_train_state(ckpt)["step"] == 6


def test_fsdp_lora_matches_one_process_and_only_adapters_train(runs, base_checkpoint):  # noqa: F811
    lora, single = runs["lora"], runs["single_lora"]
    assert max(abs(lora["losses"][s] - single.losses[s]) for s in range(4)) < 1e-5
    assert max(abs(lora["val"][s] - single.val_losses[s]) for s in (0, 2, 4)) < 1e-5
    assert max_diff(lora["state"], single.model.state_dict()) < 1e-5
    base = load_pretrained(base_checkpoint).state_dict()
    for k, v in base.items():  # the frozen base, sharded too, comes back as loaded
        assert torch.equal(lora["state"].get(k, lora["state"].get(k.replace(".weight",
                                                                              ".base.weight"))), v)
    # the checkpoint holds the adapters alone (and AdamW's state of them)
    keys = distributed.dcp.FileSystemReader(str(runs["dir"] / "lora" / "ckpt")).read_metadata()
    model_keys = {k for k in keys.state_dict_metadata if k.startswith("model.")}
    assert model_keys and all(".lora_" in k for k in model_keys)


def test_consolidated_outputs_load_and_the_command_writes_the_same(runs, base_checkpoint,  # noqa: F811
                                                                    tmp_path):
    out = runs["dir"] / "fsdp"
    exported = load_pretrained(out)  # written once, after the last step, from the gathered shards
    assert max_diff(exported.state_dict(), runs["single"].model.state_dict()) < 1e-5
    written = consolidate(out, tmp_path / "full")  # from ckpt/ alone, in this one process
    assert (written / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert (written / "tokenizer.model").is_file()

    lora_out = runs["dir"] / "lora"
    merged = load_pretrained(lora_out)
    x = torch.randint(0, 384, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(merged(x)[0], runs["single_lora"].model.eval()(x)[0], atol=1e-5)
    consolidate(lora_out, tmp_path / "lora")
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        assert (tmp_path / "lora" / name).read_bytes() == (lora_out / name).read_bytes()
    base = load_pretrained(base_checkpoint)  # PEFT's layout: the adapter goes onto the base
    assert load_adapter(base, lora_out / "adapter") == [
        f"layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "self_attn.v_proj",
                                                      "mlp.down_proj")]


def test_killed_mid_checkpoint_resumes_bit_identical(runs):
    d = runs["dir"]
    assert runs["after_kill"]["step"] == 2  # ckpt/ is the last whole checkpoint
    # step 4's, under minillm's temp name (util/fileio.py), removed by the resume
    assert any(name.startswith(".minillm-tmp.") and name.endswith(".ckpt")
               for name in runs["after_kill"]["left"])
    resumed, uninterrupted = runs["resumed"], runs["fsdp"]
    assert resumed["losses"] == {s: uninterrupted["losses"][s] for s in range(2, 6)}  # exact
    assert resumed["grad_norms"] == {s: uninterrupted["grad_norms"][s] for s in range(2, 6)}
    assert resumed["val"] == uninterrupted["val"]
    assert all(torch.equal(resumed["state"][k], v) for k, v in uninterrupted["state"].items())
    assert ((d / "killed" / "model.safetensors").read_bytes()
            == (d / "fsdp" / "model.safetensors").read_bytes())
    assert not [p for p in (d / "killed").iterdir() if p.name.startswith(".minillm-tmp.")]  # swept


def test_resume_needs_the_same_world_size(runs):
    """A single process joins a group of one (no torchrun needed) and refuses the 2-rank ckpt/."""
    cfg = apply_overrides(TrainConfig(), runs["full"], "test")
    try:
        with pytest.raises(ValueError, match=r"written by 2 ranks, this run has 1; resume with "
                                             r"--nproc_per_node 2"):
            train(cfg, resume=True)
    finally:
        dist.destroy_process_group()


def test_fsdp_refuses_what_it_cannot_shard():
    with pytest.raises(ValueError, match=r"finetune.method must be 'full' or 'lora' with "
                                         r"distributed = 'fsdp'"):
        TrainConfig(distributed="fsdp", init_from="x",
                    finetune=TrainConfig().finetune.__class__(method="qlora"))
    with pytest.raises(ValueError, match=r"dtype must be auto, float32 or bfloat16 with "
                                         r"distributed = 'fsdp'"):
        TrainConfig(distributed="fsdp", dtype="float16")
    with pytest.raises(ValueError, match=r"cpu_offload must be false unless distributed = 'fsdp'"):
        TrainConfig(cpu_offload=True)
    with pytest.raises(ValueError, match=r"cpu_offload keeps FSDP's shards in host memory .* "
                                         r"computes on cpu"):
        distributed.check_fsdp_device(torch.device("cpu"), cpu_offload=True)
