"""Past one machine: the process group, FSDP2 sharding, and the sharded checkpoint (ckpt/) with
every rank's RNG state, so a killed run resumes bit for bit.

    torchrun --nproc_per_node W train.py ... --distributed fsdp       (ddp is the default)

DDP keeps the whole model, its gradients and AdamW's two moments on every rank: 16 bytes per
parameter for full training, 112 GB per rank for a 7B model. FSDP2 (PyTorch's `fully_shard`,
https://pytorch.org/docs/stable/distributed.fsdp.fully_shard.html; the ZeRO-3 idea, Rajbhandari et
al. 2019, https://arxiv.org/abs/1910.02054) splits every parameter along dim 0 into W shards, one
per rank, held as a DTensor (torch.distributed.tensor):

    forward of block i:   all-gather block i's shards -> whole weights -> compute -> free them
    backward of block i:  all-gather again -> gradients -> reduce-scatter: each rank keeps the
                          gradient of its own shard (averaged over the ranks, like DDP)
    optimizer step:       AdamW updates each rank's shard with its own moments; nothing is sent
    per rank:             (weights + gradients + AdamW) / W + activations + the gathered blocks

So the loop (training/loop.py) is the same loop: the loss is pre-multiplied by W as for DDP, so the
averaged gradients are the token-normalised sum over every rank; clip_grad_norm_ computes the norm
of DTensor gradients over every shard; the NaN stop and rank-0 logging are unchanged. FSDP
reduce-scatters after every micro-batch of a gradient accumulation (DDP syncs only the last one):
the gradients stay sharded, at the price of one collective per micro-batch.

Building without a full copy per rank (`shard_model`): rank 0 builds the model as one process
would (reads the checkpoint, or initialises it from the seed) on the CPU; every rank builds the same
structure on the meta device (shapes only, no memory), shards it, allocates its own shards, and
rank 0 sends the weights one tensor at a time, each rank keeping its rows (`fill_from_rank0`).
Rank 0 holds one full copy on the CPU while loading; the others their shards and one tensor in
flight: 0.71x the model's bytes on rank 1 of 2, 1.01x when every rank loads it whole
(bench/fsdp_memory.py, docs/measured.md).

The checkpoint, out_dir/ckpt/ (`save_sharded_checkpoint`), is written by every rank at once into a
temp directory that replaces ckpt/ only when every rank has finished (fileio.atomic_directory), so
a kill mid-save leaves the previous ckpt/ whole:

    .metadata, __R_0.distcp    torch.distributed.checkpoint (DCP): one file of model and AdamW
                               shards per rank, and the index (a pickle: resume from a ckpt/ your
                               own run wrote)
    train_state.json           step, world size, val loss, GradScaler, the run's config
    rng.rankR.pt               rank R's RNG states and the data generator (training/checkpoint.py)

With adapters only the trained tensors are saved, as in ckpt.pt; the frozen base is rebuilt from
init_from. A resume needs the same world size (each rank's RNG is its own); the model itself is
consolidated once at the end (`gather_full_state`) into the usual export, and
`python3 run.py consolidate OUT_DIR` does the same from ckpt/ alone (training/consolidate.py).

torch 2.5 (minillm's floor) has the same FSDP2 under torch.distributed._composable.fsdp, on CUDA
only; from torch 2.6 it is torch.distributed.fsdp.fully_shard, on any device (gloo on the CPU, as
the tests run it). Both import paths are tried here, once; the DCP functions are the same in both.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from minillm.config import ModelConfig
from minillm.model import Llama
from minillm.training.checkpoint import rng_states, set_rng_states
from minillm.training.config import TrainConfig, resume_mismatches, to_dict
from minillm.util.fileio import atomic_directory, atomic_write, atomic_write_bytes, read_json_object

try:  # torch >= 2.6: public, and on any device
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        FSDPModule,
        MixedPrecisionPolicy,
        fully_shard,
    )

    FSDP_ON_CPU = True
except ImportError:  # torch 2.5: the same FSDP2 before it was public, which needs CUDA streams
    from torch.distributed._composable.fsdp import (
        CPUOffloadPolicy,
        FSDPModule,
        MixedPrecisionPolicy,
        fully_shard,
    )

    FSDP_ON_CPU = False

CKPT_DIR = "ckpt"  # out_dir/ckpt/: the sharded checkpoint
TRAIN_STATE = "train_state.json"


def setup_distributed(device_setting: str, distributed: str = "ddp") -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; joins the process group if
    W > 1, or for FSDP with one process (a group of one outside torchrun, so a single process runs
    the same sharded code and writes the same ckpt/)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if (world_size > 1 or distributed == "fsdp") and not dist.is_initialized():
        cuda = device_setting != "cpu" and torch.cuda.is_available()
        backend = "nccl" if cuda else "gloo"
        if world_size == 1 and "MASTER_ADDR" not in os.environ:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            dist.init_process_group(backend=backend)
    return rank, local_rank, world_size


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (any picklable value; the others pass None)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --------------------------------------------------------------------------------------------------
# sharding


def check_fsdp_device(device: torch.device, cpu_offload: bool):
    """One line on what this torch's FSDP2 cannot do on `device`, before anything is built."""
    if device.type != "cuda" and not FSDP_ON_CPU:
        raise ValueError(f"distributed = 'fsdp' on {device} needs torch >= 2.6; torch "
                         f"{torch.__version__}'s FSDP2 runs on CUDA only: use ddp here")
    if cpu_offload and device.type != "cuda":
        raise ValueError(f"cpu_offload keeps FSDP's shards in host memory between a GPU's steps; "
                         f"this run computes on {device}, found cpu_offload = true")


