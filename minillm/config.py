"""ModelConfig: the numbers that define a Llama, with named presets and strict loading.

A config is a dataclass (commented fields, derived fields in `__post_init__`, presets by name as in
gpt-fast's `from_name`). It can be built four ways:

    ModelConfig.from_name("openllama-7b")            # a preset
    ModelConfig.from_hf_config("path/config.json")   # an HF `LlamaForCausalLM` config.json
                                                     # (transformers 4.x/5.x)
    ModelConfig.from_dict(d, source="x.json")        # minillm's own JSON (unknown keys are errors)
    ModelConfig.from_metadata(values, keys, source)  # values read from another format
                                                     # (GGUF metadata)

Every value from a file is untrusted. One function, `check_model_values`, checks them all — types,
sizes, epsilon and RoPE base — and every bad value is one error naming the file and the key it was
read from.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

from minillm.util.fileio import read_json_object
from minillm.util.strict import check_value, field_types

# --------------------------------------------------------------------------------------------------
# checking values

# Sizes come from files we do not control: a corrupt or hostile config must get one clear error, not
# a model of 2^31 layers. The bounds are far above any released Llama (Llama 3.1 405B: dim 16384,
# 126 layers, 128 heads, hidden 53248, vocab 128256). Nothing is allocated from max_seq_len (RoPE
# tables and the KV cache are sized by the sequence actually run), so a context length of 2^31 is
# only a limit.
SIZE_LIMITS = {
    "dim": 1 << 16, "n_layers": 1 << 10, "n_heads": 1 << 10, "n_kv_heads": 1 << 10,
    "hidden_dim": 1 << 18, "vocab_size": 1 << 22, "max_seq_len": 1 << 40,
}


def _check_positive_float(value, name: str):
    if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
            or value <= 0):
        raise ValueError(f"{name} must be a finite number > 0, found {value!r}")


def check_model_values(values: dict, keys: dict[str, str] | None = None):
    """Raise one ValueError for the first impossible value in `values` (ModelConfig field → value).

    Sizes must be ints in [1, SIZE_LIMITS]; norm_eps and rope_theta finite numbers > 0 (an epsilon
    of 0 or NaN turns RMSNorm into NaN, a base ≤ 0 makes RoPE's theta^(-2i/D) NaN or infinite); the
    heads must split dim into an even head size (RoPE rotates pairs), or head_dim be given and even,
    and be a multiple of the kv heads; rope_scaling holds Llama 3's four numbers. keys maps a
    field to the key it was read from ("rms_norm_eps", "llama.rope.freq_base"), which the message
    names; without keys the messages name ModelConfig's fields.
    """
    keys = keys or {}

    def key(field):
        return keys.get(field, field)

    field_prefix, prefix = ("", "") if keys else ("ModelConfig.", "ModelConfig: ")
    for field, limit in SIZE_LIMITS.items():
        v = values[field]
        if not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= limit:
            raise ValueError(f"{field_prefix}{key(field)} must be a positive int "
                             f"(at most {limit}), found {v!r}")
    for field in ("norm_eps", "rope_theta"):
        _check_positive_float(values[field], field_prefix + key(field))
    if not isinstance(values["tie_embeddings"], bool):
        raise ValueError(f"{field_prefix}{key('tie_embeddings')} must be true or false, "
                         f"found {values['tie_embeddings']!r}")
    dim, heads, kv_heads = values["dim"], values["n_heads"], values["n_kv_heads"]
    if heads % kv_heads != 0:
        raise ValueError(f"{prefix}{key('n_heads')}={heads} is not a multiple of "
                         f"{key('n_kv_heads')}={kv_heads}")
    head_dim = values.get("head_dim")
    if head_dim is None and dim % heads != 0:
        raise ValueError(f"{prefix}{key('dim')}={dim} is not divisible by {key('n_heads')}={heads}")
    head_dim = dim // heads if head_dim is None else head_dim
    if not isinstance(head_dim, int) or isinstance(head_dim, bool) or not 0 < head_dim <= 1 << 12:
        raise ValueError(f"{field_prefix}{key('head_dim')} must be a positive int (at most 4096), "
                         f"found {head_dim!r}")
    if head_dim % 2 != 0:
        raise ValueError(f"{prefix}{key('head_dim')}={head_dim} must be even for RoPE")
    if not isinstance(values.get("attention_bias", False), bool):
        raise ValueError(f"{field_prefix}{key('attention_bias')} must be true or false, "
                         f"found {values['attention_bias']!r}")
    if values.get("rope_scaling") is not None:
        check_llama3_scaling(values["rope_scaling"], field_prefix + key("rope_scaling"))


@dataclass
class ModelConfig:
    # the default shape is the "tiny" preset's, the model `python train.py` trains
    # (configs/tiny.toml); the preset also ties lm_head to the embedding, which checkpoints' configs
    # otherwise leave untied
    dim: int = 128  # width of the residual stream (HF: hidden_size)
    n_layers: int = 4  # number of transformer blocks
    n_heads: int = 4  # query heads
    n_kv_heads: int | None = None  # key/value heads (GQA); None means n_heads (plain multi-head)
    hidden_dim: int = 352  # SwiGLU inner width (HF: intermediate_size)
    vocab_size: int = 4096  # rows of the embedding and of lm_head
    # longest context the model accepts (RoPE and the KV cache grow up to it)
    max_seq_len: int = 256
    norm_eps: float = 1e-6  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base frequency
    tie_embeddings: bool = False  # share the embedding matrix with lm_head (OpenLLaMA: untied)
    # the Llama 3 family's three extras (Meta's Llama 3, Qwen2, SmolLM2 use some of them):
    head_dim: int | None = None  # width of one head; None means dim // n_heads
    attention_bias: bool = False  # biases on q/k/v (Qwen2, and HF Llama's attention_bias)
    attention_out_bias: bool = False  # a bias on o_proj too (HF Llama's attention_bias only)
    # Llama 3's RoPE scaling: {factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings} (llama3_rope_divisors); None means plain RoPE
    rope_scaling: dict[str, float] | None = None

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads if self.dim % self.n_heads == 0 else None
        check_model_values(dataclasses.asdict(self))
        self.norm_eps, self.rope_theta = float(self.norm_eps), float(self.rope_theta)
        if self.rope_scaling is not None:
            self.rope_scaling = {k: float(v) for k, v in self.rope_scaling.items()}

    # ----------------------------------------------------------------------------------------------
    # construction

    @classmethod
    def from_name(cls, name: str) -> ModelConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}")
        return cls(**PRESETS[name])

    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>") -> ModelConfig:
        """minillm's own JSON: exactly the dataclass fields, each of its annotated type
        (strict.py)."""
        fields = field_types(cls)
        for key in d:
            if key not in fields:
                raise ValueError(f"{source}: unknown config key {key!r}; "
                                 f"expected one of {sorted(fields)}")
        d = {key: check_value(key, value, fields[key], source) for key, value in d.items()}
        values = {f.name: f.default for f in dataclasses.fields(cls)} | d
        if values["n_kv_heads"] is None:
            values["n_kv_heads"] = values["n_heads"]
        return cls.from_metadata(values, {k: k for k in d}, source)

    @classmethod
    def from_metadata(cls, values: dict, keys: dict[str, str], source: str) -> ModelConfig:
        """A config from values read out of a file (every field given); keys[field] is the key each
        value was read from, so that check_model_values' error names the file and that key."""
        try:
            check_model_values(values, keys)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_hf_config(cls, path: str | Path) -> ModelConfig:
        """Read the `config.json` of an HF `LlamaForCausalLM` (see from_hf_dict)."""
        path = Path(path)
        return cls.from_hf_dict(read_json_object(path, "config file"), source=str(path))

    @classmethod
    def from_hf_dict(cls, hf: dict, source: str = "<config.json>") -> ModelConfig:
        """An HF Llama config as transformers 4.28–4.5x and 5.x `save_pretrained` write it, or a
        full `to_dict()` dump (with every generic PretrainedConfig field).

        The keys fall in four groups: the shape (HF_TO_OURS; absent ones take LlamaConfig's
        defaults); keys that change the maths, which must hold the value minillm implements
        (HF_REQUIRED_VALUES, RoPE scaling, head_dim) or the config is refused with the key named;
        bookkeeping with no effect on the forward pass (HF_IGNORED); and anything else, which gets
        one warning naming it.
        """
        values, keys = dict(HF_DEFAULTS), {}
        qwen2 = hf.get("model_type") == "qwen2"  # Qwen2: a Llama with biases on q/k/v
        for key, value in hf.items():
            if key in HF_TO_OURS:
                values[HF_TO_OURS[key]], keys[HF_TO_OURS[key]] = value, key
            elif key in HF_REQUIRED_VALUES:
                if value not in HF_REQUIRED_VALUES[key]:
                    expected = " or ".join(json.dumps(v) for v in HF_REQUIRED_VALUES[key])
                    raise ValueError(f"{source}: config key {key!r} = {json.dumps(value)} "
                                     f"is not supported (minillm implements {key} = {expected})")
            elif key in HF_REFUSED:
                raise ValueError(f"{source}: config key {key!r}: {HF_REFUSED[key]}")
            elif key not in HF_IGNORED and key not in HF_READ_APART:
                warnings.warn(f"{source}: ignoring unknown config key {key!r} "
                              f"(not a Llama setting minillm knows)", stacklevel=2)
        for required in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                         "intermediate_size"):
            if required not in hf:
                raise ValueError(f"{source}: missing required config key {required!r}")
        _check_full_attention(hf, source)
        keys["rope_scaling"], values["rope_scaling"] = hf_rope_scaling(hf, source)
        keys["rope_theta"], values["rope_theta"] = hf_rope_theta(hf, source)
        if qwen2:
            values["attention_bias"] = True
        elif hf.get("attention_bias") is not None:  # a Llama's flag biases q, k, v and o
            values["attention_bias"] = values["attention_out_bias"] = hf["attention_bias"]
            keys["attention_bias"] = keys["attention_out_bias"] = "attention_bias"
        # transformers: num_key_value_heads null means plain multi-head
        if values["n_kv_heads"] is None:
            values["n_kv_heads"] = values["n_heads"]
        return cls.from_metadata(values, keys, source)

    def to_hf_config(self) -> dict:
        """The HF `config.json` for this model (what export and the tests write): a Llama, or a
        Qwen2 when q/k/v have biases and o_proj has none (a Llama's attention_bias biases all four).
        Llama 3's RoPE scaling goes in transformers 4.x's rope_scaling, which 5.x also reads."""
        qwen2 = self.attention_bias and not self.attention_out_bias
        if self.attention_out_bias and not self.attention_bias:
            raise ValueError("ModelConfig: attention_out_bias without attention_bias has no HF "
                             "config.json form")
        extra = {"head_dim": self.head_dim}
        if not qwen2:
            extra["attention_bias"] = self.attention_bias
        if self.rope_scaling is not None:
            extra["rope_scaling"] = {"rope_type": "llama3", **self.rope_scaling}
            extra["rope_scaling"]["original_max_position_embeddings"] = int(
                self.rope_scaling["original_max_position_embeddings"])
        return extra | {
            "architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
            "model_type": "qwen2" if qwen2 else "llama",
            "hidden_size": self.dim,
            "intermediate_size": self.hidden_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
            "torch_dtype": "float32",
        }


