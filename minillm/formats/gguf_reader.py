"""GGUF reader: parse and validate a GGUF v3 file, and load a Llama back from it.

The byte layout is in formats/gguf_layout.py. `read_gguf` validates every count, length, type id and
offset against the file size before using it, so a truncated or corrupt file gives a ValueError
naming the file and offset instead of a crash, a hang or a huge allocation. Tensor data is
memory-mapped.

`load_gguf_model` turns a llama.cpp Llama file (ours, or one llama.cpp's converter wrote) into a
minillm config, a float32 state dict (q/k permuted back from llama.cpp's interleaved RoPE pairs to
HF's rotate-half rows) and a SentencePiece model rebuilt from the tokenizer.ggml.* metadata.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minillm.config import ModelConfig, check_llama3_scaling
from minillm.formats.ggml_quants import GGML_TYPES, dequantize, type_name
from minillm.formats.gguf_layout import (
    ARRAY,
    BOOL,
    FLOAT32,
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    GGUF_VERSION,
    INT32,
    NUMPY,
    ROPE_FREQS,
    STRING,
    STRUCT,
    UINT8,
    UINT32,
    UINT64,
    VALUE_TYPE_NAMES,
    align,
    expected_shapes,
)
from minillm.model import llama3_rope_divisors, rope_inv_freq
from minillm.names import gguf_to_ours, interleaved_to_hf, is_rope_rotated, ours_to_gguf
from minillm.tokenizer.spm_proto import bpe_model_proto

# --------------------------------------------------------------------------------------------------
# Reading the file


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # PyTorch order: the file's dims reversed
    ggml_type: int
    offset: int  # relative to the data section, as stored
    nbytes: int


@dataclass
class GGUFFile:
    path: Path
    version: int
    alignment: int
    data_start: int  # absolute file offset of the data section
    # scalars as Python values, numeric arrays as numpy, string arrays as lists
    metadata: dict[str, Any]
    value_types: dict[str, tuple[int, int | None]]  # key -> (value type, element type for arrays)
    tensors: dict[str, GGUFTensorInfo]  # in file order
    _buf: mmap.mmap = field(repr=False)

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 view of the memory-mapped file."""
        t = self.tensors[name]
        return np.frombuffer(self._buf, dtype=np.uint8, count=t.nbytes,
                             offset=self.data_start + t.offset)

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor dequantized to float32, in PyTorch shape (a copy). A NaN or inf anywhere (a
        corrupt block scale, or an f16 / bf16 / f32 value) is an error naming the file, the tensor
        and, for a block type, the block."""
        t = self.tensors[name]
        data = torch.from_numpy(self.raw(name).copy())
        w = dequantize(data, t.ggml_type, t.shape[-1]).reshape(t.shape)
        bad = ~torch.isfinite(w.reshape(-1))
        if bool(bad.any()):
            first = int(bad.nonzero()[0])
            block = GGML_TYPES[t.ggml_type][1]
            where = f"block {first // block} (element {first})" if block > 1 else f"element {first}"
            raise ValueError(f"{self.path}: tensor {name!r} ({type_name(t.ggml_type)}) decodes to "
                             f"{w.reshape(-1)[first].item()} in {where}: a NaN or inf scale or "
                             f"value, the file is corrupt")
        return w


class _Cursor:
    """Bounds-checked little-endian reads; every failure names the file and the offset."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.size, self.path = buf, 0, len(buf), path

    def fail(self, msg: str) -> ValueError:
        return ValueError(f"{self.path}: {msg}")

    def take(self, n: int, what: str) -> bytes:
        if n > self.size - self.pos:
            raise self.fail(f"truncated or corrupt: {what} at offset {self.pos} needs {n} bytes, "
                            f"the file has {self.size - self.pos} left")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def scalar(self, vtype: int, what: str):
        return struct.unpack(STRUCT[vtype], self.take(struct.calcsize(STRUCT[vtype]), what))[0]

    def string(self, what: str) -> str:
        start = self.pos
        raw = self.take(self.scalar(UINT64, f"{what} length"), what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} at offset {start} is not valid UTF-8") from None

    def value(self, vtype: int, key: str) -> tuple[Any, int | None]:
        """(value, element type if an array)."""
        if vtype == STRING:
            return self.string(f"value of {key!r}"), None
        if vtype == BOOL:
            return self.scalar(UINT8, f"value of {key!r}") != 0, None
        if vtype in STRUCT:
            return self.scalar(vtype, f"value of {key!r}"), None
        if vtype != ARRAY:
            raise self.fail(f"key {key!r} at offset {self.pos - 4} has unknown value type {vtype}")
        elem = self.scalar(UINT32, f"element type of {key!r}")
        count = self.scalar(UINT64, f"element count of {key!r}")
        if elem == STRING:
            if count * 8 > self.size - self.pos:  # every string needs at least its 8-byte length
                raise self.fail(f"array {key!r} claims {count} strings at offset {self.pos}, "
                                f"more than the {self.size - self.pos} bytes left can hold")
            return [self.string(f"element {i} of {key!r}") for i in range(count)], elem
        if elem not in NUMPY:
            raise self.fail(f"array {key!r} at offset {self.pos - 12} has unsupported element type "
                            f"{elem}")
        dtype = np.dtype(NUMPY[elem])
        arr = np.frombuffer(self.take(count * dtype.itemsize, f"{count} elements of {key!r}"),
                            dtype=dtype)
        return (arr.astype(bool) if elem == BOOL else arr), elem


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse and validate a GGUF v3 file; tensor data stays memory-mapped."""
    path = Path(path)
    size = path.stat().st_size
    if size < 24:
        raise ValueError(f"{path}: {size} bytes is too small for a GGUF header (24 bytes)")
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    cur = _Cursor(buf, path)
    magic = cur.take(4, "magic")
    if magic != GGUF_MAGIC:
        raise cur.fail(f"not a GGUF file: magic {magic!r} at offset 0, expected {GGUF_MAGIC!r}")
    version = cur.scalar(UINT32, "version")
    if version != GGUF_VERSION:
        raise cur.fail(f"GGUF version {version} at offset 4, only version {GGUF_VERSION} "
                       f"is supported")
    n_tensors = cur.scalar(UINT64, "tensor count")
    n_kv = cur.scalar(UINT64, "metadata count")
    # each key/value takes >= 13 bytes (8 key length + 4 type + 1 value); each tensor info >= 32
    if n_kv * 13 + n_tensors * 32 > size - 24:
        raise cur.fail(f"header claims {n_kv} metadata entries and {n_tensors} tensors, "
                       f"impossible in a {size}-byte file")

    metadata: dict[str, Any] = {}
    value_types: dict[str, tuple[int, int | None]] = {}
    for _ in range(n_kv):
        at = cur.pos
        key = cur.string("metadata key")
        if key in metadata:
            raise cur.fail(f"duplicate metadata key {key!r} at offset {at}")
        vtype = cur.scalar(UINT32, f"value type of {key!r}")
        metadata[key], elem = cur.value(vtype, key)
        value_types[key] = (vtype, elem)

    alignment = metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if "general.alignment" in metadata and (value_types["general.alignment"][0] != UINT32
                                            or alignment == 0 or alignment & (alignment - 1)):
        raise cur.fail(f"general.alignment must be a UINT32 power of two, found {alignment!r}")

    infos = []
    for i in range(n_tensors):
        at = cur.pos
        name = cur.string(f"name of tensor {i}")
        if len(name.encode("utf-8")) >= 64:
            raise cur.fail(f"tensor name {name!r} at offset {at} is {len(name.encode())} bytes, "
                           f"ggml allows 63")
        n_dims = cur.scalar(UINT32, f"n_dims of {name!r}")
        if not 1 <= n_dims <= 4:
            raise cur.fail(f"tensor {name!r} at offset {at} has n_dims {n_dims}, expected 1..4")
        dims = [cur.scalar(UINT64, f"dim {j} of {name!r}") for j in range(n_dims)]
        ggml_type = cur.scalar(UINT32, f"type of {name!r}")
        offset = cur.scalar(UINT64, f"offset of {name!r}")
        if ggml_type not in GGML_TYPES:
            raise cur.fail(f"tensor {name!r} at offset {at} has unknown ggml type id {ggml_type}")
        _, block, type_size = GGML_TYPES[ggml_type]
        if any(d >= 2**63 for d in dims) or dims[0] % block != 0:
            raise cur.fail(f"tensor {name!r} at offset {at} has dims {dims}; the first must be "
                           f"a multiple of {type_name(ggml_type)}'s block size {block}")
        nbytes = int(np.prod(dims, dtype=object)) // block * type_size
        infos.append(GGUFTensorInfo(name, tuple(reversed(dims)), ggml_type, offset, nbytes))

    data_start = align(cur.pos, alignment)
    tensors: dict[str, GGUFTensorInfo] = {}
    expected = 0  # llama.cpp requires data in info order, each tensor at the previous end, aligned
    for t in infos:
        if t.name in tensors:
            raise cur.fail(f"duplicate tensor name {t.name!r}")
        if t.offset != expected:
            raise cur.fail(f"tensor {t.name!r} has data offset {t.offset}, expected {expected} "
                           f"(the previous tensor's end rounded up to the alignment {alignment})")
        end = data_start + t.offset + t.nbytes
        if end > size:
            raise cur.fail(f"tensor {t.name!r} data [{data_start + t.offset}, {end}) runs past "
                           f"the end of the {size}-byte file")
        tensors[t.name] = t
        expected = align(t.offset + t.nbytes, alignment)
    return GGUFFile(path, version, alignment, data_start, metadata, value_types, tensors, buf)


# --------------------------------------------------------------------------------------------------
# Loading a Llama back: config, float32 state dict, SentencePiece model


def _require(g: GGUFFile, key: str, vtype: int, elem: int | None = None):
    if key not in g.metadata:
        raise ValueError(f"{g.path}: metadata key {key!r} is missing")
    found = g.value_types[key]
    if found != (vtype, elem):
        raise ValueError(f"{g.path}: metadata key {key!r} has type {_type_str(*found)}, "
                         f"expected {_type_str(vtype, elem)}")
    return g.metadata[key]


def _type_str(vtype: int, elem: int | None) -> str:
    name = VALUE_TYPE_NAMES[vtype]  # the reader only admits known value types
    return name if elem is None else f"{name}[{VALUE_TYPE_NAMES[elem]}]"


def _short_float(x: float) -> float:
    # a FLOAT32 1e-6 reads as 9.99999997e-07; the shortest repr of the float32 gives back 1e-06
    return float(str(np.float32(x)))


def load_gguf_model(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor], bytes]:
    """(config, float32 state dict with our keys and HF-layout q/k, SentencePiece model bytes;
    b"" for a byte-level BPE vocabulary, which tokenizer/bpe_files.py reads from the metadata)."""
    config, state = load_gguf_weights(path)
    g = read_gguf(path)
    is_bpe = g.metadata.get("tokenizer.ggml.model") == "gpt2"
    return config, state, b"" if is_bpe else sentencepiece_model_from_gguf(g)


# llama.cpp's architectures with a minillm Llama's maths; qwen2 (biases on q/k/v) uses NEOX RoPE, so
# its converter writes q/k rows unpermuted
GGUF_ARCHS = ("llama", "qwen2")


def _gguf_config(g: GGUFFile) -> ModelConfig:
    """The ModelConfig in a llama.cpp Llama's (or Qwen2's: the same keys under "qwen2.")
    metadata (untrusted: config.check_model_values bounds the sizes and rejects NaN / zero /
    negative epsilon and RoPE base, naming the GGUF key)."""
    arch = _require(g, "general.architecture", STRING)
    if arch not in GGUF_ARCHS:
        raise ValueError(f"{g.path}: general.architecture is {arch!r}, minillm loads "
                         f"{' and '.join(map(repr, GGUF_ARCHS))}")
    tokens = _require(g, "tokenizer.ggml.tokens", ARRAY, STRING)
    keys = {"dim": f"{arch}.embedding_length", "n_layers": f"{arch}.block_count",
            "n_heads": f"{arch}.attention.head_count",
            "n_kv_heads": f"{arch}.attention.head_count_kv",
            "hidden_dim": f"{arch}.feed_forward_length", "vocab_size": "tokenizer.ggml.tokens",
            "max_seq_len": f"{arch}.context_length",
            "norm_eps": f"{arch}.attention.layer_norm_rms_epsilon",
            "rope_theta": f"{arch}.rope.freq_base", "head_dim": f"{arch}.attention.key_length",
            "attention_bias": "blk.0.attn_q.bias", "attention_out_bias": "blk.0.attn_output.bias"}
    values = {field: int(_require(g, key, UINT32)) for field, key in keys.items()
              if field not in ("vocab_size", "norm_eps", "rope_theta", "head_dim")
              and "bias" not in field}
    values |= dict(vocab_size=len(tokens), tie_embeddings="output.weight" not in g.tensors,
                   norm_eps=_short_float(_require(g, keys["norm_eps"], FLOAT32)),
                   rope_theta=_short_float(_require(g, keys["rope_theta"], FLOAT32)),
                   attention_bias="blk.0.attn_q.bias" in g.tensors,
                   attention_out_bias="blk.0.attn_output.bias" in g.tensors)
    if keys["head_dim"] in g.metadata:  # an explicit head width: k and v must agree
        values["head_dim"] = int(_require(g, keys["head_dim"], UINT32))
        value_dim = g.metadata.get(f"{arch}.attention.value_length", values["head_dim"])
        if value_dim != values["head_dim"]:
            raise ValueError(f"{g.path}: llama.attention.key_length = {values['head_dim']} and "
                             f"value_length = {value_dim} differ (minillm's k and v heads match)")
    config = ModelConfig.from_metadata(values, keys, str(g.path))
    # llama.cpp's other RoPE scaling keys (linear, YaRN) are refused, as config.json's are, rather
    # than loaded into a model that computes something else; Llama 3's is the rope_freqs tensor
    scaling = g.metadata.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        raise ValueError(f"{g.path}: llama.rope.scaling.type = {scaling!r}: "
                         f"RoPE scaling is not supported (minillm implements plain RoPE and "
                         f"Llama 3's rope_freqs)")
    for key in (f"{arch}.rope.scaling.factor", f"{arch}.rope.scale_linear"):
        if g.metadata.get(key, 1.0) not in (0.0, 1.0):  # llama.cpp reads 0 as "not set"
            raise ValueError(f"{g.path}: {key} = {g.metadata[key]!r}: "
                             f"RoPE scaling is not supported")
    rope_dims = _require(g, f"{arch}.rope.dimension_count", UINT32)
    if rope_dims != config.head_dim:
        raise ValueError(f"{g.path}: llama.rope.dimension_count is {rope_dims}, "
                         f"but minillm rotates the whole head ({config.head_dim} dims)")
    if ROPE_FREQS in g.tensors:
        scaling = llama3_scaling_from_divisors(g.tensor(ROPE_FREQS), config, str(g.path))
        if scaling is not None:
            config = dataclasses.replace(config, rope_scaling=scaling)
    return config


def load_gguf_weights(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, float32 state dict with our keys and HF-layout q/k): the model alone, whatever
    the tokenizer in the file."""
    g = read_gguf(path)
    config, arch = _gguf_config(g), g.metadata["general.architecture"]
    # 9 tensors per block; also guards a corrupt huge count
    if 9 * config.n_layers > len(g.tensors):
        raise ValueError(f"{g.path}: llama.block_count = {config.n_layers} but the file holds only "
                         f"{len(g.tensors)} tensors")
    shapes = expected_shapes(config)
    state: dict[str, torch.Tensor] = {}
    for name, info in g.tensors.items():
        if name == ROPE_FREQS:
            continue  # read into the config above
        try:
            key = gguf_to_ours(name)
        except KeyError:
            raise ValueError(f"{g.path}: tensor {name!r} is not part of a minillm Llama") from None
        if key not in shapes or info.shape != shapes[key]:
            raise ValueError(f"{g.path}: tensor {name!r} has shape {info.shape}, expected "
                             f"{shapes.get(key)} for the config in the metadata")
        w = g.tensor(name)
        if is_rope_rotated(key) and arch == "llama":  # qwen2 rotates halves, as HF: unpermuted
            w = interleaved_to_hf(w, config.n_heads if ".q_proj." in key else config.n_kv_heads)
        state[key] = w
    missing = [ours_to_gguf(k) for k in shapes if k not in state]
    if missing:
        raise ValueError(f"{g.path}: missing tensors "
                         f"{missing[:3]}{' ...' if len(missing) > 3 else ''}")
    return config, state