def shard_model(full: Llama | None, skeleton: Callable[[ModelConfig], Llama], device: torch.device,
                dtype: torch.dtype, compile_blocks: bool = False, cpu_offload: bool = False,
                float32_modules: tuple[str, ...] = ()) -> Llama:
    """Every rank's FSDP2 shard of rank 0's model `full` (None on the other ranks).

    skeleton(config) builds the same modules on the meta device. Each block is its own FSDP unit
    (gathered and freed on its own), then the root takes what is left (embeddings, final norm,
    lm_head). Under bf16 the MixedPrecisionPolicy gathers the weights in `dtype` and reduces the
    gradients in float32, over the shards as they were built (float32 master weights for full
    training; a frozen base in `dtype` and float32 adapters for LoRA). float32_modules (LoRA's
    modules_to_save, e.g. "lm_head") are units of their own that gather in float32, as they compute
    in one process. compile_blocks compiles each block in place (nn.Module.compile, so the
    state-dict keys keep their names); cpu_offload keeps the shards and AdamW's state in host
    memory, which needs a GPU to compute on."""
    config = broadcast_object(full.config if full is not None else None)
    model = skeleton(config)
    mixed = (MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
             if dtype != torch.float32 else MixedPrecisionPolicy())
    options = dict(mp_policy=mixed)
    if cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    for block in model.layers:
        if compile_blocks:
            block.compile()
        fully_shard(block, **options)
    if not config.tie_embeddings:  # a tied matrix must stay in one unit, the root
        for name in float32_modules:
            fully_shard(model.get_submodule(name),
                        **{**options, "mp_policy": MixedPrecisionPolicy()})
    fully_shard(model, **options)
    # allocate this rank's shards (host memory with offload), then fill them from rank 0
    model.to_empty(device="cpu" if cpu_offload else device)
    model.init_rope(device)
    fill_from_rank0(model, full, device)
    # FSDP allocates each unit's gathered weights at its first all-gather and reuses them; made
    # under torch.inference_mode (the first eval sample) they could never be written by training
    # again, so gather (and free) each unit once now, outside it
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.unshard()
            module.reshard()
    return model


@torch.no_grad()
def fill_from_rank0(model: Llama, full: Llama | None, device: torch.device):
    """Copy rank 0's whole weights into every rank's shards, one tensor at a time: rank 0 sends
    each parameter (broadcast), every rank keeps its rows, the rows FSDP's Shard(0) gives it
    (torch.chunk along dim 0: ceil(n / W) rows per rank, the last ranks fewer or none). Each rank
    holds at most one whole tensor beside its shards. (torch's set_model_state_dict with
    broadcast_from_rank0 does the same but receives every tensor before it shards any: a whole
    copy of the model on every rank, bench/fsdp_memory.py measured it.)"""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    source = dict(full.named_parameters()) if full is not None else {}
    for name, param in model.named_parameters():  # a tied lm_head comes once
        if full is not None:
            whole = source[name].detach().to(device=device, dtype=param.dtype)
        else:
            whole = torch.empty(param.shape, dtype=param.dtype, device=device)
        dist.broadcast(whole, src=0)
        rows = whole.chunk(world_size, dim=0)
        local = param.to_local()  # this rank's shard, a view of FSDP's own storage
        if rank < len(rows):
            local.copy_(rows[rank])