# --------------------------------------------------------------------------------------------------
# HF config.json keys

HF_TO_OURS = {
    "hidden_size": "dim",
    "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads",
    "num_key_value_heads": "n_kv_heads",
    "intermediate_size": "hidden_dim",
    "vocab_size": "vocab_size",
    "max_position_embeddings": "max_seq_len",
    "rms_norm_eps": "norm_eps",
    "tie_word_embeddings": "tie_embeddings",
    "head_dim": "head_dim",  # null (or absent) means hidden_size / num_attention_heads
}
# what transformers' LlamaConfig assumes for a key the file leaves out (OpenLLaMA v1 has no
# rope_theta)
HF_DEFAULTS = {"n_kv_heads": None, "vocab_size": 32000, "max_seq_len": 2048, "norm_eps": 1e-6,
               "rope_theta": 10000.0, "tie_embeddings": False, "head_dim": None,
               "attention_bias": False, "attention_out_bias": False}
# keys whose value changes the computation: only these values are implemented here
HF_REQUIRED_VALUES = {
    "model_type": ("llama", "qwen2"),
    # LLaMA…: early 2023 conversions
    "architectures": (["LlamaForCausalLM"], ["LLaMAForCausalLM"], ["Qwen2ForCausalLM"], None, []),
    "hidden_act": ("silu", "swish"),  # transformers maps both names to SiLU
    "mlp_bias": (False,),
    "attention_dropout": (0.0,),  # dropout would change training (inference ignores it)
    "use_sliding_window": (False,),  # Mistral / Qwen2-style local attention
    "partial_rotary_factor": (1.0,),  # RoPE on only part of each head
    "pruned_heads": ({},),
    "is_encoder_decoder": (False,),
    "add_cross_attention": (False,),
}
# keys whose mere presence means weights minillm cannot compute with
HF_REFUSED = {
    "quantization_config": "quantized checkpoints (GPTQ, AWQ, bitsandbytes) are not supported",
}
# read by hf_rope_theta, hf_rope_scaling, _check_full_attention and the attention_bias rule
HF_READ_APART = {"rope_theta", "rope_scaling", "rope_parameters", "attention_bias",
                 "sliding_window", "layer_types", "max_window_layers"}
