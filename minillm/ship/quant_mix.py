"""llama-quantize's file types for Llama:
which ggml type each tensor of a Q4_K_M (Q5_K_M, Q6_K, ...) file gets.

Spec: `llama_tensor_get_type` and `tensor_type_fallback` in llama.cpp's src/llama-quant.cpp, the
ftype enum `llama_ftype` in include/llama.h, and llama-quantize's option table in
tools/quantize/quantize.cpp (https://github.com/ggml-org/llama.cpp). llama-quantize does not give
every tensor the file's type:

    1-D tensors (norms)            keep their type (F32 in minillm's files)
    output.weight                  Q6_K; Q8_0 when its rows are not a multiple of that type's block
                                   (with tied embeddings, token_embd.weight takes this rule instead)
    blk.i.attn_v.weight            Q4_K_M / Q5_K_M: Q6_K where use_more_bits(i, n_layer);
                                   Q4_K_S: Q5_K for i < 4
    blk.i.ffn_down.weight          Q4_K_M / Q5_K_M: Q6_K where use_more_bits(i, n_layer);
                                   Q4_K_S: Q5_K for i < n/8
    every other 2-D weight         the file type's own tensor type (Q4_K for Q4_K_M, ...)
    then, a row length that is not a multiple of the chosen type's block falls back:
                                   Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0,
                                   and to F16 if still not a multiple
                                   (a 32-value type such as Q5_0 goes to F16 directly)

    use_more_bits(i, n) = i < n/8  or  i >= 7n/8  or  (i - n/8) % 3 == 2        (integer division)

so a Q4_K_M model spends 6 bits on the first and last eighth of its attn_v / ffn_down layers and on
every third layer between them. llama.cpp counts attn_v and ffn_down tensors in the order it visits
them, which is by layer number (its loader sorts names by `blk.N`), so the counter is the layer
index `i` here. The 70B rule (80 layers with grouped-query attention: attn_v Q3_K/Q4_K -> Q5_K) is
kept; the GQA and expert rules of the other file types (Q2_K, IQ*) do not touch these.

`general.file_type` records the llama_ftype; the names are llama-quantize's (q4_k and q5_k are its
aliases for q4_k_m and q5_k_m).
"""

from __future__ import annotations

from dataclasses import dataclass

from minillm.formats.ggml_quants import (
    GGML_F16,
    GGML_F32,
    GGML_Q4_1,
    GGML_Q4_K,
    GGML_Q5_0,
    GGML_Q5_1,
    GGML_Q5_K,
    GGML_Q6_K,
    GGML_Q8_0,
    GGML_TYPES,
    type_name,
)


@dataclass(frozen=True)
class FileType:
    ftype: int  # general.file_type, llama.h `enum llama_ftype`
    default: int  # the ggml type of the 2-D weights no rule singles out


FILE_TYPES = {
    "q4_1": FileType(3, GGML_Q4_1),  # LLAMA_FTYPE_MOSTLY_Q4_1
    "q5_0": FileType(8, GGML_Q5_0),  # LLAMA_FTYPE_MOSTLY_Q5_0
    "q5_1": FileType(9, GGML_Q5_1),  # LLAMA_FTYPE_MOSTLY_Q5_1
    "q4_k_s": FileType(14, GGML_Q4_K),  # LLAMA_FTYPE_MOSTLY_Q4_K_S
    "q4_k_m": FileType(15, GGML_Q4_K),  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    "q5_k_s": FileType(16, GGML_Q5_K),  # LLAMA_FTYPE_MOSTLY_Q5_K_S
    "q5_k_m": FileType(17, GGML_Q5_K),  # LLAMA_FTYPE_MOSTLY_Q5_K_M
    "q6_k": FileType(18, GGML_Q6_K),  # LLAMA_FTYPE_MOSTLY_Q6_K
}
ALIASES = {"q4_k": "q4_k_m", "q5_k": "q5_k_m"}  # llama-quantize's own aliases
# for rows not a multiple of 256
FALLBACK = {GGML_Q4_K: GGML_Q5_0, GGML_Q5_K: GGML_Q5_1, GGML_Q6_K: GGML_Q8_0}


def file_type(name: str) -> FileType:
    name = ALIASES.get(name, name)
    if name not in FILE_TYPES:
        raise ValueError(f"unknown llama-quantize file type {name!r}; expected one of "
                         f"{sorted(FILE_TYPES) + sorted(ALIASES)}")
    return FILE_TYPES[name]


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    return (i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8
            or (i_layer - n_layer // 8) % 3 == 2)


def _layer(name: str) -> int:
    parts = name.split(".")
    if parts[0] != "blk" or not parts[1].isdigit():
        raise ValueError(f"tensor {name!r}: expected a blk.N. layer prefix")
    return int(parts[1])


def _block(ggml_type: int) -> int:
    return GGML_TYPES[ggml_type][1]


def tensor_type(name: str, shape: tuple[int, ...], mix: str, n_layer: int, n_head: int,
                n_head_kv: int, tied: bool = False) -> int:
    """The ggml type llama-quantize gives GGUF tensor `name`
    of PyTorch `shape` (rows last) in file type `mix`.

    `tied`: the model has no output.weight, so token_embd.weight also makes the logits.
    """
    ft, mix = file_type(mix), ALIASES.get(mix, mix)
    if len(shape) < 2:
        return GGML_F32  # only 2-D (and 3-D expert) weights are quantized; norms keep their F32
    ncols = shape[-1]
    new = ft.default
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        new = GGML_Q8_0 if ncols % _block(new) else GGML_Q6_K
    elif "attn_v.weight" in name:
        i = _layer(name)
        if mix in ("q4_k_m", "q5_k_m") and use_more_bits(i, n_layer):
            new = GGML_Q6_K
        elif mix == "q4_k_s" and i < 4:
            new = GGML_Q5_K
        if n_layer == 80 and n_head_kv != n_head and new == GGML_Q4_K:  # llama.cpp's LLM_TYPE_70B
            new = GGML_Q5_K
    elif "ffn_down" in name:
        i = _layer(name)
        if mix in ("q4_k_m", "q5_k_m") and use_more_bits(i, n_layer):
            new = GGML_Q6_K
        elif mix == "q4_k_s" and i < n_layer // 8:
            new = GGML_Q5_K
    if ncols % _block(new):
        new = FALLBACK.get(new, new)  # a 32-value type has no smaller block to fall back to
        if ncols % _block(new):
            new = GGML_F16
    return new


def bits_per_weight(ggml_type: int) -> float:
    _, block, size = GGML_TYPES[ggml_type]
    return 8 * size / block


def summary(rows: list[tuple[str, int, int, float]]) -> str:
    """Per-tensor table of (GGUF name, ggml type, element count, RMS error vs the f32 weights) plus
    a total line with the file's average bits per weight."""
    lines = [f"{'tensor':<32} {'type':<5} {'bits/w':>6} {'rms error':>10}"]
    total_bits = total_n = 0
    for name, ggml_type, n, rms in rows:
        lines.append(f"{name:<32} {type_name(ggml_type):<5} {bits_per_weight(ggml_type):>6.2f} "
                     f"{rms:>10.3e}")
        total_bits += bits_per_weight(ggml_type) * n
        total_n += n
    lines.append(f"{'all ' + str(len(rows)) + ' tensors':<32} {'':<5} "
                 f"{total_bits / max(total_n, 1):>6.2f}")
    return "\n".join(lines)
