"""Loading and saving model weights: OpenLLaMA / HF directories, minillm's own format, and the dispatch to
GGUF and Meta's consolidated layout.

Formats read (`load_pretrained` picks by what it finds at the path):

    model.gguf                     GGUF file (gguf_reader.py)
    dir/minillm_config.json        minillm: model.safetensors (our key names) + ModelConfig JSON
    dir/config.json                HF / OpenLLaMA: model.safetensors[.index.json] or
                                   pytorch_model.bin[.index.json] (shards listed in the index's weight_map)
    dir/params.json                Meta: consolidated.00.pth (meta_format.py)

How a big model loads without two copies in RAM: the Llama is built on the meta device (shapes only, no
memory), then each shard is opened in turn — `.bin` through `torch.load(weights_only=True, mmap=True)`, so
nothing is unpickled but tensors and the file is paged in lazily; safetensors through `safe_open` — and each
tensor is converted to the target dtype and device and put in place of its meta parameter. Peak memory is
about one copy of the weights in the target dtype plus one tensor.

Every inconsistency (missing file, index naming a missing shard, unknown or missing key, wrong shape,
truncated or corrupt shard) raises one error that names the file and the key.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn as nn

from minillm.config import ModelConfig, read_json_object
from minillm.fileio import atomic_write_bytes
from minillm.model import Llama
from minillm.names import hf_to_ours, ours_to_hf

MINILLM_CONFIG = "minillm_config.json"
HF_WEIGHT_FILES = (  # in order of preference
    ("model.safetensors.index.json", True),
    ("model.safetensors", False),
    ("pytorch_model.bin.index.json", True),
    ("pytorch_model.bin", False),
)


# -----------------------------------------------------------------------------------------------------
# reading tensors from shard files

ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive since PyTorch 1.6
LEGACY_TORCH_MAGIC = b"\x80\x02\x8a"  # before 1.6: a bare pickle stream (protocol 2, then a long magic)
LFS_POINTER = b"version https://git-lfs"  # a clone without `git lfs pull` has these small text files


def load_torch_weights(path: Path) -> dict:
    """torch.load(weights_only=True) of a .bin, memory-mapped, with every failure one line naming the file.

    The first bytes tell what the file is before torch parses it. torch's own errors suggest retrying
    with weights_only=False, i.e. running whatever code the file asks for: minillm never does, and its
    messages never suggest it (they keep only torch's reason, e.g. the global it refused).
    """
    with open(path, "rb") as f:
        head = f.read(64)
    legacy = head.startswith(LEGACY_TORCH_MAGIC)  # loadable, but a bare pickle stream cannot be mmapped
    if not head.startswith(ZIP_MAGIC) and not legacy:
        what = "a Git LFS pointer, not the weights (run `git lfs pull`)" if head.startswith(LFS_POINTER) else \
            f"its {path.stat().st_size} bytes start with {head[:16]!r}"
        raise ValueError(f"{path}: not a PyTorch zip checkpoint (expected a zip archive starting with "
                         f"{ZIP_MAGIC!r}, as torch.save writes): {what}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=not legacy)
    except pickle.UnpicklingError as e:
        reason = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\. Please|\n|$)", str(e))
        raise ValueError(f"{path}: holds more than tensors, which minillm does not load "
                         f"({reason[1] if reason else 'refused by the weights-only unpickler'})") from None
    except Exception as e:  # RuntimeError from the zip reader, EOFError, ...
        first = str(e).split(". ")[0].split("\n")[0]
        raise ValueError(f"{path}: truncated or corrupt PyTorch checkpoint ({type(e).__name__}: {first})") from None


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


def find_hf_shards(dirpath: Path) -> tuple[list[Path], dict[str, str] | None, Path]:
    """The shard files of an HF directory, the index's key → file map (None without index), and the file
    that named them (index or single file)."""
    for name, is_index in HF_WEIGHT_FILES:
        p = dirpath / name
        if not p.is_file():
            continue
        if not is_index:
            return [p], None, p
        weight_map = read_json_object(p, "weight index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{p}: 'weight_map' must map tensor names to file names")
        files = sorted(set(weight_map.values()))
        for fname in files:
            if Path(fname).name != fname:  # no "../" or absolute paths out of the checkpoint directory
                raise ValueError(f"{p}: shard name {fname!r} is not a file name in {dirpath}")
            if not (dirpath / fname).is_file():
                keys = [k for k, v in weight_map.items() if v == fname]
                raise FileNotFoundError(f"{p}: names shard {fname!r} (for {keys[0]!r} …) which does not exist")
        return [dirpath / f for f in files], weight_map, p
    wanted = ", ".join(n for n, _ in HF_WEIGHT_FILES)
    raise FileNotFoundError(f"{dirpath}: no weights found; expected one of {wanted}")


# -----------------------------------------------------------------------------------------------------
# filling a meta-device model


def _set_param(model: nn.Module, key: str, tensor: torch.Tensor):
    module_path, _, name = key.rpartition(".")
    module = model.get_submodule(module_path)
    module._parameters[name] = nn.Parameter(tensor, requires_grad=tensor.is_floating_point())


def fill_model(
    model: Llama,
    tensors: Iterator[tuple[str, str, torch.Tensor]],
    dtype: torch.dtype,
    device,
    linear_hook: Callable[[Llama, str, torch.Tensor], bool] | None = None,
    where: str = "",
    name_in_file: Callable[[str], str] = str,
):
    """Put (source file, our key, tensor) triples into a meta-device model, checking names and shapes.

    dtype None keeps each tensor's stored dtype (with a memory-mapped .bin that is zero-copy).

    A weight none of the files held is reported as `{where}: missing weights: <name_in_file(key)>`, where
    names the file(s) that should hold it. With tied embeddings a stored lm_head.weight (a `.bin` saved
    by torch.save keeps both names of a shared tensor) is accepted if it equals the embedding.

    linear_hook(model, key, weight) may consume a 2-D linear weight (e.g. quantize it into an NF4 layer)
    and return True; the weight then never exists in `dtype` on `device`.
    """
    expected = {k: p.shape for k, p in model.named_parameters()}  # a tied lm_head is not listed
    seen: dict[str, str] = {}
    tied_head = None
    for source, key, t in tensors:
        if key.endswith("rotary_emb.inv_freq"):
            continue  # old HF checkpoints saved the RoPE frequencies; we compute them
        if key == "lm_head.weight" and model.config.tie_embeddings:
            tied_head = (source, t)  # checked against the embedding below
            continue
        if key not in expected:
            raise ValueError(f"{source}: unexpected weight {key!r} (not a parameter of this Llama config)")
        if key in seen:
            raise ValueError(f"{source}: weight {key!r} appears twice (also in {seen[key]})")
        if tuple(t.shape) != tuple(expected[key]):
            raise ValueError(
                f"{source}: weight {key!r} has shape {tuple(t.shape)}, expected {tuple(expected[key])} "
                "from the config"
            )
        if not t.is_floating_point():
            raise ValueError(f"{source}: weight {key!r} has dtype {t.dtype}, expected a floating point tensor")
        seen[key] = source
        if linear_hook is not None and linear_hook(model, key, t):
            continue
        _set_param(model, key, t.to(device=device, dtype=dtype))
    missing = [k for k in expected if k not in seen]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        names = ", ".join(repr(name_in_file(k)) for k in missing[:3])
        where = where or ", ".join(sorted(set(seen.values()))) or "checkpoint"
        raise ValueError(f"{where}: missing weights: {names}{more}")
    if model.config.tie_embeddings:
        if tied_head is not None and not torch.equal(tied_head[1].to(device=device, dtype=dtype),
                                                     model.embed_tokens.weight.detach()):
            raise ValueError(f"{tied_head[0]}: holds an lm_head.weight that differs from the embedding, but the "
                             f"config ties them (tie_word_embeddings)")
        model.lm_head.weight = model.embed_tokens.weight
    model.init_rope(torch.device(device))
    return model


def nf4_hook(blocksize: int = 64, double_quant: bool = False, compute_dtype=torch.bfloat16, device="cpu"):
    """A linear_hook that quantizes every projection inside the blocks to NF4 as it streams in, so peak
    memory never holds the full-precision model. Embeddings, norms and lm_head stay in `dtype`."""
    from minillm.nf4 import NF4Linear

    def hook(model: Llama, key: str, t: torch.Tensor) -> bool:
        if not (key.startswith("layers.") and key.endswith("_proj.weight")):
            return False
        module_path = key.removesuffix(".weight")
        parent_path, _, child = module_path.rpartition(".")
        layer = NF4Linear.from_weight(
            t.to(device=device, dtype=torch.float32), blocksize=blocksize, double_quant=double_quant,
            compute_dtype=compute_dtype,
        )
        setattr(model.get_submodule(parent_path), child, layer)
        return True

    return hook


# -----------------------------------------------------------------------------------------------------
# the formats


def load_hf(dirpath: Path, dtype, device, linear_hook=None) -> Llama:
    cfg = ModelConfig.from_hf_config(dirpath / "config.json")
    shards, weight_map, named_by = find_hf_shards(dirpath)
    with torch.device("meta"):
        model = Llama(cfg)
    if weight_map is not None:  # check the index against the config before reading gigabytes
        names = {ours_to_hf(k) for k, _ in model.named_parameters()}
        listed = {k for k in weight_map if not k.endswith("rotary_emb.inv_freq")}
        if cfg.tie_embeddings:
            listed.discard("lm_head.weight")  # a copy of the embedding (checked in fill_model)
        if names - listed:
            raise ValueError(f"{named_by}: index lacks weight {sorted(names - listed)[0]!r}")
        if listed - names:
            raise ValueError(f"{named_by}: index lists unexpected weight {sorted(listed - names)[0]!r}")

    def tensors():
        for shard in shards:
            for k, t in iter_shard(shard):
                if weight_map is not None and weight_map.get(k, shard.name) != shard.name:
                    raise ValueError(f"{shard}: holds {k!r}, which {named_by.name} places in {weight_map[k]!r}")
                yield str(shard), hf_to_ours(k), t

    where = named_by if weight_map is None else f"{dirpath} (shards listed in {named_by.name})"
    return fill_model(model, tensors(), dtype, device, linear_hook, where=str(where), name_in_file=ours_to_hf)


def load_minillm(dirpath: Path, dtype, device, linear_hook=None) -> Llama:
    cfg_path = dirpath / MINILLM_CONFIG
    cfg = ModelConfig.from_dict(read_json_object(cfg_path, "minillm config"), source=str(cfg_path))
    weights = dirpath / "model.safetensors"
    with torch.device("meta"):
        model = Llama(cfg)
    return fill_model(model, ((str(weights), k, t) for k, t in iter_shard(weights)), dtype, device, linear_hook,
                      where=str(weights))


def load_pretrained(path, dtype=torch.float32, device="cpu", quantize: str | None = None, **nf4_kwargs) -> Llama:
    """Load any supported checkpoint into a Llama (see the module docstring for the formats).

    dtype None keeps the dtype the weights are stored in (what export uses: no rounding before quantizing).

    quantize="nf4" stores every block projection as an NF4Linear (QLoRA's frozen base), quantized as it
    streams in; nf4_kwargs (blocksize, double_quant) are passed on.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint path does not exist")
    if quantize not in (None, "nf4"):
        raise ValueError(f"quantize must be None or 'nf4', found {quantize!r}")
    hook = None
    if quantize == "nf4":
        hook = nf4_hook(compute_dtype=dtype or torch.float32, device=device, **nf4_kwargs)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path}: a checkpoint file must be .gguf; for HF/minillm weights pass the directory")
        from minillm.gguf_reader import load_gguf_model

        cfg, state, _ = load_gguf_model(path)
        with torch.device("meta"):
            model = Llama(cfg)
        return fill_model(model, ((str(path), k, t) for k, t in state.items()), dtype, device, hook, where=str(path))
    if (path / MINILLM_CONFIG).is_file():
        model = load_minillm(path, dtype, device, hook)
    elif (path / "config.json").is_file():
        model = load_hf(path, dtype, device, hook)
    elif (path / "params.json").is_file():
        from minillm.meta_format import load_meta

        model = load_meta(path, dtype, device, hook)
    else:
        raise FileNotFoundError(
            f"{path}: not a checkpoint directory (expected {MINILLM_CONFIG}, config.json or params.json)"
        )
    return model.eval()


def load_tokenizer(checkpoint, tokenizer_path=None):
    """The tokenizer for a checkpoint: an explicit tokenizer_path, the tokenizer.model beside it, or for a
    GGUF file the SentencePiece model rebuilt from its metadata."""
    from minillm.tokenizer import Tokenizer

    if tokenizer_path is not None:
        return Tokenizer(tokenizer_path)
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():  # say so, rather than that the tokenizer.model inside it is missing
        raise FileNotFoundError(f"{checkpoint}: checkpoint path does not exist")
    if checkpoint.is_file() and checkpoint.suffix == ".gguf":
        from minillm.gguf_reader import read_gguf, sentencepiece_model_from_gguf

        return Tokenizer(model_bytes=sentencepiece_model_from_gguf(read_gguf(checkpoint)))
    path = checkpoint / "tokenizer.model"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing tokenizer.model beside the checkpoint (pass a tokenizer path)")
    return Tokenizer(path)


# -----------------------------------------------------------------------------------------------------
# minillm's own format


def save_model(model: Llama, dirpath, tokenizer_path=None):
    """Write model.safetensors (our key names) + minillm_config.json (+ tokenizer.model), each atomically.

    A tied lm_head is stored once (as the embedding). Every file is written under a temp name and renamed,
    so an interrupted save leaves the previous files intact.
    """
    from safetensors.torch import save

    dirpath = Path(dirpath)
    dirpath.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    atomic_write_bytes(dirpath / "model.safetensors", save(state))
    atomic_write_bytes(dirpath / MINILLM_CONFIG, json.dumps(model.config.to_dict(), indent=2).encode())
    if tokenizer_path is not None and Path(tokenizer_path).resolve() != (dirpath / "tokenizer.model").resolve():
        atomic_write_bytes(dirpath / "tokenizer.model", Path(tokenizer_path).read_bytes())


# -----------------------------------------------------------------------------------------------------
# HF format out (the inverse of load_hf)


def shard_groups(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Split (key, nbytes) pairs, in order, into consecutive groups of at most max_bytes each (a tensor
    larger than max_bytes gets a shard of its own): the `-0000K-of-0000N` shards of the HF layout."""
    groups, cur, size = [], [], 0
    for key, n in sizes:
        if cur and size + n > max_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur.append(key)
        size += n
    groups.append(cur)
    return groups


def save_hf(model: Llama, dirpath, tokenizer_path=None, dtype=None, shard_bytes: int = 2 * 1024**3):
    """Write an HF / OpenLLaMA-layout directory: config.json, model-0000K-of-0000N.safetensors shards of at
    most `shard_bytes` + model.safetensors.index.json, and the tokenizer files. dtype None keeps the
    model's dtype. Files are written one shard at a time, each atomically."""
    from safetensors.torch import save

    dirpath = Path(dirpath)
    dirpath.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    items = {ours_to_hf(k): v for k, v in model.state_dict().items()
             if not (k == "lm_head.weight" and cfg.tie_embeddings)}
    out_size = None if dtype is None else torch.empty(0, dtype=dtype).element_size()
    groups = shard_groups([(k, v.numel() * (out_size or v.element_size())) for k, v in items.items()],
                          shard_bytes)
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        part = {k: items[k].detach().to(device="cpu", dtype=dtype).contiguous() for k in group}
        total += sum(t.numel() * t.element_size() for t in part.values())
        atomic_write_bytes(dirpath / name, save(part, metadata={"format": "pt"}))
        weight_map.update({k: name for k in part})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    atomic_write_bytes(dirpath / "model.safetensors.index.json", json.dumps(index, indent=2).encode())
    hf_cfg = cfg.to_hf_config()
    stored = dtype or next(model.parameters()).dtype
    hf_cfg["torch_dtype"] = str(stored).removeprefix("torch.")
    atomic_write_bytes(dirpath / "config.json", json.dumps(hf_cfg, indent=2).encode())
    side = {
        "generation_config.json": {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0},
        "special_tokens_map.json": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
        "tokenizer_config.json": {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>",
                                  "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
                                  "tokenizer_class": "LlamaTokenizer", "legacy": True,
                                  "model_max_length": cfg.max_seq_len, "clean_up_tokenization_spaces": False},
    }
    for name, content in side.items():
        atomic_write_bytes(dirpath / name, json.dumps(content, indent=2).encode())
    if tokenizer_path is not None:
        atomic_write_bytes(dirpath / "tokenizer.model", Path(tokenizer_path).read_bytes())