def gather_full_state(model: Llama) -> dict[str, torch.Tensor]:
    """The whole model's state, gathered tensor by tensor onto rank 0's CPU (the other ranks get
    {}); a collective: every rank calls it."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))


def materialize(skeleton: Llama, state: dict[str, torch.Tensor]) -> Llama:
    """The meta-device `skeleton` holding the tensors of `state` (assigned, not copied), with
    lm_head tied again when the config ties it, and its RoPE tables on the CPU."""
    skeleton.load_state_dict(state, assign=True)
    if skeleton.config.tie_embeddings:
        skeleton.lm_head.weight = skeleton.embed_tokens.weight
    skeleton.init_rope(torch.device("cpu"))
    return skeleton


# --------------------------------------------------------------------------------------------------
# the sharded checkpoint

# only the trained tensors: a frozen base is rebuilt from init_from, as for ckpt.pt
_TRAINED = StateDictOptions(ignore_frozen_params=True)


def _dcp_state(model: Llama, optimizer) -> dict:
    """What DCP saves and loads in place: this rank's shards of the trained tensors and of AdamW's
    state, keyed by parameter name (so the layout is independent of the world size)."""
    return {"model": get_model_state_dict(model, options=_TRAINED),
            "optim": get_optimizer_state_dict(model, optimizer)}


def save_sharded_checkpoint(path: Path, model: Llama, optimizer, scaler, step: int,
                            data_generator: torch.Generator, cfg: TrainConfig, dtype: torch.dtype,
                            tokenizer_path: str, val_loss: float | None = None):
    """Write ckpt/ (the module docstring lists its files) from every rank: a collective. Rank 0
    makes the temp directory and names it to the others; it replaces `path` after the barrier that
    every rank reaches once its files are written."""
    rank = dist.get_rank()
    with (atomic_directory(path, "sharded checkpoint") if rank == 0 else nullcontext()) as tmp:
        tmp = Path(broadcast_object(str(tmp) if rank == 0 else None))
        dcp.save(_dcp_state(model, optimizer), checkpoint_id=str(tmp))
        with atomic_write(tmp / f"rng.rank{rank}.pt") as f:
            torch.save(rng_states(data_generator), f)
        if rank == 0:
            meta = dict(step=step,  # completed optimizer steps = the step to run next
                        world_size=dist.get_world_size(), val_loss=val_loss,
                        scaler=scaler.state_dict(), dtype=str(dtype).removeprefix("torch."),
                        tokenizer=str(tokenizer_path), model_config=model.config.to_dict(),
                        config=to_dict(cfg))
            atomic_write_bytes(tmp / TRAIN_STATE, (json.dumps(meta, indent=2) + "\n").encode())
        dist.barrier()


def read_train_state(path: Path) -> dict:
    """ckpt/train_state.json; a directory without one is not a checkpoint."""
    if not (path / TRAIN_STATE).is_file():
        raise FileNotFoundError(f"{path}: no sharded checkpoint to resume from "
                                f"(expected {path / TRAIN_STATE})")
    return read_json_object(path / TRAIN_STATE, "training state")


def load_sharded_checkpoint(path: Path, cfg: TrainConfig, model: Llama, optimizer, scaler,
                            data_generator: torch.Generator) -> int:
    """Load ckpt/ into a freshly sharded run: each rank reads its shards (DCP), AdamW's state, the
    GradScaler and its own RNG states; returns the step to run next. The config must match the
    checkpoint's except for RESUMABLE_CHANGES, and the world size must be the same."""
    meta = read_train_state(path)
    bad = resume_mismatches(meta["config"], cfg)
    if bad:
        raise ValueError(f"{path}: --resume with a different config:\n  " + "\n  ".join(bad))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if meta["world_size"] != world_size:
        raise ValueError(f"{path}: written by {meta['world_size']} ranks, this run has "
                         f"{world_size}; resume with --nproc_per_node {meta['world_size']} "
                         f"(each rank's RNG state is its own)")
    state = _dcp_state(model, optimizer)
    dcp.load(state, checkpoint_id=str(path))
    # DCP filled every trained tensor (a key missing from ckpt/ is an error there); the frozen ones
    # are init_from's and stay as built
    set_model_state_dict(model, state["model"],
                         options=StateDictOptions(ignore_frozen_params=True, strict=False))
    set_optimizer_state_dict(model, optimizer, state["optim"])
    scaler.load_state_dict(meta["scaler"])
    rng = path / f"rng.rank{rank}.pt"
    if not rng.is_file():
        raise FileNotFoundError(f"{rng}: rank {rank}'s RNG states are missing from the checkpoint")
    set_rng_states(torch.load(rng, map_location="cpu", weights_only=True), data_generator)
    return meta["step"]
