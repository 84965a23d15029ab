"""ModelConfig: the numbers that define a Llama, with named presets and strict loading.

A config is a dataclass (commented fields, derived fields in `__post_init__`, presets by name as in
gpt-fast's `from_name`). It can be built three ways:

    ModelConfig.from_name("openllama-7b")          # a preset
    ModelConfig.from_hf_config("path/config.json") # an HF / OpenLLaMA `LlamaForCausalLM` config
    ModelConfig.from_dict(d, source="x.json")      # minillm's own JSON (unknown keys are errors)

Every bad field is one error naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path


def read_json_object(path: str | Path, what: str = "file") -> dict:
    """Parse a JSON file whose top level must be an object: one clear error naming the file for a missing
    file ("<path>: <what> not found"), invalid JSON, or a top level that is not an object."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


@dataclass
class ModelConfig:
    # the defaults are the "tiny" preset: the 1.85M-parameter model `python train.py` trains (configs/tiny.toml)
    dim: int = 128  # width of the residual stream (HF: hidden_size)
    n_layers: int = 4  # number of transformer blocks
    n_heads: int = 4  # query heads
    n_kv_heads: int | None = None  # key/value heads (GQA); None means n_heads (plain multi-head)
    hidden_dim: int = 352  # SwiGLU inner width (HF: intermediate_size)
    vocab_size: int = 4096  # rows of the embedding and of lm_head
    max_seq_len: int = 256  # longest context RoPE and the KV cache are built for
    norm_eps: float = 1e-6  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base frequency
    tie_embeddings: bool = False  # share the embedding matrix with lm_head (OpenLLaMA: untied)

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, found {value!r}")
        if self.dim % self.n_heads != 0:
            raise ValueError(f"ModelConfig: dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(
                f"ModelConfig: n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if (self.dim // self.n_heads) % 2 != 0:
            raise ValueError(f"ModelConfig: head_dim={self.dim // self.n_heads} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    # ------------------------------------------------------------------------------------------------
    # construction

    @classmethod
    def from_name(cls, name: str) -> ModelConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}")
        return cls(**PRESETS[name])

    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>") -> ModelConfig:
        """minillm's own JSON: exactly the dataclass fields, each of the right type."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key, value in d.items():
            if key not in fields:
                raise ValueError(f"{source}: unknown config key {key!r}; expected one of {sorted(fields)}")
            expected = {"float": float, "bool": bool, "int": int}.get(str(fields[key].type).split(" ")[0])
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                continue  # JSON writes 10000.0 as 10000
            if expected is not None and value is not None and type(value) is not expected:
                raise ValueError(
                    f"{source}: config key {key!r} must be {expected.__name__}, found {value!r}"
                )
        try:
            return cls(**{k: (float(v) if fields[k].type == "float" else v) for k, v in d.items()})
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_hf_config(cls, path: str | Path) -> ModelConfig:
        """Read an HF `config.json` of a `LlamaForCausalLM` (OpenLLaMA v1/v2, Llama 2 style).

        Keys that change the maths must have the values this model implements (silu MLP, no biases,
        no RoPE scaling); bookkeeping keys are accepted and ignored; anything else is an error, so a
        config we do not understand never loads into a model that silently computes something else.
        """
        path = Path(path)
        hf = read_json_object(path, "config file")
        out = {}
        for key, value in hf.items():
            if key in HF_TO_OURS:
                out[HF_TO_OURS[key]] = value
            elif key in HF_REQUIRED_VALUES:
                allowed = HF_REQUIRED_VALUES[key]
                if value not in allowed:
                    raise ValueError(
                        f"{path}: config key {key!r} = {value!r} is not supported; expected one of {allowed}"
                    )
            elif key not in HF_IGNORED:
                raise ValueError(f"{path}: unknown config key {key!r} for a LlamaForCausalLM config")
        if "head_dim" in hf and hf["head_dim"] is not None and hf["head_dim"] != hf["hidden_size"] // hf[
            "num_attention_heads"
        ]:
            raise ValueError(f"{path}: head_dim={hf['head_dim']} != hidden_size / num_attention_heads")
        for required in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            if required not in hf:
                raise ValueError(f"{path}: missing required config key {required!r}")
        try:
            return cls(**out)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None

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


HF_TO_OURS = {
    "hidden_size": "dim",
    "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads",
    "num_key_value_heads": "n_kv_heads",
    "intermediate_size": "hidden_dim",
    "vocab_size": "vocab_size",
    "max_position_embeddings": "max_seq_len",
    "rms_norm_eps": "norm_eps",
    "rope_theta": "rope_theta",
    "tie_word_embeddings": "tie_embeddings",
}
# keys whose value changes the computation: only these values are implemented here
HF_REQUIRED_VALUES = {
    "hidden_act": ("silu",),
    "model_type": ("llama",),
    "architectures": (["LlamaForCausalLM"],),
    "rope_scaling": (None,),
    "attention_bias": (False,),
    "mlp_bias": (False,),
    "attention_dropout": (0.0, 0),
    "pretraining_tp": (1,),
}
# bookkeeping keys with no effect on the forward pass
HF_IGNORED = {
    "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "torch_dtype", "dtype",
    "transformers_version", "use_cache", "head_dim", "_name_or_path", "return_dict", "output_attentions",
    "output_hidden_states", "tokenizer_class",
}

# presets: v1 and v2 of OpenLLaMA share shapes (they differ in training data and tokenizer)
PRESETS: dict[str, dict] = {
    # from-scratch sizes
    "tiny": dict(),  # the ModelConfig defaults above: what `python train.py` trains
    "small-125m": dict(dim=768, n_layers=12, n_heads=12, hidden_dim=2048, vocab_size=32000, max_seq_len=1024),
    "1b": dict(dim=2048, n_layers=18, n_heads=16, n_kv_heads=8, hidden_dim=5632, vocab_size=32000,
               max_seq_len=2048),
    # OpenLLaMA (https://github.com/openlm-research/open_llama)
    "openllama-3b": dict(dim=3200, n_layers=26, n_heads=32, hidden_dim=8640, vocab_size=32000, max_seq_len=2048),
    "openllama-7b": dict(dim=4096, n_layers=32, n_heads=32, hidden_dim=11008, vocab_size=32000, max_seq_len=2048),
    "openllama-13b": dict(dim=5120, n_layers=40, n_heads=40, hidden_dim=13824, vocab_size=32000,
                          max_seq_len=2048),
}
