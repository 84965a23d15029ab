"""GGUF v3: write a minillm Llama (weights + SentencePiece tokenizer) for llama.cpp, and read it back.

Spec: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md (little-endian throughout):

    magic "GGUF" | uint32 version = 3 | uint64 n_tensors | uint64 n_kv
    n_kv x  (string key, uint32 value type, value)         strings are uint64 length + UTF-8, no NUL
    n_tensors x  (string name, uint32 n_dims, uint64 dims[n_dims] innermost first,
                  uint32 ggml type, uint64 offset relative to the data start)
    zero padding to `general.alignment` (32)
    tensor data, in info order, each tensor zero-padded to the alignment

Writer design (streaming, one pass): every tensor's name, shape and ggml type follow from the
`ModelConfig` and the outtype, so the header (with all offsets) is written first; then the weights are
consumed one at a time from the caller's iterator, each seeked to its precomputed offset, converted in
row chunks and written. A 7B export never holds more than one source tensor plus one chunk, and the
iterator may yield tensors in any order. The file is written under a temporary name and renamed at the
end; on any error the temporary file is removed.

Choices that follow llama.cpp's `convert_hf_to_gguf.py` (and `llama-quantize` for q4_0):
- 1-D tensors (norms) stay F32; a 2-D tensor whose rows are not a multiple of the block size falls back
  to F16 with a printed notice.
- q/k rows are permuted from HF's rotate-half layout to llama.cpp's interleaved RoPE pairs (k with the
  number of KV heads), and permuted back on load.
- q4_0: `llama-quantize` gives the output matrix (or the tied embedding) Q6_K, which minillm does not
  implement; we write it as Q8_0, the closer in quality of the two types we have. Everything else 2-D
  is Q4_0; general.file_type is MOSTLY_Q4_0 as in llama.cpp's own mixed files.
- Tokenizer piece types come from the SentencePiece API as the converter does: UNKNOWN, CONTROL, UNUSED,
  BYTE, else NORMAL. User-defined pieces (our "\\n", "\\t") are written NORMAL, like the converter:
  llama.cpp splits USER_DEFINED tokens out of the text first and then re-adds a "▁" prefix after each
  of them, which SentencePiece does not, so USER_DEFINED would change the ids of text like "a\\nb".

The reader validates every count, length, type id and offset against the file size before using it, so
a truncated or corrupt file gives a ValueError naming the file and offset instead of a crash, a hang
or a huge allocation. Tensor data is memory-mapped.
"""

from __future__ import annotations

import mmap
import os
import struct
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from minillm.config import ModelConfig
from minillm.ggml_quants import (
    GGML_BF16,
    GGML_F16,
    GGML_F32,
    GGML_Q4_0,
    GGML_Q8_0,
    GGML_TYPES,
    dequantize,
    quantize,
    row_bytes,
    type_name,
)
from minillm.names import gguf_to_ours, hf_to_interleaved, interleaved_to_hf, is_rope_rotated, ours_to_gguf
from minillm.tokenizer import Tokenizer

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
GGUF_DEFAULT_ALIGNMENT = 32
GGML_QUANT_VERSION = 2  # general.quantization_version written by current llama.cpp

# metadata value types (gguf.h `enum gguf_type`)
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
_VALUE_TYPE_NAMES = ["UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "FLOAT32", "BOOL", "STRING",
                     "ARRAY", "UINT64", "INT64", "FLOAT64"]
_STRUCT = {UINT8: "<B", INT8: "<b", UINT16: "<H", INT16: "<h", UINT32: "<I", INT32: "<i", FLOAT32: "<f",
           BOOL: "<B", UINT64: "<Q", INT64: "<q", FLOAT64: "<d"}
_NUMPY = {UINT8: "<u1", INT8: "<i1", UINT16: "<u2", INT16: "<i2", UINT32: "<u4", INT32: "<i4", FLOAT32: "<f4",
          BOOL: "<u1", UINT64: "<u8", INT64: "<i8", FLOAT64: "<f8"}

