"""Weight files in, tensors out: reading `.bin` and `.safetensors` shards safely, and filling a
model built on the meta device with them, one tensor at a time.

    iter_shard(path)          (key, tensor) pairs of one file; `.bin` through
                              torch.load(weights_only=True, mmap=True): nothing but tensors is
                              unpickled
    fill_model(model, ...)    put (file, our key, tensor) triples into a meta-device Llama,
                              checking every name, shape and dtype; a linear_hook may take a weight
                              instead (NF4 on load)

How a big model loads without two copies in RAM: the Llama is built on the meta device (shapes only,
no memory), then each shard is opened in turn and each tensor is converted to the target dtype and
device and put in place of its meta parameter. Peak memory is about one copy of the weights in the
target dtype plus one tensor. Every inconsistency raises one error that names the file and the key.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn as nn

from minillm.model import Llama

# --------------------------------------------------------------------------------------------------
# reading tensors from shard files

ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive since PyTorch 1.6
# before 1.6: a bare pickle stream (protocol 2, then a long magic)
LEGACY_TORCH_MAGIC = b"\x80\x02\x8a"
# a clone without `git lfs pull` has these small text files
LFS_POINTER = b"version https://git-lfs"


def load_torch_weights(path: Path) -> dict:
    """torch.load(weights_only=True) of a .bin, memory-mapped, with every failure one line naming
    the file.

    The first bytes tell what the file is before torch parses it. torch's own errors suggest
    retrying with weights_only=False, i.e. running whatever code the file asks for: minillm never
    does, and its messages never suggest it (they keep only torch's reason, e.g. the global it
    refused).
    """
    with open(path, "rb") as f:
        head = f.read(64)
    # loadable, but a bare pickle stream cannot be mmapped
    legacy = head.startswith(LEGACY_TORCH_MAGIC)
    if not head.startswith(ZIP_MAGIC) and not legacy:
        what = ("a Git LFS pointer, not the weights (run `git lfs pull`)"
                if head.startswith(LFS_POINTER)
                else f"its {path.stat().st_size} bytes start with {head[:16]!r}")
        raise ValueError(f"{path}: not a PyTorch zip checkpoint (expected a zip archive "
                         f"starting with {ZIP_MAGIC!r}, as torch.save writes): {what}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=not legacy)
    except pickle.UnpicklingError as e:
        reason = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\. Please|\n|$)", str(e))
        raise ValueError(
            f"{path}: holds more than tensors, which minillm does not load "
            f"({reason[1] if reason else 'refused by the weights-only unpickler'})") from None
    except Exception as e:  # RuntimeError from the zip reader, EOFError, ...
        first = str(e).split(". ")[0].split("\n")[0]
        raise ValueError(f"{path}: truncated or corrupt PyTorch checkpoint "
                         f"({type(e).__name__}: {first})") from None


def check_finite(t: torch.Tensor, where: str, name: str):
    """Refuse a tensor holding NaN or inf: one line naming the file, the tensor and the first bad
    element (a corrupt or diverged checkpoint would otherwise load and generate garbage)."""
    if not t.is_floating_point():
        return
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        first = int(bad.reshape(-1).nonzero()[0])
        value = t.reshape(-1)[first].item()
        raise ValueError(f"{where}: tensor {name!r} holds {value} at element {first} of "
                         f"{t.numel()} (NaN or inf weights: the file is corrupt, or the run that "
                         f"wrote it diverged)")


def iter_shard(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) from one `.bin` or `.safetensors` file, turning any read error into a
    ValueError that names the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weight file not found")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            f = safe_open(str(path), framework="pt", device="cpu")
            keys = list(f.keys())
        except Exception as e:  # safetensors raises its own SafetensorError for bad headers/sizes
            raise ValueError(f"{path}: not a valid safetensors file ({e})") from None
        for k in keys:
            try:
                t = f.get_tensor(k)
            except Exception as e:
                raise ValueError(f"{path}: cannot read tensor {k!r} ({e})") from None
            yield k, t
    else:
        state = load_torch_weights(path)
        if not isinstance(state, dict):
            raise ValueError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
        for k, t in state.items():
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{path}: entry {k!r} is a {type(t).__name__}, expected a tensor")
            yield k, t


# --------------------------------------------------------------------------------------------------
# filling a meta-device model


def _set_param(model: nn.Module, key: str, tensor: torch.Tensor):
    module_path, _, name = key.rpartition(".")
    module = model.get_submodule(module_path)
    module._parameters[name] = nn.Parameter(tensor, requires_grad=tensor.is_floating_point())


def _set_bias(model: nn.Module, key: str, tensor: torch.Tensor):
    """A projection's bias (Qwen2's q/k/v), set after every weight: a linear_hook may have swapped
    the nn.Linear for a quantized layer, which keeps its bias as a float32 buffer."""
    module = model.get_submodule(key.removesuffix(".bias"))
    if isinstance(module, nn.Linear):
        _set_param(model, key, tensor)
        return
    if "bias" not in module._buffers:
        del module.bias  # the layer was built without one (a plain None attribute)
    module.register_buffer("bias", tensor.float())


def fill_model(
    model: Llama,
    tensors: Iterator[tuple[str, str, torch.Tensor]],
    dtype: torch.dtype,
    device,
    linear_hook: Callable[[Llama, str, torch.Tensor], bool] | None = None,
    where: str = "",
    name_in_file: Callable[[str], str] = str,
):
    """Put (source file, our key, tensor) triples into a meta-device model, checking names and
    shapes.

    dtype None keeps each tensor's stored dtype (with a memory-mapped .bin that is zero-copy).

    A weight none of the files held is reported as `{where}: missing weights: <name_in_file(key)>`,
    where names the file(s) that should hold it. With tied embeddings a stored lm_head.weight (a
    `.bin` saved by torch.save keeps both names of a shared tensor) is accepted if it equals the
    embedding.

    linear_hook(model, key, weight) may consume a 2-D linear weight (e.g. quantize it into an NF4
    layer) and return True; the weight then never exists in `dtype` on `device`.
    """
    expected = {k: p.shape for k, p in model.named_parameters()}  # a tied lm_head is not listed
    seen: dict[str, str] = {}
    tied_head, biases = None, {}
    for source, key, t in tensors:
        if key.endswith("rotary_emb.inv_freq"):
            continue  # old HF checkpoints saved the RoPE frequencies; we compute them
        if key == "lm_head.weight" and model.config.tie_embeddings:
            tied_head = (source, t)  # checked against the embedding below
            continue
        if key not in expected:
            raise ValueError(f"{source}: unexpected weight {key!r} "
                             f"(not a parameter of this Llama config)")
        if key in seen:
            raise ValueError(f"{source}: weight {key!r} appears twice (also in {seen[key]})")
        if tuple(t.shape) != tuple(expected[key]):
            raise ValueError(f"{source}: weight {key!r} has shape {tuple(t.shape)}, "
                             f"expected {tuple(expected[key])} from the config")
        if not t.is_floating_point():
            raise ValueError(f"{source}: weight {key!r} has dtype {t.dtype}, "
                             f"expected a floating point tensor")
        seen[key] = source
        check_finite(t, source, name_in_file(key))
        if key.endswith("_proj.bias"):  # after the weights, whatever their order in the file
            biases[key] = t
            continue
        if linear_hook is not None and linear_hook(model, key, t):
            continue
        _set_param(model, key, t.to(device=device, dtype=dtype))
    for key, t in biases.items():
        _set_bias(model, key, t.to(device=device, dtype=dtype))
    missing = [k for k in expected if k not in seen]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        names = ", ".join(repr(name_in_file(k)) for k in missing[:3])
        where = where or ", ".join(sorted(set(seen.values()))) or "checkpoint"
        raise ValueError(f"{where}: missing weights: {names}{more}")
    if model.config.tie_embeddings:
        if tied_head is not None and not torch.equal(tied_head[1].to(device=device, dtype=dtype),
                                                     model.embed_tokens.weight.detach()):
            raise ValueError(f"{tied_head[0]}: holds an lm_head.weight that differs from the "
                             f"embedding, but the config ties them (tie_word_embeddings)")
        model.lm_head.weight = model.embed_tokens.weight
    model.init_rope(torch.device(device))
    return model
