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
    heads must split dim into an even head size (RoPE rotates pairs) and be a multiple of the kv
    heads. keys maps a field to the key it was read from ("rms_norm_eps", "llama.rope.freq_base"),
    which the message names; without keys the messages name ModelConfig's fields.
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
    if dim % heads != 0:
        raise ValueError(f"{prefix}{key('dim')}={dim} is not divisible by {key('n_heads')}={heads}")
    if heads % kv_heads != 0:
        raise ValueError(f"{prefix}{key('n_heads')}={heads} is not a multiple of "
                         f"{key('n_kv_heads')}={kv_heads}")
    if (dim // heads) % 2 != 0:
        raise ValueError(f"{prefix}head_dim={dim // heads} must be even for RoPE")


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

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        check_model_values(dataclasses.asdict(self))
        self.norm_eps, self.rope_theta = float(self.norm_eps), float(self.rope_theta)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

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
        keys["rope_theta"], values["rope_theta"] = hf_rope_theta(hf, source)
        # transformers: num_key_value_heads null means plain multi-head
        if values["n_kv_heads"] is None:
            values["n_kv_heads"] = values["n_heads"]
        config = cls.from_metadata(values, keys, source)
        if hf.get("head_dim") is not None and hf["head_dim"] != config.head_dim:
            raise ValueError(f"{source}: head_dim = {hf['head_dim']!r} is not supported: "
                             f"minillm's heads are hidden_size / num_attention_heads = "
                             f"{config.head_dim} wide")
        return config

    def to_hf_config(self) -> dict:
        """The HF `config.json` for this model (what export and the tests write)."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
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
}
# what transformers' LlamaConfig assumes for a key the file leaves out (OpenLLaMA v1 has no
# rope_theta)
HF_DEFAULTS = {"n_kv_heads": None, "vocab_size": 32000, "max_seq_len": 2048, "norm_eps": 1e-6,
               "rope_theta": 10000.0, "tie_embeddings": False}
# keys whose value changes the computation: only these values are implemented here
HF_REQUIRED_VALUES = {
    "model_type": ("llama",),
    # LLaMA…: early 2023 conversions
    "architectures": (["LlamaForCausalLM"], ["LLaMAForCausalLM"], None, []),
    "hidden_act": ("silu", "swish"),  # transformers maps both names to SiLU
    "attention_bias": (False,),  # biases on q/k/v/o (InternLM-style Llamas)
    "mlp_bias": (False,),
    "attention_dropout": (0.0,),  # dropout would change training (inference ignores it)
    "sliding_window": (None,),  # Mistral-style local attention
    "partial_rotary_factor": (1.0,),  # RoPE on only part of each head
    "pruned_heads": ({},),
    "is_encoder_decoder": (False,),
    "add_cross_attention": (False,),
}
# keys whose mere presence means weights minillm cannot compute with
HF_REFUSED = {
    "quantization_config": "quantized checkpoints (GPTQ, AWQ, bitsandbytes) are not supported",
}
# read by hf_rope_theta and the head_dim check
HF_READ_APART = {"rope_theta", "rope_scaling", "rope_parameters", "head_dim"}
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


def _check_rope_type(spec, key: str, source: str, default: str | None):
    """rope_scaling (transformers 4.x) or rope_parameters (5.x) must ask for plain RoPE: rope_type
    (older files: type) "default". Scaled variants (linear, dynamic, yarn, longrope, llama3) are
    refused."""
    if not isinstance(spec, dict):
        raise ValueError(f"{source}: config key {key!r} must be an object, "
                         f"found {json.dumps(spec)}")
    rope_type = spec.get("rope_type", spec.get("type", default))
    if rope_type != "default":
        raise ValueError(f"{source}: config key {key!r} = {json.dumps(spec)}: "
                         f"RoPE scaling {rope_type!r} is not supported "
                         f"(minillm implements plain RoPE, rope_type 'default')")
    for sub in spec:
        if sub not in ("rope_type", "type", "rope_theta", "partial_rotary_factor"):
            warnings.warn(f"{source}: ignoring unknown config key '{key}.{sub}' "
                          f"(plain RoPE has no such setting)", stacklevel=3)
    factor = spec.get("partial_rotary_factor", 1.0)
    if factor != 1.0:
        raise ValueError(f"{source}: config key '{key}.partial_rotary_factor' = {factor!r} "
                         f"is not supported (minillm rotates the whole head)")


def hf_rope_theta(hf: dict, source: str) -> tuple[str, float]:
    """(key, value) of the RoPE base in an HF config: transformers 5 writes it in rope_parameters
    ({"rope_theta": 10000.0, "rope_type": "default"}), 4.31–4.5x as the top-level rope_theta, and
    older files not at all (LlamaConfig's default, 10000). Two keys that disagree are an error
    naming both."""
    if hf.get("rope_scaling") is not None:
        _check_rope_type(hf["rope_scaling"], "rope_scaling", source, default="unnamed")
    found = {}
    if hf.get("rope_theta") is not None:
        found["rope_theta"] = hf["rope_theta"]
    params = hf.get("rope_parameters")
    if params is not None:
        _check_rope_type(params, "rope_parameters", source, default="default")
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
