"""Meta's original consolidated checkpoint layout: `params.json` + `consolidated.00.pth` (+ `.01`, …
when the model was saved model-parallel), the layout of the LLaMA release and of alpaca-lora's
"consolidate weights" step (https://github.com/meta-llama/llama/blob/main/llama/model.py).

Differences from HF that matter:
- names: tok_embeddings, layers.N.attention.wq …, feed_forward.w1/w2/w3 (= gate/down/up), output
  (names.py);
- q/k rows are in the interleaved RoPE order (pairs (2i, 2i+1)), so HF weights are permuted on the
  way out and back on the way in (names.hf_to_interleaved / interleaved_to_hf);
- the MLP width is not stored: Meta's code derives it from dim, multiple_of and ffn_dim_multiplier:
      hidden = int(2 * (4 * dim) / 3);  hidden = int(ffn_dim_multiplier * hidden) if set;
      hidden = multiple_of * ceil(hidden / multiple_of)
  so the writer picks multiple_of / ffn_dim_multiplier that reproduce the model's hidden_dim
  exactly, and the reader checks the formula against the w1 shape;
- model-parallel shards split each matrix along one axis: column-parallel weights (wq, wk, wv, w1,
  w3, output) along dim 0, row-parallel ones (wo, w2) and the embedding along dim 1; norms are
  replicated.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import torch

from minillm.config import ModelConfig
from minillm.formats.weights import fill_model, iter_shard
from minillm.model import Llama
from minillm.names import (
    hf_to_interleaved,
    interleaved_to_hf,
    is_rope_rotated,
    meta_to_ours,
    ours_to_meta,
)
from minillm.util.fileio import atomic_write_bytes, read_json_object

_CAT_DIM1 = ("tok_embeddings.weight", "attention.wo.weight", "feed_forward.w2.weight")


def meta_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def meta_params(cfg: ModelConfig) -> dict:
    """params.json for cfg, with multiple_of / ffn_dim_multiplier chosen so Meta's formula gives
    hidden_dim. Meta's layout has no biases, no explicit head width and (in this writer) no RoPE
    scaling: a model with any of them is refused."""
    if (cfg.attention_bias or cfg.attention_out_bias or cfg.rope_scaling is not None
            or cfg.head_dim != cfg.dim // cfg.n_heads):
        raise ValueError("Meta's params.json cannot hold attention biases, an explicit head_dim "
                         "or RoPE scaling: export this model as GGUF or HF instead")
    multiple_of, mult = 256, None
    if meta_hidden_dim(cfg.dim, 256, None) != cfg.hidden_dim:
        multiple_of = cfg.hidden_dim  # round up to hidden_dim itself…
        base = int(2 * (4 * cfg.dim) / 3)
        if base > cfg.hidden_dim:  # …after shrinking the base width below it when needed
            mult = cfg.hidden_dim / base
            while meta_hidden_dim(cfg.dim, multiple_of, mult) != cfg.hidden_dim:
                mult = math.nextafter(mult, 0.0)
    assert meta_hidden_dim(cfg.dim, multiple_of, mult) == cfg.hidden_dim
    params = {"dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
              "n_kv_heads": cfg.n_kv_heads, "vocab_size": cfg.vocab_size,
              "multiple_of": multiple_of, "norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
              "max_seq_len": cfg.max_seq_len}
    if mult is not None:
        params["ffn_dim_multiplier"] = mult
    return params


def save_meta(model: Llama, dirpath, tokenizer_path=None):
    """Write params.json + consolidated.00.pth (+ tokenizer.model), atomically, q/k in interleaved
    order."""
    cfg = model.config
    dirpath = Path(dirpath)
    dirpath.mkdir(parents=True, exist_ok=True)
    state = {}
    for key, t in model.state_dict().items():
        if key == "lm_head.weight" and cfg.tie_embeddings:
            t = t.clone()  # Meta's layout has no tying: store output.weight explicitly
        t = t.detach().cpu()
        if is_rope_rotated(key):
            t = hf_to_interleaved(t, cfg.n_heads if "q_proj" in key else cfg.n_kv_heads)
        state[ours_to_meta(key)] = t.contiguous()
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(dirpath / "consolidated.00.pth", buf.getvalue())
    atomic_write_bytes(dirpath / "params.json", json.dumps(meta_params(cfg), indent=2).encode())
    if tokenizer_path is not None:
        atomic_write_bytes(dirpath / "tokenizer.model", Path(tokenizer_path).read_bytes())


def load_meta(dirpath: Path, dtype, device, linear_hook=None) -> Llama:
    params_path = dirpath / "params.json"
    p = read_json_object(params_path, "Meta params file")
    known = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
             "ffn_dim_multiplier", "norm_eps", "rope_theta", "max_seq_len", "max_batch_size",
             "use_scaled_rope"}
    for key in p:
        if key not in known:
            raise ValueError(f"{params_path}: unknown key {key!r}")
    if p.get("use_scaled_rope"):
        raise ValueError(f"{params_path}: use_scaled_rope (Llama 3.1 RoPE scaling) "
                         f"is not supported")
    shards = sorted(dirpath.glob("consolidated.*.pth"))
    if not shards:
        raise FileNotFoundError(f"{dirpath}: no consolidated.*.pth next to params.json")
    parts = [dict(iter_shard(s)) for s in shards]
    state = {}
    for name in parts[0]:
        if name == "rope.freqs":
            continue  # precomputed RoPE table in the original release
        pieces = [part[name] for part in parts]
        if len(pieces) == 1 or pieces[0].dim() == 1:
            state[name] = pieces[0]
        else:
            state[name] = torch.cat(pieces, dim=1 if name.endswith(_CAT_DIM1) else 0)
    vocab = (p["vocab_size"] if p.get("vocab_size", -1) > 0
             else state["tok_embeddings.weight"].shape[0])
    hidden = meta_hidden_dim(p["dim"], p["multiple_of"], p.get("ffn_dim_multiplier"))
    w1 = state.get("layers.0.feed_forward.w1.weight")
    if w1 is not None and w1.shape[0] != hidden:
        raise ValueError(f"{params_path}: dim/multiple_of/ffn_dim_multiplier give hidden {hidden}, "
                         f"but layers.0.feed_forward.w1.weight has {w1.shape[0]} rows")
    values = dict(dim=p["dim"], n_layers=p["n_layers"], n_heads=p["n_heads"],
                  n_kv_heads=p.get("n_kv_heads") or p["n_heads"], hidden_dim=hidden,
                  vocab_size=vocab, norm_eps=p.get("norm_eps", 1e-6),
                  rope_theta=p.get("rope_theta", 10000.0), max_seq_len=p.get("max_seq_len", 2048),
                  tie_embeddings=False)
    # untrusted values: checked (and named by their params.json key) in config.check_model_values
    cfg = ModelConfig.from_metadata(values, {k: k for k in values}, str(params_path))

    def tensors():
        for name, t in state.items():
            try:
                key = meta_to_ours(name)
            except KeyError:
                raise ValueError(f"{shards[0]}: unexpected weight {name!r}") from None
            if is_rope_rotated(key):
                t = interleaved_to_hf(t, cfg.n_heads if "q_proj" in key else cfg.n_kv_heads)
            yield str(shards[0]), key, t

    with torch.device("meta"):
        model = Llama(cfg)
    return fill_model(model, tensors(), dtype, device, linear_hook)