def llama3_scaling_from_divisors(divisors: torch.Tensor, config: ModelConfig,
                                 source: str) -> dict[str, float] | None:
    """Llama 3's four scaling numbers back from llama.cpp's rope_freqs divisors (D/2,); None when
    every divisor is 1 (plain RoPE).

    The divisors depend only on two wavelength thresholds, L/low (longer: divided by factor) and
    L/high (shorter: kept), so the numbers are recovered with low_freq_factor = 1 and L the long
    threshold, a whole number when one fits: for Llama 3.1's values (L 8192, low 1) that is exact.
    In the blend, s = (1/d − 1/factor) / (1 − 1/factor) is linear in 1/λ, s = A/λ + B, so two
    blended frequencies give both thresholds; with fewer, any threshold in the gap they leave gives
    the same divisors. Divisors that no Llama 3 scaling produces are refused.
    """
    half = config.head_dim // 2
    if tuple(divisors.shape) != (half,):
        raise ValueError(f"{source}: {ROPE_FREQS} has shape {tuple(divisors.shape)}, expected "
                         f"({half},) for head_dim {config.head_dim}")
    inv_freq = rope_inv_freq(config.head_dim, config.rope_theta)
    d, wavelen = divisors.double(), 2 * math.pi / inv_freq.double()  # (D/2,) each
    factor = float(f"{float(d.max()):.6g}")
    if factor <= 1 + 1e-6:
        return None
    kept, scaled = d <= 1 + 1e-6, d >= factor * (1 - 1e-6)
    mid = ~kept & ~scaled
    s = (1 / d - 1 / factor) / (1 - 1 / factor)  # the blend, where it applies
    long_wl = float(wavelen[scaled].min()) if bool(scaled.any()) else 0.0
    if int(mid.sum()) >= 2:
        A, B = np.polyfit((1 / wavelen[mid]).numpy(), s[mid].numpy(), 1)
        long_wl, short_wl = -A / B, A / (1 - B)
    elif int(mid.sum()) == 1:
        wl0, s0 = float(wavelen[mid][0]), float(s[mid][0])
        long_wl = long_wl or 2 * wl0
        long_wl = float(math.floor(long_wl)) if math.floor(long_wl) > wl0 else long_wl
        short_wl = long_wl / (1 + (long_wl / wl0 - 1) / s0)
    else:
        short_wl = float(wavelen[kept].max()) if bool(kept.any()) else long_wl / 2
    for old_len in (float(max(1, round(long_wl))), long_wl):
        high = float(f"{old_len / short_wl:.6g}") if old_len != long_wl else long_wl / short_wl
        scaling = {"factor": factor, "low_freq_factor": 1.0, "high_freq_factor": high,
                   "original_max_position_embeddings": old_len}
        try:
            check_llama3_scaling(scaling, ROPE_FREQS)
        except ValueError:
            continue
        if torch.allclose(llama3_rope_divisors(inv_freq, scaling), divisors.float(), rtol=1e-5):
            return scaling
    raise ValueError(f"{source}: {ROPE_FREQS} holds divisors {divisors[:4].tolist()}… that "
                     f"are not Llama 3's RoPE scaling (the only kind minillm implements)")


