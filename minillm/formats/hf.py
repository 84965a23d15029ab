"""HF / OpenLLaMA checkpoint directories, in and out: `config.json` + weights as
`model.safetensors`, `pytorch_model.bin`, or either sharded with an index (`*.index.json`, whose
`weight_map` names the file of each tensor), beside the tokenizer files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from minillm.config import ModelConfig
from minillm.formats.weights import fill_model, iter_shard
from minillm.model import Llama
from minillm.names import hf_to_ours, ours_to_hf
from minillm.util.fileio import atomic_write_bytes, read_json_object

HF_WEIGHT_FILES = (  # in order of preference
    ("model.safetensors.index.json", True),
    ("model.safetensors", False),
    ("pytorch_model.bin.index.json", True),
    ("pytorch_model.bin", False),
)



def find_hf_shards(dirpath: Path) -> tuple[list[Path], dict[str, str] | None, Path]:
    """The shard files of an HF directory, the index's key → file map (None without index), and the
    file that named them (index or single file)."""
    for name, is_index in HF_WEIGHT_FILES:
        p = dirpath / name
        if not p.is_file():
            continue
        if not is_index:
            return [p], None, p
        weight_map = read_json_object(p, "weight index").get("weight_map")
        if (not isinstance(weight_map, dict)
                or not all(isinstance(v, str) for v in weight_map.values())):
            raise ValueError(f"{p}: 'weight_map' must map tensor names to file names")
        files = sorted(set(weight_map.values()))
        for fname in files:
            # no "../" or absolute paths out of the checkpoint directory
            if Path(fname).name != fname:
                raise ValueError(f"{p}: shard name {fname!r} is not a file name in {dirpath}")
            if not (dirpath / fname).is_file():
                keys = [k for k, v in weight_map.items() if v == fname]
                raise FileNotFoundError(f"{p}: names shard {fname!r} (for {keys[0]!r} …) "
                                        f"which does not exist")
        return [dirpath / f for f in files], weight_map, p
    wanted = ", ".join(n for n, _ in HF_WEIGHT_FILES)
    raise FileNotFoundError(f"{dirpath}: no weights found; expected one of {wanted}")



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
            raise ValueError(f"{named_by}: index lists unexpected weight "
                             f"{sorted(listed - names)[0]!r}")

    def tensors():
        for shard in shards:
            for k, t in iter_shard(shard):
                if weight_map is not None and weight_map.get(k, shard.name) != shard.name:
                    raise ValueError(f"{shard}: holds {k!r}, which {named_by.name} places in "
                                     f"{weight_map[k]!r}")
                yield str(shard), hf_to_ours(k), t

    where = named_by if weight_map is None else f"{dirpath} (shards listed in {named_by.name})"
    return fill_model(model, tensors(), dtype, device, linear_hook, where=str(where),
                      name_in_file=ours_to_hf)



# --------------------------------------------------------------------------------------------------
# HF format out (the inverse of load_hf)


def shard_groups(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Split (key, nbytes) pairs, in order, into consecutive groups of at most max_bytes each (a
    tensor larger than max_bytes gets a shard of its own): the `-0000K-of-0000N` shards of the HF
    layout."""
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
    """Write an HF / OpenLLaMA-layout directory: config.json, model-0000K-of-0000N.safetensors
    shards of at most `shard_bytes` + model.safetensors.index.json, and the tokenizer files. dtype
    None keeps the model's dtype. Files are written one shard at a time, each atomically."""
    from safetensors.torch import save

    dirpath = Path(dirpath)
    dirpath.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    items = {ours_to_hf(k): v for k, v in model.state_dict().items()
             if not (k == "lm_head.weight" and cfg.tie_embeddings)}
    out_size = None if dtype is None else torch.empty(0, dtype=dtype).element_size()
    groups = shard_groups([(k, v.numel() * (out_size or v.element_size()))
                           for k, v in items.items()], shard_bytes)
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        part = {k: items[k].detach().to(device="cpu", dtype=dtype).contiguous() for k in group}
        total += sum(t.numel() * t.element_size() for t in part.values())
        atomic_write_bytes(dirpath / name, save(part, metadata={"format": "pt"}))
        weight_map.update({k: name for k in part})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    atomic_write_bytes(dirpath / "model.safetensors.index.json",
                       json.dumps(index, indent=2).encode())
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
                                  "model_max_length": cfg.max_seq_len,
                                  "clean_up_tokenization_spaces": False},
    }
    for name, content in side.items():
        atomic_write_bytes(dirpath / name, json.dumps(content, indent=2).encode())
    if tokenizer_path is not None:
        atomic_write_bytes(dirpath / "tokenizer.model", Path(tokenizer_path).read_bytes())
