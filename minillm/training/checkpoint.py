"""Training checkpoints: atomic writes that hold every RNG state, so a resumed run is exact.

A checkpoint (out_dir/ckpt.pt) holds the model's trained tensors, the optimizer and GradScaler
states, the step, the run's config and every random state (torch CPU and CUDA, numpy, Python's
`random`, and the data generator that draws each step's batch). Since a step's batch and lr are pure
functions of those, a run stopped at step k and resumed logs bit-identical losses on CPU. With a
frozen base (LoRA / QLoRA) only the trained tensors are saved; the base is rebuilt from `init_from`.
`plain_llama` folds adapters and NF4 weights back into a plain float32 Llama, what `save_model`
writes for generate.py and export.py.
"""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import torch

from minillm.finetune.lora import LoRALinear
from minillm.model import Llama
from minillm.training.config import TrainConfig, to_dict
from minillm.util.fileio import atomic_write


def rng_states(data_generator: torch.Generator) -> dict:
    np_state = np.random.get_state()
    return dict(
        torch_cpu=torch.get_rng_state(),
        torch_cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        numpy=dict(name=np_state[0], keys=torch.from_numpy(np_state[1].astype(np.int64)),
                   pos=np_state[2], has_gauss=np_state[3], cached_gaussian=np_state[4]),
        python=random.getstate(),
        data=data_generator.get_state(),
    )


def set_rng_states(states: dict, data_generator: torch.Generator):
    torch.set_rng_state(states["torch_cpu"])
    if states["torch_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["torch_cuda"])
    n = states["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    data_generator.set_state(states["data"])


def save_checkpoint(path: Path, model: Llama, optimizer, scaler, step: int, data_generator,
                    cfg: TrainConfig, val_loss: float | None = None):
    """torch.save through fileio.atomic_write (temp file, fsync, rename): a kill mid-write keeps the
    old file, a full disk raises DiskFullError naming `path`."""
    ckpt = dict(
        model=trainable_state(model),
        model_config=model.config.to_dict(),
        optimizer=optimizer.state_dict(),
        scaler=scaler.state_dict(),
        step=step,  # the number of completed optimizer steps = the step to run next
        rng=rng_states(data_generator),
        config=to_dict(cfg),
        val_loss=val_loss,
    )
    with atomic_write(path) as f:
        torch.save(ckpt, f)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole state for full training; only the trained tensors when the base is frozen
    (LoRA/QLoRA): the base is rebuilt from init_from on resume, so a 7B QLoRA checkpoint holds
    megabytes, not gigabytes."""
    frozen = {k for k, p in model.named_parameters() if not p.requires_grad}
    if not frozen:
        return model.state_dict()
    trained = {k for k, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k in trained}


def load_trainable_state(model: torch.nn.Module, state: dict, source: str):
    missing, unexpected = model.load_state_dict(state, strict=False)
    trained = {k for k, p in model.named_parameters() if p.requires_grad}
    if unexpected or trained & set(missing):
        bad = unexpected[:3] if unexpected else sorted(trained & set(missing))[:3]
        what = f"unexpected {bad}" if unexpected else f"missing {bad}"
        raise ValueError(f"{source}: checkpoint does not match the model: {what}")


def plain_llama(model: Llama) -> Llama:
    """A plain float32 Llama with every LoRA adapter folded in (W0 + (α/r)·BA) and NF4 weights
    dequantized: what save_model writes for generate.py. `model` itself is not changed."""
    with torch.device("meta"):
        plain = Llama(model.config)
    state = {}
    for key in plain.state_dict():  # a tied lm_head is listed too (named_parameters yields it once)
        owner_name, _, leaf = key.rpartition(".")
        owner = model.get_submodule(owner_name)
        if isinstance(owner, LoRALinear):
            state[key] = owner.to_dense_linear().weight.detach().float().cpu()
        elif hasattr(owner, "dequantize"):  # an NF4Linear that carries no adapter
            state[key] = owner.dequantize(torch.float32).cpu()
        else:
            state[key] = getattr(owner, leaf).detach().float().cpu()
    plain.load_state_dict(state, assign=True)
    if model.config.tie_embeddings:
        plain.lm_head.weight = plain.embed_tokens.weight
    plain.init_rope(torch.device("cpu"))
    return plain


def load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint to resume from")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as e:
        # torch's own text advises weights_only=False
        raise ValueError(f"{path}: not a readable minillm training checkpoint "
                         f"(truncated or another format: {type(e).__name__})") from None