# bookkeeping with no effect on the forward pass: token ids (the tokenizer's business), the generic
# PretrainedConfig fields that transformers 4.x `to_dict()` writes (outputs, TorchScript/TF
# switches, classification labels, generation defaults), version and dtype tags. pretraining_tp > 1
# makes transformers 4.31–4.4x compute each projection in slices and concatenate or sum them: the
# same linear map, only the float summation order differs (transformers 5 ignores it too).
HF_IGNORED = {
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
    "initializer_range", "use_cache", "pretraining_tp", "torch_dtype", "dtype",
    "transformers_version", "_name_or_path", "_commit_hash", "_attn_implementation",
    "_attn_implementation_autoset", "_attn_implementation_internal", "attn_implementation",
    "tokenizer_class", "max_sequence_length", "return_dict", "output_hidden_states",
    "output_attentions", "torchscript", "use_bfloat16", "tf_legacy_loss", "chunk_size_feed_forward",
    "is_decoder", "cross_attention_hidden_size", "tie_encoder_decoder", "finetuning_task",
    "id2label", "label2id", "num_labels", "problem_type", "prefix", "task_specific_params",
    # generation defaults that transformers 4.x kept in the model config (now
    # generation_config.json)
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens",
}


LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
                    "original_max_position_embeddings")


