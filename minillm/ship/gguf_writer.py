"""GGUF writer: a minillm Llama (weights + SentencePiece or byte-level BPE tokenizer, the latter's
keys in gguf_bpe.py) as a GGUF v3 file llama.cpp loads.

The byte layout is in formats/gguf_layout.py. Design (streaming, one pass): every tensor's name,
shape and ggml type follow from the `ModelConfig` and the outtype, so the header (with all offsets)
is written first; then the weights are consumed one at a time from the caller's iterator, each
seeked to its precomputed offset, converted in row chunks and written. A 7B export never holds more
than one source tensor plus one chunk, and the iterator may yield tensors in any order.

Choices that follow llama.cpp's `convert_hf_to_gguf.py` (and `llama-quantize` for q4_0):
- 1-D tensors (norms) stay F32; a 2-D tensor whose rows are not a multiple of the block size falls
  back to F16 with a printed notice.
- q/k rows are permuted from HF's rotate-half layout to llama.cpp's interleaved RoPE pairs (k with
  the number of KV heads); the reader permutes them back.
- q4_0: `llama-quantize` gives the output matrix (or the tied embedding) Q6_K; minillm's q4_0
  predates its Q6_K and writes Q8_0 there. Everything else 2-D is Q4_0; general.file_type is
  MOSTLY_Q4_0.
- llama-quantize's file types (q4_k_m, q5_k_m, q6_k, q4_k_s, q5_k_s, q4_1, q5_0, q5_1; quant_mix.py)
  give each tensor the type llama-quantize gives it, fallbacks included, and record its file type.
  Every quantized export prints a per-tensor table to stderr: type, bits per weight, RMS error
  against the f32 weights.
- Tokenizer piece types come from the SentencePiece API as the converter does: UNKNOWN, CONTROL,
  UNUSED, BYTE, else NORMAL. Whitespace user-defined pieces (our "\\n", "\\t") are written NORMAL,
  like the converter: llama.cpp splits USER_DEFINED tokens out of the text first and then re-adds a
  "▁" prefix after each of them, which SentencePiece does not, so USER_DEFINED would change the ids
  of "a\\nb". Other user-defined pieces (added tokens such as "<|im_start|>", new_tokens.py) are
  written USER_DEFINED, as the converter writes added tokens: llama.cpp can only produce them by
  matching them whole, since its SentencePiece merges never build a piece like "<|im_start|>" from
  characters.
- `chat_template` (Jinja, templates.py) becomes `tokenizer.chat_template`; without one, the
  tokenizer's own (a GGUF's or tokenizer_config.json's) passes through.
- The file is written with fileio.atomic_write:
  on any error the old file stays and no temp file is left.
"""

from __future__ import annotations