def sentencepiece_model_from_gguf(g: GGUFFile) -> bytes:
    """A SentencePiece BPE ModelProto rebuilt from the tokenizer.ggml.* metadata.

    Normalization is identity with whitespace escaped to "▁", no extra-whitespace removal and a
    dummy prefix per tokenizer.ggml.add_space_prefix: exactly what llama.cpp applies to this
    vocabulary.
    """
    model = _require(g, "tokenizer.ggml.model", STRING)
    if model != "llama":
        raise ValueError(f"{g.path}: tokenizer.ggml.model is {model!r}, minillm reads "
                         f"SentencePiece 'llama' and byte-level BPE 'gpt2'")
    tokens = _require(g, "tokenizer.ggml.tokens", ARRAY, STRING)
    first: dict[str, int] = {}
    for i, piece in enumerate(tokens):
        if first.setdefault(piece, i) != i:
            raise ValueError(f"{g.path}: tokenizer.ggml.tokens holds the piece {piece!r} twice "
                             f"(ids {first[piece]} and {i}); a SentencePiece vocabulary names "
                             f"each piece once")
    scores = _require(g, "tokenizer.ggml.scores", ARRAY, FLOAT32)
    types = _require(g, "tokenizer.ggml.token_type", ARRAY, INT32)
    if not len(tokens) == len(scores) == len(types):
        raise ValueError(f"{g.path}: {len(tokens)} tokens, {len(scores)} scores and "
                         f"{len(types)} token types")
    ids = {}
    for name in ("bos", "eos", "unknown", "padding"):
        key = f"tokenizer.ggml.{name}_token_id"
        tid = int(_require(g, key, UINT32)) if name != "padding" or key in g.metadata else -1
        if tid >= len(tokens):
            raise ValueError(f"{g.path}: {key} = {tid} is outside the "
                             f"{len(tokens)}-token vocabulary")
        ids[name] = tid
    add_prefix = (_require(g, "tokenizer.ggml.add_space_prefix", BOOL)
                  if "tokenizer.ggml.add_space_prefix" in g.metadata else True)
    return bpe_model_proto(tokens, scores, types, ids, add_prefix)