def check_llama3_scaling(spec, name: str):
    """Llama 3's RoPE scaling: exactly LLAMA3_ROPE_KEYS, each a finite number > 0, factor ≥ 1 and
    the high-frequency factor above the low one (their difference divides the smoothing)."""
    if not isinstance(spec, dict) or sorted(spec) != sorted(LLAMA3_ROPE_KEYS):
        raise ValueError(f"{name} must hold exactly {', '.join(LLAMA3_ROPE_KEYS)}, "
                         f"found {json.dumps(spec)}")
    for k in LLAMA3_ROPE_KEYS:
        _check_positive_float(spec[k], f"{name}.{k}")
    if spec["factor"] < 1 or spec["high_freq_factor"] <= spec["low_freq_factor"]:
        raise ValueError(f"{name} needs factor >= 1 and high_freq_factor > low_freq_factor, "
                         f"found {json.dumps(spec)}")


def _rope_spec(spec, key: str, source: str, default: str | None) -> dict | None:
    """rope_scaling (transformers 4.x) or rope_parameters (5.x): plain RoPE (rope_type, in older
    files type, "default") → None; Llama 3's (rope_type "llama3") → its four numbers. Every other
    variant (linear, dynamic, yarn, longrope) changes the maths in ways minillm does not implement
    and is refused, as is partial_rotary_factor != 1."""
    if not isinstance(spec, dict):
        raise ValueError(f"{source}: config key {key!r} must be an object, "
                         f"found {json.dumps(spec)}")
    rope_type = spec.get("rope_type", spec.get("type", default))
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"{source}: config key {key!r} = {json.dumps(spec)}: "
                         f"RoPE scaling {rope_type!r} is not supported "
                         f"(minillm implements plain RoPE and 'llama3')")
    known = ("rope_type", "type", "rope_theta", "partial_rotary_factor")
    if rope_type == "llama3":
        known += LLAMA3_ROPE_KEYS
    for sub in spec:
        if sub not in known:
            warnings.warn(f"{source}: ignoring unknown config key '{key}.{sub}' "
                          f"({rope_type} RoPE has no such setting)", stacklevel=3)
    factor = spec.get("partial_rotary_factor", 1.0)
    if factor != 1.0:
        raise ValueError(f"{source}: config key '{key}.partial_rotary_factor' = {factor!r} "
                         f"is not supported (minillm rotates the whole head)")
    if rope_type == "default":
        return None
    scaling = {k: spec.get(k) for k in LLAMA3_ROPE_KEYS}
    try:
        check_llama3_scaling(scaling, key)
    except ValueError as e:
        raise ValueError(f"{source}: config key {e}") from None
    return scaling