# outtype -> (ggml type of the 2-D weights, general.file_type: ALL_F32 0, MOSTLY_F16 1, MOSTLY_Q4_0 2,
# MOSTLY_Q8_0 7, MOSTLY_BF16 32)
OUTTYPES = {
    "f32": (GGML_F32, 0),
    "f16": (GGML_F16, 1),
    "bf16": (GGML_BF16, 32),
    "q8_0": (GGML_Q8_0, 7),
    "q4_0": (GGML_Q4_0, 2),
}

# tokenizer.ggml.token_type values (= SentencePiece's ModelProto.SentencePiece.Type)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

_CHUNK_VALUES = 1 << 22  # values converted at once while streaming (bounds the quantizers' temporaries)


def _align(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


# ---------------------------------------------------------------------------------------------------
# Tensor plan: names, shapes and types, all known from the config before any weight is seen


@dataclass(frozen=True)
class TensorPlan:
    key: str  # minillm state-dict key
    name: str  # GGUF tensor name
    shape: tuple[int, ...]  # PyTorch order (outermost first); the file stores it reversed
    ggml_type: int
    offset: int  # relative to the start of the data section, a multiple of the alignment
    nbytes: int  # unpadded


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our state-dict keys and shapes, in the order the GGUF stores them."""
    D, F, V, Hd = config.dim, config.hidden_dim, config.vocab_size, config.head_dim
    q_rows, kv_rows = config.n_heads * Hd, config.n_kv_heads * Hd
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (V, D)}
    for i in range(config.n_layers):
        p = f"layers.{i}."
        shapes[p + "input_layernorm.weight"] = (D,)
        shapes[p + "self_attn.q_proj.weight"] = (q_rows, D)
        shapes[p + "self_attn.k_proj.weight"] = (kv_rows, D)
        shapes[p + "self_attn.v_proj.weight"] = (kv_rows, D)
        shapes[p + "self_attn.o_proj.weight"] = (D, q_rows)
        shapes[p + "post_attention_layernorm.weight"] = (D,)
        shapes[p + "mlp.gate_proj.weight"] = (F, D)
        shapes[p + "mlp.up_proj.weight"] = (F, D)
        shapes[p + "mlp.down_proj.weight"] = (D, F)
    shapes["norm.weight"] = (D,)
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (V, D)
    return shapes


def plan_tensors(config: ModelConfig, outtype: str, alignment: int = GGUF_DEFAULT_ALIGNMENT) -> list[TensorPlan]:
    """The tensor infos of the file `write_gguf` produces; prints a notice for each F16 fallback."""
    if outtype not in OUTTYPES:
        raise ValueError(f"unknown GGUF outtype {outtype!r}; expected one of {sorted(OUTTYPES)}")
    target = OUTTYPES[outtype][0]
    plans, offset = [], 0
    for key, shape in expected_shapes(config).items():
        if len(shape) == 1:
            ggml_type = GGML_F32  # norms stay F32 in every llama.cpp file type
        else:
            ggml_type = target
            # the matrix that produces the logits: llama-quantize uses Q6_K there; we use Q8_0 (see top)
            is_output = key == "lm_head.weight" or (config.tie_embeddings and key == "embed_tokens.weight")
            if outtype == "q4_0" and is_output:
                ggml_type = GGML_Q8_0
            block = GGML_TYPES[ggml_type][1]
            if shape[-1] % block != 0:
                print(f"gguf: {ours_to_gguf(key)} rows have {shape[-1]} values, not a multiple of "
                      f"{type_name(ggml_type)}'s block of {block}; writing it as F16")
                ggml_type = GGML_F16
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        nbytes = rows * row_bytes(ggml_type, shape[-1])
        plans.append(TensorPlan(key, ours_to_gguf(key), shape, ggml_type, offset, nbytes))
        offset = _align(offset + nbytes, alignment)
    return plans


# ---------------------------------------------------------------------------------------------------
# Metadata encoding


def _pack_string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw  # uint64 byte length, then UTF-8 bytes, no terminator


def _pack_kv(key: str, vtype: int, value: Any, elem_type: int | None = None) -> bytes:
    out = _pack_string(key)
    out += struct.pack("<I", vtype)  # value type
    if vtype == ARRAY:
        out += struct.pack("<I", elem_type)  # element type
        out += struct.pack("<Q", len(value))  # element count
        if elem_type == STRING:
            out += b"".join(_pack_string(v) for v in value)
        else:
            out += np.asarray(value).astype(_NUMPY[elem_type]).tobytes()
    elif vtype == STRING:
        out += _pack_string(value)
    else:
        out += struct.pack(_STRUCT[vtype], value)
    return out


def _as_tokenizer(tokenizer: Tokenizer | str | os.PathLike) -> Tokenizer:
    return tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)


def tokenizer_metadata(tokenizer: Tokenizer) -> list[tuple]:
    """(key, value type, value[, element type]) for llama.cpp's SentencePiece ("llama") tokenizer."""
    sp = tokenizer.sp
    n = sp.GetPieceSize()
    tokens, scores, types = [], [], []
    for i in range(n):
        tokens.append(sp.IdToPiece(i))  # keeps "▁" and the "<0x0A>" byte spellings as they are
        scores.append(sp.GetScore(i))
        if sp.IsUnknown(i):
            types.append(TOKEN_UNKNOWN)
        elif sp.IsControl(i):
            types.append(TOKEN_CONTROL)
        elif sp.IsUnused(i):
            types.append(TOKEN_UNUSED)
        elif sp.IsByte(i):
            types.append(TOKEN_BYTE)
        else:
            types.append(TOKEN_NORMAL)  # also user-defined pieces, see the module docstring
    proto = _proto_fields(tokenizer.model_bytes(), str(tokenizer.path))
    normalizer = _proto_message(proto, 3, f"{tokenizer.path} normalizer_spec")
    add_space_prefix = bool(normalizer.get(3, [1])[-1])  # NormalizerSpec.add_dummy_prefix, default true
    kvs = [
        ("tokenizer.ggml.model", STRING, "llama"),
        ("tokenizer.ggml.pre", STRING, "default"),
        ("tokenizer.ggml.tokens", ARRAY, tokens, STRING),
        ("tokenizer.ggml.scores", ARRAY, np.asarray(scores, dtype=np.float32), FLOAT32),
        ("tokenizer.ggml.token_type", ARRAY, np.asarray(types, dtype=np.int32), INT32),
    ]
    for name, tid in (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("unknown", sp.unk_id()),
                      ("padding", sp.pad_id())):
        if tid >= 0:
            kvs.append((f"tokenizer.ggml.{name}_token_id", UINT32, tid))
    kvs += [
        ("tokenizer.ggml.add_bos_token", BOOL, True),
        ("tokenizer.ggml.add_eos_token", BOOL, False),
        ("tokenizer.ggml.add_space_prefix", BOOL, add_space_prefix),
    ]
    return kvs


def llama_metadata(config: ModelConfig, outtype: str, name: str) -> list[tuple]:
    return [
        ("general.architecture", STRING, "llama"),
        ("general.name", STRING, name),
        ("general.file_type", UINT32, OUTTYPES[outtype][1]),
        ("general.quantization_version", UINT32, GGML_QUANT_VERSION),
        ("llama.vocab_size", UINT32, config.vocab_size),
        ("llama.context_length", UINT32, config.max_seq_len),
        ("llama.embedding_length", UINT32, config.dim),
        ("llama.block_count", UINT32, config.n_layers),
        ("llama.feed_forward_length", UINT32, config.hidden_dim),
        ("llama.rope.dimension_count", UINT32, config.head_dim),
        ("llama.attention.head_count", UINT32, config.n_heads),
        ("llama.attention.head_count_kv", UINT32, config.n_kv_heads),
        ("llama.attention.layer_norm_rms_epsilon", FLOAT32, config.norm_eps),
        ("llama.rope.freq_base", FLOAT32, config.rope_theta),
    ]


def _header(kvs: list[tuple], plans: list[TensorPlan], alignment: int) -> bytes:
    out = GGUF_MAGIC  # magic
    out += struct.pack("<I", GGUF_VERSION)  # version
    out += struct.pack("<Q", len(plans))  # tensor count
    out += struct.pack("<Q", len(kvs))  # metadata key/value count
    out += b"".join(_pack_kv(*kv) for kv in kvs)
    for p in plans:
        out += _pack_string(p.name)  # tensor name
        out += struct.pack("<I", len(p.shape))  # n_dims
        out += struct.pack(f"<{len(p.shape)}Q", *reversed(p.shape))  # dims, innermost first
        out += struct.pack("<I", p.ggml_type)  # ggml type
        out += struct.pack("<Q", p.offset)  # offset from the data start
    return out + b"\0" * (_align(len(out), alignment) - len(out))  # the data section starts aligned


# ---------------------------------------------------------------------------------------------------
# Writer


def write_gguf(
    path: str | os.PathLike,
    config: ModelConfig,
    tensors: Iterable[tuple[str, torch.Tensor]] | Callable[[], Iterable[tuple[str, torch.Tensor]]],
    tokenizer: Tokenizer | str | os.PathLike,
    outtype: str,
    name: str = "minillm",
    progress: bool = True,
) -> list[TensorPlan]:
    """Write a llama.cpp-loadable GGUF; returns the tensor plan that was written.

    `tensors` yields (minillm key, tensor) pairs, one at a time, in any order; q/k in HF rotate-half
    layout, any float dtype, any device. With tied embeddings a `lm_head.weight` is skipped. Errors (all
    before the output exists): unknown outtype, vocab of tokenizer != config.vocab_size, an unknown,
    duplicate, missing or mis-shaped tensor.
    """
    path = Path(path)
    plans = plan_tensors(config, outtype)
    tok = _as_tokenizer(tokenizer)
    if tok.vocab_size != config.vocab_size:
        raise ValueError(f"{tok.path}: tokenizer has {tok.vocab_size} pieces but the model's embedding has "
                         f"{config.vocab_size} rows; llama.cpp requires them equal")
    header = _header(llama_metadata(config, outtype, name) + tokenizer_metadata(tok), plans,
                     GGUF_DEFAULT_ALIGNMENT)
    by_key = {p.key: p for p in plans}
    total = _align(plans[-1].offset + plans[-1].nbytes, GGUF_DEFAULT_ALIGNMENT)
    stream = tensors() if callable(tensors) else tensors

    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(header)
            seen: set[str] = set()
            for key, tensor in tqdm(stream, total=len(plans), desc=f"gguf {outtype}", unit="tensor",
                                    disable=not progress):
                if key == "lm_head.weight" and config.tie_embeddings:
                    continue  # tied: llama.cpp reuses token_embd.weight for the logits
                if key not in by_key:
                    raise ValueError(f"{path}: tensor {key!r} is not a weight of this Llama config")
                if key in seen:
                    raise ValueError(f"{path}: tensor {key!r} was yielded twice")
                p = by_key[key]
                if tuple(tensor.shape) != p.shape:
                    raise ValueError(f"{path}: tensor {key!r} has shape {tuple(tensor.shape)}, expected "
                                     f"{p.shape} for this config")
                seen.add(key)
                f.seek(len(header) + p.offset)
                _write_tensor(f, key, tensor, p, config)
            missing = [p.key for p in plans if p.key not in seen]
            if missing:
                raise ValueError(f"{path}: {len(missing)} tensors never arrived, e.g. {missing[:3]}")
            f.truncate(len(header) + total)  # zero padding after the last tensor
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return plans


def _write_tensor(f, key: str, tensor: torch.Tensor, p: TensorPlan, config: ModelConfig) -> None:
    w = tensor.detach().cpu()
    if is_rope_rotated(key):
        heads = config.n_heads if key.endswith("q_proj.weight") else config.n_kv_heads
        w = hf_to_interleaved(w, heads)  # rotate-half rows -> interleaved pairs, as llama.cpp's RoPE wants
    w = w.reshape(-1, p.shape[-1])  # (rows, K); 1-D tensors become one row
    step = max(1, _CHUNK_VALUES // p.shape[-1])
    written = 0
    for r in range(0, w.shape[0], step):
        data = quantize(w[r : r + step].float(), p.ggml_type)  # (chunk rows, row bytes) uint8
        f.write(data.numpy().tobytes())
        written += data.numel()
    assert written == p.nbytes, f"{key}: wrote {written} bytes, planned {p.nbytes}"
    f.write(b"\0" * (_align(p.nbytes, GGUF_DEFAULT_ALIGNMENT) - p.nbytes))


# ---------------------------------------------------------------------------------------------------
# Reader


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
    metadata: dict[str, Any]  # scalars as Python values, numeric arrays as numpy, string arrays as lists
    value_types: dict[str, tuple[int, int | None]]  # key -> (value type, element type for arrays)
    tensors: dict[str, GGUFTensorInfo]  # in file order
    _buf: mmap.mmap = field(repr=False)

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 view of the memory-mapped file."""
        t = self.tensors[name]
        return np.frombuffer(self._buf, dtype=np.uint8, count=t.nbytes, offset=self.data_start + t.offset)

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor dequantized to float32, in PyTorch shape (a copy)."""
        t = self.tensors[name]
        data = torch.from_numpy(self.raw(name).copy())
        return dequantize(data, t.ggml_type, t.shape[-1]).reshape(t.shape)


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
        return struct.unpack(_STRUCT[vtype], self.take(struct.calcsize(_STRUCT[vtype]), what))[0]

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
        if vtype in _STRUCT:
            return self.scalar(vtype, f"value of {key!r}"), None
        if vtype != ARRAY:
            raise self.fail(f"key {key!r} at offset {self.pos - 4} has unknown value type {vtype}")
        elem = self.scalar(UINT32, f"element type of {key!r}")
        count = self.scalar(UINT64, f"element count of {key!r}")
        if elem == STRING:
            if count * 8 > self.size - self.pos:  # every string needs at least its 8-byte length
                raise self.fail(f"array {key!r} claims {count} strings at offset {self.pos}, more than the "
                                f"{self.size - self.pos} bytes left can hold")
            return [self.string(f"element {i} of {key!r}") for i in range(count)], elem
        if elem not in _NUMPY:
            raise self.fail(f"array {key!r} at offset {self.pos - 12} has unsupported element type {elem}")
        dtype = np.dtype(_NUMPY[elem])
        arr = np.frombuffer(self.take(count * dtype.itemsize, f"{count} elements of {key!r}"), dtype=dtype)
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
        raise cur.fail(f"GGUF version {version} at offset 4, only version {GGUF_VERSION} is supported")
    n_tensors = cur.scalar(UINT64, "tensor count")
    n_kv = cur.scalar(UINT64, "metadata count")
    # each key/value takes >= 13 bytes (8 key length + 4 type + 1 value); each tensor info >= 32
    if n_kv * 13 + n_tensors * 32 > size - 24:
        raise cur.fail(f"header claims {n_kv} metadata entries and {n_tensors} tensors, impossible in a "
                       f"{size}-byte file")

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
    if "general.alignment" in metadata and (value_types["general.alignment"][0] != UINT32 or alignment == 0
                                            or alignment & (alignment - 1)):
        raise cur.fail(f"general.alignment must be a UINT32 power of two, found {alignment!r}")

    infos = []
    for i in range(n_tensors):
        at = cur.pos
        name = cur.string(f"name of tensor {i}")
        if len(name.encode("utf-8")) >= 64:
            raise cur.fail(f"tensor name {name!r} at offset {at} is {len(name.encode())} bytes, ggml allows 63")
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
            raise cur.fail(f"tensor {name!r} at offset {at} has dims {dims}; the first must be a multiple of "
                           f"{type_name(ggml_type)}'s block size {block}")
        nbytes = int(np.prod(dims, dtype=object)) // block * type_size
        infos.append(GGUFTensorInfo(name, tuple(reversed(dims)), ggml_type, offset, nbytes))

    data_start = _align(cur.pos, alignment)
    tensors: dict[str, GGUFTensorInfo] = {}
    expected = 0  # llama.cpp requires data in info order, each tensor at the previous end, aligned
    for t in infos:
        if t.name in tensors:
            raise cur.fail(f"duplicate tensor name {t.name!r}")
        if t.offset != expected:
            raise cur.fail(f"tensor {t.name!r} has data offset {t.offset}, expected {expected} (the previous "
                           f"tensor's end rounded up to the alignment {alignment})")
        end = data_start + t.offset + t.nbytes
        if end > size:
            raise cur.fail(f"tensor {t.name!r} data [{data_start + t.offset}, {end}) runs past the end of the "
                           f"{size}-byte file")
        tensors[t.name] = t
        expected = _align(t.offset + t.nbytes, alignment)
    return GGUFFile(path, version, alignment, data_start, metadata, value_types, tensors, buf)


# ---------------------------------------------------------------------------------------------------
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
    name = _VALUE_TYPE_NAMES[vtype]  # the reader only admits known value types
    return name if elem is None else f"{name}[{_VALUE_TYPE_NAMES[elem]}]"


def _short_float(x: float) -> float:
    # a FLOAT32 1e-6 reads as 9.99999997e-07; the shortest repr of the float32 gives back 1e-06
    return float(str(np.float32(x)))


def load_gguf_model(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor], bytes]:
    """(config, float32 state dict with our keys and HF-layout q/k, SentencePiece model bytes)."""
    g = read_gguf(path)
    arch = _require(g, "general.architecture", STRING)
    if arch != "llama":
        raise ValueError(f"{g.path}: general.architecture is {arch!r}, minillm loads only 'llama'")
    tokens = _require(g, "tokenizer.ggml.tokens", ARRAY, STRING)
    try:
        config = ModelConfig(
            dim=int(_require(g, "llama.embedding_length", UINT32)),
            n_layers=int(_require(g, "llama.block_count", UINT32)),
            n_heads=int(_require(g, "llama.attention.head_count", UINT32)),
            n_kv_heads=int(_require(g, "llama.attention.head_count_kv", UINT32)),
            hidden_dim=int(_require(g, "llama.feed_forward_length", UINT32)),
            vocab_size=len(tokens),
            max_seq_len=int(_require(g, "llama.context_length", UINT32)),
            norm_eps=_short_float(_require(g, "llama.attention.layer_norm_rms_epsilon", FLOAT32)),
            rope_theta=_short_float(_require(g, "llama.rope.freq_base", FLOAT32)),
            tie_embeddings="output.weight" not in g.tensors,
        )
    except ValueError as e:
        raise ValueError(f"{g.path}: {e}") from None
    rope_dims = _require(g, "llama.rope.dimension_count", UINT32)
    if rope_dims != config.head_dim:
        raise ValueError(f"{g.path}: llama.rope.dimension_count is {rope_dims}, but minillm rotates the whole "
                         f"head ({config.head_dim} dims)")

    if 9 * config.n_layers > len(g.tensors):  # 9 tensors per block; also guards a corrupt huge count
        raise ValueError(f"{g.path}: llama.block_count = {config.n_layers} but the file holds only "
                         f"{len(g.tensors)} tensors")
    shapes = expected_shapes(config)
    state: dict[str, torch.Tensor] = {}
    for name, info in g.tensors.items():
        try:
            key = gguf_to_ours(name)
        except KeyError:
            raise ValueError(f"{g.path}: tensor {name!r} is not part of a minillm Llama") from None
        if key not in shapes or info.shape != shapes[key]:
            raise ValueError(f"{g.path}: tensor {name!r} has shape {info.shape}, expected "
                             f"{shapes.get(key)} for the config in the metadata")
        w = g.tensor(name)
        if is_rope_rotated(key):
            w = interleaved_to_hf(w, config.n_heads if key.endswith("q_proj.weight") else config.n_kv_heads)
        state[key] = w
    missing = [ours_to_gguf(k) for k in shapes if k not in state]
    if missing:
        raise ValueError(f"{g.path}: missing tensors {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    return config, state, sentencepiece_model_from_gguf(g)


# ---------------------------------------------------------------------------------------------------
# SentencePiece ModelProto, by hand (protobuf wire format: https://protobuf.dev/programming-guides/encoding/)
# ModelProto { 1: repeated SentencePiece { 1: piece, 2: score (float), 3: type }, 2: TrainerSpec,
#              3: NormalizerSpec }; field numbers from sentencepiece_model.proto.


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32/int64 are sent as 10-byte two's complement
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _pb_int(num: int, value: int) -> bytes:
    return _varint(num << 3 | 0) + _varint(value)


def _pb_bytes(num: int, value: bytes) -> bytes:
    return _varint(num << 3 | 2) + _varint(len(value)) + value


def _pb_float(num: int, value: float) -> bytes:
    return _varint(num << 3 | 5) + struct.pack("<f", value)


def _proto_fields(buf: bytes, what: str) -> dict[int, list]:
    """Decode one message level: field number -> values (ints, or bytes for length-delimited)."""
    fields: dict[int, list] = {}
    pos = 0

    def varint() -> int:
        nonlocal pos
        n, shift = 0, 0
        while True:
            if pos >= len(buf) or shift > 63:
                raise ValueError(f"{what}: malformed protobuf varint at byte {pos}")
            n |= (buf[pos] & 0x7F) << shift
            pos, shift = pos + 1, shift + 7
            if buf[pos - 1] < 0x80:
                return n

    while pos < len(buf):
        key = varint()
        wire = key & 7
        if wire == 0:
            value = varint()
        elif wire in (1, 5):
            value, pos = buf[pos : pos + (8 if wire == 1 else 4)], pos + (8 if wire == 1 else 4)
        elif wire == 2:
            n = varint()
            value, pos = buf[pos : pos + n], pos + n
        else:
            raise ValueError(f"{what}: unsupported protobuf wire type {wire} at byte {pos}")
        if pos > len(buf):
            raise ValueError(f"{what}: protobuf field {key >> 3} runs past the end")
        fields.setdefault(key >> 3, []).append(value)
    return fields


def _proto_message(fields: dict[int, list], num: int, what: str) -> dict[int, list]:
    return _proto_fields(fields[num][-1], what) if num in fields else {}


def sentencepiece_model_from_gguf(g: GGUFFile) -> bytes:
    """A SentencePiece BPE ModelProto rebuilt from the tokenizer.ggml.* metadata.

    Normalization is identity with whitespace escaped to "▁", no extra-whitespace removal and a dummy
    prefix per tokenizer.ggml.add_space_prefix: exactly what llama.cpp applies to this vocabulary.
    """
    model = _require(g, "tokenizer.ggml.model", STRING)
    if model != "llama":
        raise ValueError(f"{g.path}: tokenizer.ggml.model is {model!r}, only SentencePiece 'llama' is supported")
    tokens = _require(g, "tokenizer.ggml.tokens", ARRAY, STRING)
    scores = _require(g, "tokenizer.ggml.scores", ARRAY, FLOAT32)
    types = _require(g, "tokenizer.ggml.token_type", ARRAY, INT32)
    if not len(tokens) == len(scores) == len(types):
        raise ValueError(f"{g.path}: {len(tokens)} tokens, {len(scores)} scores and {len(types)} token types")
    ids = {}
    for name in ("bos", "eos", "unknown", "padding"):
        key = f"tokenizer.ggml.{name}_token_id"
        tid = int(_require(g, key, UINT32)) if name != "padding" or key in g.metadata else -1
        if tid >= len(tokens):
            raise ValueError(f"{g.path}: {key} = {tid} is outside the {len(tokens)}-token vocabulary")
        ids[name] = tid
    add_prefix = (_require(g, "tokenizer.ggml.add_space_prefix", BOOL)
                  if "tokenizer.ggml.add_space_prefix" in g.metadata else True)

    pieces = b"".join(
        _pb_bytes(1, _pb_bytes(1, t.encode("utf-8")) + _pb_float(2, float(s)) + _pb_int(3, int(ty)))
        for t, s, ty in zip(tokens, scores, types, strict=True)
    )
    trainer = _pb_int(3, 2)  # model_type = BPE
    trainer += _pb_int(4, len(tokens))  # vocab_size
    trainer += _pb_int(35, int(TOKEN_BYTE in set(types.tolist())))  # byte_fallback
    for num, name in ((40, "unknown"), (41, "bos"), (42, "eos"), (43, "padding")):  # unk/bos/eos/pad_id
        trainer += _pb_int(num, ids[name])
    for num, name in ((45, "unknown"), (46, "bos"), (47, "eos"), (48, "padding")):  # unk/bos/eos/pad_piece
        if ids[name] >= 0:
            trainer += _pb_bytes(num, tokens[ids[name]].encode("utf-8"))
    normalizer = _pb_bytes(1, b"identity")  # name
    normalizer += _pb_int(3, int(bool(add_prefix)))  # add_dummy_prefix
    normalizer += _pb_int(4, 0)  # remove_extra_whitespaces
    normalizer += _pb_int(5, 1)  # escape_whitespaces
    return pieces + _pb_bytes(2, trainer) + _pb_bytes(3, normalizer)