import itertools
import os
import struct
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from minillm.config import ModelConfig
from minillm.formats.ggml_quants import (
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
from minillm.formats.gguf_layout import (
    ARRAY,
    BOOL,
    FLOAT32,
    GGML_QUANT_VERSION,
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    GGUF_VERSION,
    INT32,
    NUMPY,
    ROPE_FREQS,
    STRING,
    STRUCT,
    TOKEN_BYTE,
    TOKEN_CONTROL,
    TOKEN_NORMAL,
    TOKEN_UNKNOWN,
    TOKEN_UNUSED,
    TOKEN_USER_DEFINED,
    UINT32,
    align,
    expected_shapes,
)
from minillm.formats.gguf_reader import read_gguf
from minillm.formats.weights import check_finite
from minillm.model import llama3_rope_divisors, rope_inv_freq
from minillm.names import hf_to_interleaved, is_rope_rotated, ours_to_gguf
from minillm.ship import quant_mix
from minillm.ship.gguf_bpe import bpe_tokenizer_metadata
from minillm.tokenizer.bpe import BPETokenizer
from minillm.tokenizer.sentencepiece import Tokenizer
from minillm.tokenizer.spm_proto import add_dummy_prefix, piece_types
from minillm.util.fileio import atomic_write, check_replaceable_file

# outtype -> (ggml type of the 2-D weights, general.file_type: ALL_F32 0, MOSTLY_F16 1,
# MOSTLY_Q4_0 2, MOSTLY_Q8_0 7, MOSTLY_BF16 32)
OUTTYPES = {
    "f32": (GGML_F32, 0),
    "f16": (GGML_F16, 1),
    "bf16": (GGML_BF16, 32),
    "q8_0": (GGML_Q8_0, 7),
    "q4_0": (GGML_Q4_0, 2),
}
MIXES = (*quant_mix.FILE_TYPES, *quant_mix.ALIASES)  # llama-quantize's file types: per-tensor types
OUTTYPES.update({m: (quant_mix.file_type(m).default, quant_mix.file_type(m).ftype) for m in MIXES})

# values converted at once while streaming (bounds the quantizers' temporaries)
_CHUNK_VALUES = 1 << 22


# --------------------------------------------------------------------------------------------------
# Tensor plan: names, shapes and types, all known from the config before any weight is seen


@dataclass(frozen=True)
class TensorPlan:
    key: str  # minillm state-dict key
    name: str  # GGUF tensor name
    shape: tuple[int, ...]  # PyTorch order (outermost first); the file stores it reversed
    ggml_type: int
    offset: int  # relative to the start of the data section, a multiple of the alignment
    nbytes: int  # unpadded


def plan_tensors(config: ModelConfig, outtype: str,
                 alignment: int = GGUF_DEFAULT_ALIGNMENT) -> list[TensorPlan]:
    """The tensor infos of the file `write_gguf` produces; prints a notice for each F16 fallback."""
    if outtype not in OUTTYPES:
        raise ValueError(f"unknown GGUF outtype {outtype!r}; expected one of {sorted(OUTTYPES)}")
    target = OUTTYPES[outtype][0]
    plans, offset = [], 0
    shapes = expected_shapes(config)
    if config.rope_scaling is not None:  # first, where llama.cpp's converter puts it
        shapes = {ROPE_FREQS: (config.head_dim // 2,)} | shapes
    for key, shape in shapes.items():
        name = ROPE_FREQS if key == ROPE_FREQS else ours_to_gguf(key)
        if len(shape) == 1:
            ggml_type = GGML_F32  # norms stay F32 in every llama.cpp file type
        elif outtype in MIXES:
            ggml_type = quant_mix.tensor_type(ours_to_gguf(key), shape, outtype, config.n_layers,
                                              config.n_heads, config.n_kv_heads,
                                              tied=config.tie_embeddings)
        else:
            ggml_type = target
            # the matrix that produces the logits:
            # llama-quantize uses Q6_K there; we use Q8_0 (see top)
            is_output = (key == "lm_head.weight"
                         or (config.tie_embeddings and key == "embed_tokens.weight"))
            if outtype == "q4_0" and is_output:
                ggml_type = GGML_Q8_0
            block = GGML_TYPES[ggml_type][1]
            if shape[-1] % block != 0:
                print(f"gguf: {ours_to_gguf(key)} rows have {shape[-1]} values, not a multiple of "
                      f"{type_name(ggml_type)}'s block of {block}; writing it as F16",
                      file=sys.stderr)
                ggml_type = GGML_F16
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        nbytes = rows * row_bytes(ggml_type, shape[-1])
        plans.append(TensorPlan(key, name, shape, ggml_type, offset, nbytes))
        offset = align(offset + nbytes, alignment)
    return plans


# --------------------------------------------------------------------------------------------------
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
            out += np.asarray(value).astype(NUMPY[elem_type]).tobytes()
    elif vtype == STRING:
        out += _pack_string(value)
    else:
        out += struct.pack(STRUCT[vtype], value)
    return out


def _as_tokenizer(tokenizer: Tokenizer | BPETokenizer | str | os.PathLike):
    if isinstance(tokenizer, Tokenizer | BPETokenizer):
        return tokenizer
    from minillm.formats.load import open_tokenizer  # (load.py imports the model side)
    return open_tokenizer(tokenizer)


def tokenizer_metadata(tokenizer: Tokenizer) -> list[tuple]:
    """(key, value type, value[, element type]) for
    llama.cpp's SentencePiece ("llama") tokenizer."""
    sp = tokenizer.sp
    n = sp.GetPieceSize()
    tokens, scores, types = [], [], []
    # for USER_DEFINED, see the top
    proto_types = piece_types(tokenizer.model_bytes(), str(tokenizer.path))
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
        elif proto_types[i] == TOKEN_USER_DEFINED and sp.IdToPiece(i).strip():
            # an added token; whitespace ones stay NORMAL (see the top)
            types.append(TOKEN_USER_DEFINED)
        else:
            types.append(TOKEN_NORMAL)
    add_space_prefix = add_dummy_prefix(tokenizer.model_bytes(), str(tokenizer.path))
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
    ] + ([] if config.head_dim == config.dim // config.n_heads else [
        # an explicit head width (llama.cpp otherwise takes embedding_length / head_count)
        ("llama.attention.key_length", UINT32, config.head_dim),
        ("llama.attention.value_length", UINT32, config.head_dim),
    ])


# Every GGUF minillm writes names it as the writer, so a later export may replace it, and only it
# (util/fileio.py's ownership rule); llama.cpp ignores keys it does not know.
WRITER_KEY, WRITER = "minillm.writer", "minillm"


def written_by_minillm(path: Path) -> bool:
    """Whether `path` is a GGUF minillm wrote (a readable GGUF carrying WRITER_KEY)."""
    try:
        return WRITER_KEY in read_gguf(path).metadata
    except (OSError, ValueError):
        return False


def check_gguf_output(path: Path):
    """A GGUF output path: it ends in .gguf, and holds nothing, or a GGUF minillm wrote."""
    if path.suffix != ".gguf":
        raise ValueError(f"{path}: a GGUF output file must end in .gguf")
    check_replaceable_file(path, written_by_minillm, "GGUF file")


def _header(kvs: list[tuple], plans: list[TensorPlan], alignment: int) -> bytes:
    kvs = [*kvs, (WRITER_KEY, STRING, WRITER)]
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
    return out + b"\0" * (align(len(out), alignment) - len(out))  # the data section starts aligned


# --------------------------------------------------------------------------------------------------
# Writer


def write_gguf(
    path: str | os.PathLike,
    config: ModelConfig,
    tensors: Iterable[tuple[str, torch.Tensor]] | Callable[[], Iterable[tuple[str, torch.Tensor]]],
    tokenizer: Tokenizer | str | os.PathLike,
    outtype: str,
    name: str = "minillm",
    progress: bool = True,
    chat_template: str | None = None,
) -> list[TensorPlan]:
    """Write a llama.cpp-loadable GGUF; returns the tensor plan that was written.

    `tensors` yields (minillm key, tensor) pairs, one at a time, in any order; q/k in HF rotate-half
    layout, any float dtype, any device. With tied embeddings a `lm_head.weight` is skipped. Errors
    (all before the output exists): unknown outtype, vocab of tokenizer != config.vocab_size, an
    unknown, duplicate, missing or mis-shaped tensor.
    """
    path = Path(path)
    check_gguf_output(path)
    plans = plan_tensors(config, outtype)
    tok = _as_tokenizer(tokenizer)
    if tok.vocab_size != config.vocab_size:
        raise ValueError(f"{tok.path}: tokenizer has {tok.vocab_size} pieces but the model's "
                         f"embedding has {config.vocab_size} rows; llama.cpp requires them equal")
    vocab = tokenizer_metadata(tok) if isinstance(tok, Tokenizer) else bpe_tokenizer_metadata(tok)
    kvs = llama_metadata(config, outtype, name) + vocab
    # Jinja, as HF's tokenizer_config.json "chat_template" (templates.py); else the source's own
    chat_template = chat_template if chat_template is not None else tok.chat_template
    if chat_template is not None:
        kvs.append(("tokenizer.chat_template", STRING, chat_template))
    header = _header(kvs, plans, GGUF_DEFAULT_ALIGNMENT)
    by_key = {p.key: p for p in plans}
    total = align(plans[-1].offset + plans[-1].nbytes, GGUF_DEFAULT_ALIGNMENT)
    stream = tensors() if callable(tensors) else tensors
    # tied: llama.cpp reuses token_embd.weight for the logits (no output.weight)
    if config.tie_embeddings:
        stream = ((key, tensor) for key, tensor in stream if key != "lm_head.weight")
    if config.rope_scaling is not None:
        divisors = llama3_rope_divisors(rope_inv_freq(config.head_dim, config.rope_theta),
                                        config.rope_scaling)
        stream = itertools.chain([(ROPE_FREQS, divisors)], stream)

    with atomic_write(path) as f:  # on any error below, the old file stays and no temp file is left
        f.write(header)
        seen: set[str] = set()
        errors = {}  # GGUF name -> RMS error of the written tensor against the f32 weights
        for key, tensor in tqdm(stream, total=len(plans), desc=f"gguf {outtype}", unit="tensor",
                                disable=not progress):
            if key not in by_key:
                raise ValueError(f"{path}: tensor {key!r} is not a weight of this Llama config")
            if key in seen:
                raise ValueError(f"{path}: tensor {key!r} was yielded twice")
            p = by_key[key]
            if tuple(tensor.shape) != p.shape:
                raise ValueError(f"{path}: tensor {key!r} has shape {tuple(tensor.shape)}, "
                                 f"expected {p.shape} for this config")
            seen.add(key)
            check_finite(tensor, str(path), p.name)  # NaN / inf: refused, named, before writing
            f.seek(len(header) + p.offset)
            errors[p.name] = _write_tensor(f, key, tensor, p, config)
        missing = [p.key for p in plans if p.key not in seen]
        if missing:
            raise ValueError(f"{path}: {len(missing)} tensors never arrived, e.g. {missing[:3]}")
        f.truncate(len(header) + total)  # zero padding after the last tensor
    # a report, like the progress bar: on stderr
    if progress and outtype not in ("f32", "f16", "bf16"):
        rows = [(p.name, p.ggml_type, int(np.prod(p.shape)), errors[p.name]) for p in plans]
        print(quant_mix.summary(rows), file=sys.stderr)
    return plans


def _write_tensor(f, key: str, tensor: torch.Tensor, p: TensorPlan, config: ModelConfig) -> float:
    """Convert and write one tensor at the file position;
    returns its RMS error against the f32 values."""
    w = tensor.detach().cpu()
    if is_rope_rotated(key):
        heads = config.n_heads if ".q_proj." in key else config.n_kv_heads
        # rotate-half rows -> interleaved pairs, as llama.cpp's RoPE wants
        w = hf_to_interleaved(w, heads)
    w = w.reshape(-1, p.shape[-1])  # (rows, K); 1-D tensors become one row
    step = max(1, _CHUNK_VALUES // p.shape[-1])
    written, sq_err = 0, 0.0
    for r in range(0, w.shape[0], step):
        chunk = w[r : r + step].float()
        data = quantize(chunk, p.ggml_type)  # (chunk rows, row bytes) uint8
        f.write(data.numpy().tobytes())
        written += data.numel()
        if p.ggml_type != GGML_F32:
            sq_err += ((dequantize(data, p.ggml_type, p.shape[-1]) - chunk)
                       .double().pow(2).sum().item())
    assert written == p.nbytes, f"{key}: wrote {written} bytes, planned {p.nbytes}"
    f.write(b"\0" * (align(p.nbytes, GGUF_DEFAULT_ALIGNMENT) - p.nbytes))
    return (sq_err / w.numel()) ** 0.5


def write_tensors(path: str | os.PathLike, kvs: list[tuple],
                  tensors: list[tuple[str, torch.Tensor, int]]) -> list[TensorPlan]:
    """Write a small GGUF whose tensors are all in memory: `kvs` as
    (key, value type, value[, element type]) and `tensors` as (GGUF name, tensor already in file
    layout, ggml type), in file order. Used for LoRA adapters (gguf_lora.py); a whole model goes
    through the streaming `write_gguf`."""
    path = Path(path)
    check_gguf_output(path)
    plans, offset = [], 0
    for name, t, ggml_type in tensors:
        check_finite(t, str(path), name)
        shape = tuple(t.shape)
        block = GGML_TYPES[ggml_type][1]
        if shape[-1] % block:
            raise ValueError(f"{path}: tensor {name!r} rows hold {shape[-1]} values, "
                             f"not a multiple of {type_name(ggml_type)}'s block of {block}")
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        nbytes = rows * row_bytes(ggml_type, shape[-1])
        plans.append(TensorPlan(name, name, shape, ggml_type, offset, nbytes))
        offset = align(offset + nbytes, GGUF_DEFAULT_ALIGNMENT)
    header = _header(kvs, plans, GGUF_DEFAULT_ALIGNMENT)
    with atomic_write(path) as f:
        f.write(header)
        for (_, t, _), p in zip(tensors, plans, strict=True):
            data = quantize(t.detach().cpu().float().reshape(-1, p.shape[-1]),
                            p.ggml_type)  # (rows, row bytes)
            f.write(data.numpy().tobytes())
            f.write(b"\0" * (align(p.nbytes, GGUF_DEFAULT_ALIGNMENT) - p.nbytes))
    return plans