def hf_rope_scaling(hf: dict, source: str) -> tuple[str, dict | None]:
    """(key, Llama 3 scaling or None) from rope_scaling (4.x) or rope_parameters (5.x)."""
    found = {key: _rope_spec(hf[key], key, source, default)
             for key, default in (("rope_scaling", "unnamed"), ("rope_parameters", "default"))
             if hf.get(key) is not None}
    scaled = {k: v for k, v in found.items() if v is not None}
    if len(scaled) == 2 and scaled["rope_scaling"] != scaled["rope_parameters"]:
        raise ValueError(f"{source}: rope_scaling and rope_parameters disagree")
    return next(iter(scaled.items()), ("rope_scaling", None))


def _check_full_attention(hf: dict, source: str):
    """Every layer attends to the whole context: sliding_window is null, or unused because Qwen2's
    use_sliding_window is false (max_window_layers then means nothing), and layer_types (5.x)
    names full attention only."""
    if hf.get("sliding_window") is not None and hf.get("use_sliding_window", True):
        raise ValueError(f"{source}: config key 'sliding_window' = {hf['sliding_window']} is not "
                         f"supported (minillm implements full attention in every layer)")
    types_ = hf.get("layer_types")
    if types_ is not None and set(types_) != {"full_attention"}:
        raise ValueError(f"{source}: config key 'layer_types' = {json.dumps(types_)} is not "
                         f"supported (minillm implements 'full_attention' in every layer)")


def hf_rope_theta(hf: dict, source: str) -> tuple[str, float]:
    """(key, value) of the RoPE base in an HF config: transformers 5 writes it in rope_parameters
    ({"rope_theta": 10000.0, "rope_type": "default"}), 4.31–4.5x as the top-level rope_theta, and
    older files not at all (LlamaConfig's default, 10000). Two keys that disagree are an error
    naming both."""
    found = {}
    if hf.get("rope_theta") is not None:
        found["rope_theta"] = hf["rope_theta"]
    params = hf.get("rope_parameters")
    if params is not None:
        if params.get("rope_theta") is not None:
            found["rope_parameters.rope_theta"] = params["rope_theta"]
    for key, value in found.items():
        _check_positive_float(value, f"{source}: {key}")
    if len(found) == 2 and found["rope_theta"] != found["rope_parameters.rope_theta"]:
        raise ValueError(f"{source}: rope_theta = {found['rope_theta']!r} and "
                         f"rope_parameters.rope_theta = {found['rope_parameters.rope_theta']!r} "
                         f"disagree")
    if not found:
        return "rope_theta", HF_DEFAULTS["rope_theta"]
    return next(iter(found.items()))


# --------------------------------------------------------------------------------------------------
# presets: v1 and v2 of OpenLLaMA share shapes (they differ in training data and tokenizer)
PRESETS: dict[str, dict] = {
    # from-scratch sizes
    # what `python train.py` trains: the defaults above, lm_head tied to the embedding
    # (1.33M parameters; untied: 1.85M and whole-val loss 3.504, tied 3.443 after the same
    # 1000 Muon steps)
    "tiny": dict(tie_embeddings=True),
    "small-125m": dict(dim=768, n_layers=12, n_heads=12, hidden_dim=2048, vocab_size=32000,
                       max_seq_len=1024),
    "1b": dict(dim=2048, n_layers=18, n_heads=16, n_kv_heads=8, hidden_dim=5632, vocab_size=32000,
               max_seq_len=2048),
    # OpenLLaMA (https://github.com/openlm-research/open_llama)
    "openllama-3b": dict(dim=3200, n_layers=26, n_heads=32, hidden_dim=8640, vocab_size=32000,
                         max_seq_len=2048),
    "openllama-7b": dict(dim=4096, n_layers=32, n_heads=32, hidden_dim=11008, vocab_size=32000,
                         max_seq_len=2048),
    "openllama-13b": dict(dim=5120, n_layers=40, n_heads=40, hidden_dim=13824, vocab_size=32000,
                          max_seq_len=2048),
}
