"""GGUF v3 constants shared by the writer (gguf_writer.py) and the reader (gguf_reader.py).

Spec: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md (little-endian throughout):

    magic "GGUF" | uint32 version = 3 | uint64 n_tensors | uint64 n_kv
    n_kv x  (string key, uint32 value type, value)         strings are uint64 length + UTF-8, no NUL
    n_tensors x  (string name, uint32 n_dims, uint64 dims[n_dims] innermost first,
                  uint32 ggml type, uint64 offset relative to the data start)
    zero padding to `general.alignment` (32)
    tensor data, in info order, each tensor zero-padded to the alignment

Also here: the list of a Llama's tensors in the order a GGUF stores them, which both sides need.
"""

from __future__ import annotations

from minillm.config import ModelConfig

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
GGUF_DEFAULT_ALIGNMENT = 32
GGML_QUANT_VERSION = 2  # general.quantization_version written by current llama.cpp

# metadata value types (gguf.h `enum gguf_type`)
(UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64,
 FLOAT64) = range(13)
VALUE_TYPE_NAMES = ["UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "FLOAT32", "BOOL",
                    "STRING", "ARRAY", "UINT64", "INT64", "FLOAT64"]
STRUCT = {UINT8: "<B", INT8: "<b", UINT16: "<H", INT16: "<h", UINT32: "<I", INT32: "<i",
          FLOAT32: "<f", BOOL: "<B", UINT64: "<Q", INT64: "<q", FLOAT64: "<d"}
NUMPY = {UINT8: "<u1", INT8: "<i1", UINT16: "<u2", INT16: "<i2", UINT32: "<u4", INT32: "<i4",
         FLOAT32: "<f4", BOOL: "<u1", UINT64: "<u8", INT64: "<i8", FLOAT64: "<f8"}

# tokenizer.ggml.token_type values (= SentencePiece's ModelProto.SentencePiece.Type)
(TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED,
 TOKEN_BYTE) = 1, 2, 3, 4, 5, 6


# llama.cpp's per-frequency RoPE divisors (Llama 3's scaling, model.llama3_rope_divisors): a
# float32 (head_dim / 2,) tensor that convert_hf_to_gguf.py writes; not a parameter of the model
ROPE_FREQS = "rope_freqs.weight"


def align(n: int, alignment: int) -> int:
    """n rounded up to a multiple of `alignment`."""
    return (n + alignment - 1) // alignment * alignment


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
        if config.attention_bias:
            shapes[p + "self_attn.q_proj.bias"] = (q_rows,)
            shapes[p + "self_attn.k_proj.bias"] = (kv_rows,)
            shapes[p + "self_attn.v_proj.bias"] = (kv_rows,)
        if config.attention_out_bias:
            shapes[p + "self_attn.o_proj.bias"] = (D,)
        shapes[p + "post_attention_layernorm.weight"] = (D,)
        shapes[p + "mlp.gate_proj.weight"] = (F, D)
        shapes[p + "mlp.up_proj.weight"] = (F, D)
        shapes[p + "mlp.down_proj.weight"] = (D, F)
    shapes["norm.weight"] = (D,)
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (V, D)
    return shapes
