"""TrainConfig: every number a training run depends on, as nested dataclasses with strict overrides.

    defaults (the dataclasses below: a tiny model on the Python stdlib, trains on a 2-core CPU)
      <- configs/*.toml          (only overrides; [model], [data], [optim], [schedule], ... tables)
      <- command line            (--optim.weight_decay 0.05, --schedule.max_lr=1e-3, --batch_size 8)

Later layers win. An unknown key or a value of the wrong type is an error naming the key and where
it came from (the TOML file, or "command line"), raised before anything is built. nanoGPT's
configurator `exec`s a Python file for this; we keep its rules (unknown key -> error, type checked)
without the exec.

The resolved config is written beside the checkpoint as train_config.json, so a run can be
reproduced from its output folder alone (`python train.py out/tiny/train_config.json`, JSON or TOML
both load).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minillm.config import ModelConfig
from minillm.finetune.adapters import DEFAULT_TARGETS
from minillm.training.schedulers import ScheduleConfig
from minillm.util.fileio import atomic_write_bytes, read_json_object, read_toml
from minillm.util.strict import check_value, field_types


@dataclass
class DataConfig:
    # "stdlib" (the embedded default), a text file, a directory, or a .jsonl file; with format
    # "instruct": "stdlib" (the embedded instruction set) or a .json/.jsonl of examples
    corpus: str = "stdlib"
    # "pretrain": token stream windows; "instruct": prompt/response examples; "preference":
    # prompt/chosen/rejected pairs (minillm/data/preference.py; corpus "stdlib": the embedded set)
    format: str = "pretrain"
    # train.bin / val.bin / meta.json (+ tokenizer.model) land here
    cache_dir: str = "data_cache/stdlib"
    # an existing tokenizer.model; "" trains one (model.vocab_size) on the corpus
    tokenizer: str = ""
    tokenizer_max_chars: int = 4_000_000  # characters of corpus the tokenizer is trained on
    val_frac: float = 0.05  # last fraction of the token stream kept for validation
    seed: int = 1337  # document shuffle (split) and tokenizer sample seed
    num_workers: int = 2  # tokenizer processes (0 or 1: tokenize in this process)

    # instruct only (data.corpus is then a .json/.jsonl of examples, see minillm/data/instruct.py)
    # alpaca | sharegpt | completion | auto (detected from the first record)
    instruct_format: str = "auto"
    # prompt template name from minillm/data/templates.py; "" picks the format's default
    template: str = ""
    packing: bool = False  # several examples per row with a block-diagonal attention mask
    train_on_inputs: bool = False  # also train on the prompt tokens (default: response tokens only)
    # only the records whose "kind" field is one of these, in train and held-out alike (the stdlib
    # set's: describe, signature, module); empty: every record
    kinds: list[str] = field(default_factory=list)

    def __post_init__(self):
        _choice("data.format", self.format, ("pretrain", "instruct", "preference"))
        _choice("data.instruct_format", self.instruct_format,
                ("auto", "alpaca", "sharegpt", "completion"))
        _check("data.tokenizer_max_chars", self.tokenizer_max_chars, self.tokenizer_max_chars >= 1,
               ">= 1")
        _check("data.val_frac", self.val_frac, 0 < self.val_frac < 1, "in (0, 1)")
        _check("data.num_workers", self.num_workers, self.num_workers >= 0, ">= 0")


@dataclass
class OptimConfig:
    # "adamw", "adamw8bit" (its moments in 8 bits: minillm/training/adamw8bit.py), "muon": Muon on
    # the blocks' matrices, AdamW on the rest (minillm/training/muon.py); "auto": muon when
    # pretraining from scratch (the main job), adamw when fine-tuning (Muon's orthogonalized step
    # is made for whole hidden matrices, not LoRA's low-rank factors)
    name: str = "auto"
    weight_decay: float = 0.1  # AdamW decay, applied to >= 2-D tensors only (not norms)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # clip the global grad norm to this; 0 disables clipping

    def __post_init__(self):
        _check("optim.name", self.name, self.name in ("auto", "adamw", "adamw8bit", "muon"),
               '"auto", "adamw", "adamw8bit" or "muon"')
        _check("optim.weight_decay", self.weight_decay, self.weight_decay >= 0,
               ">= 0 (0: no decay)")
        for key, beta in (("optim.beta1", self.beta1), ("optim.beta2", self.beta2)):
            _check(key, beta, 0 <= beta < 1, "in [0, 1) (an Adam moment's decay rate)")
        _check("optim.eps", self.eps, self.eps > 0, "> 0 (it keeps Adam's division finite)")
        _check("optim.grad_clip", self.grad_clip, self.grad_clip >= 0, ">= 0 (0: no clipping)")


@dataclass
class FinetuneConfig:
    # full | lora | qlora | lora8 (adapters: minillm/finetune/adapters.py; the frozen base in
    # NF4 for qlora, in LLM.int8 for lora8, alpaca-lora's load_in_8bit recipe)
    method: str = "full"
    lora_r: int = 8  # adapter rank
    lora_alpha: float = 16.0  # scale alpha / r on the adapter output
    lora_dropout: float = 0.0
    # modules to wrap
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    # qlora: store the NF4 scales in 8 bits too (4.127 bits/weight, not 4.5)
    double_quant: bool = False
    # lora8: input columns holding any |x| >= this go through 16 bits (LLM.int8's outlier
    # threshold: transformers' llm_int8_threshold; 0 sends every column through int8)
    int8_threshold: float = 6.0
    use_rslora: bool = False  # rsLoRA: scale the adapter by alpha / sqrt(r) instead of alpha / r
    # DoRA: a learned magnitude per output row (with lora, lora8, or qlora: QDoRA)
    use_dora: bool = False
    # trained in full beside the adapters (PEFT's name), e.g. ["embed_tokens", "lm_head"]; saved
    # whole in the adapter
    modules_to_save: list[str] = field(default_factory=list)
    # pieces added to the tokenizer, e.g. ["<|im_start|>", "<|im_end|>"]; embed_tokens / lm_head
    # grow by as many rows (the mean of the old rows; new_tokens.py)
    new_tokens: list[str] = field(default_factory=list)

    def __post_init__(self):
        _choice("finetune.method", self.method, ("full", "lora", "qlora", "lora8"))
        _check("finetune.int8_threshold", self.int8_threshold,
               0 <= self.int8_threshold < float("inf"), ">= 0 and finite (0: no outlier columns)")
        adapters = self.method != "full"
        _check("finetune.use_dora", self.use_dora, adapters or not self.use_dora,
               "false with method 'full'")
        _check("finetune.modules_to_save", self.modules_to_save,
               (set(self.modules_to_save) <= {"embed_tokens", "lm_head"}
                and (adapters or not self.modules_to_save)),
               "a subset of ['embed_tokens', 'lm_head'], with an adapter method "
               "(full trains everything)")
        _check("finetune.modules_to_save", self.modules_to_save,
               (not (adapters and self.new_tokens)
                or set(self.modules_to_save) == {"embed_tokens", "lm_head"}),
               "['embed_tokens', 'lm_head'] when new_tokens are added with adapters "
               "(their rows must train)")
        _check("finetune.lora_r", self.lora_r, self.lora_r >= 1, ">= 1")
        _check("finetune.lora_alpha", self.lora_alpha, self.lora_alpha > 0,
               "> 0 (the adapter scale is alpha / r)")
        _check("finetune.lora_dropout", self.lora_dropout, 0 <= self.lora_dropout < 1, "in [0, 1)")


@dataclass
class PreferenceConfig:
    # data.format = "preference" only (minillm/training/preference.py, preference_loss.py):
    # dpo | ipo | hinge (the reference: the base with adapters off, or a frozen copy) | simpo |
    # orpo (reference-free) | reward (a Bradley-Terry reward model: a scalar head, no reference)
    loss: str = "dpo"
    # β: DPO's KL strength (TRL's beta), IPO's τ, SimPO's reward scale, ORPO's λ
    beta: float = 0.1
    label_smoothing: float = 0.0  # dpo (cDPO) and simpo: the probability a label is flipped
    simpo_gamma: float = 0.5  # simpo: the target reward margin γ (TRL's simpo_gamma)
    # a prompt longer than this many ids keeps its end (0: no limit)
    max_prompt_length: int = 0
    # ids per sequence, prompt + response: the response keeps its start (0: block_size + 1)
    max_length: int = 0
    # full fine-tuning: reference log-probs computed once into data.cache_dir (no frozen copy
    # in memory), reused on resume
    precompute_ref: bool = False

    def __post_init__(self):
        _choice("preference.loss", self.loss, ("dpo", "ipo", "hinge", "simpo", "orpo", "reward"))
        _check("preference.beta", self.beta, self.beta > 0, "> 0")
        _check("preference.label_smoothing", self.label_smoothing,
               0 <= self.label_smoothing < 0.5, "in [0, 0.5)")
        _check("preference.simpo_gamma", self.simpo_gamma, self.simpo_gamma >= 0, ">= 0")
        _check("preference.max_prompt_length", self.max_prompt_length,
               self.max_prompt_length >= 0, ">= 0 (0: no limit)")
        _check("preference.max_length", self.max_length, self.max_length == 0
               or self.max_length >= 2, ">= 2 ids (0: block_size + 1)")


@dataclass
class EvalConfig:
    interval: int = 200  # evaluate every this many steps (and at the end); 0 only at the end
    iters: int = 10  # val batches averaged per evaluation (a fixed set: same windows every time)
    sample_tokens: int = 64  # tokens of text sampled after each eval; 0 disables sampling
    sample_prompt: str = "def __init__(self"  # prompt for that sample
    temperature: float = 0.8
    top_k: int = 50

    def __post_init__(self):
        _check("eval.interval", self.interval, self.interval >= 0, ">= 0 (0: only at the end)")
        # eval always runs at the end, and 0 batches would average to a NaN val loss
        _check("eval.iters", self.iters, self.iters >= 1, ">= 1")
        _check("eval.sample_tokens", self.sample_tokens, self.sample_tokens >= 0,
               ">= 0 (0: no sample)")
        _check("eval.temperature", self.temperature, self.temperature >= 0, ">= 0 (0: greedy)")
        _check("eval.top_k", self.top_k, self.top_k >= 0, ">= 0")


@dataclass
class LogConfig:
    interval: int = 10  # tensorboard scalars every this many steps
    tensorboard: bool = True  # write out_dir/tb (view with `tensorboard --logdir out`)
    progress_bar: bool = True  # the tqdm bar (loss, tokens/s)
    # accelerator peak for MFU; 0: 989e12 (H100 bf16 dense) on CUDA, no MFU on CPU
    peak_flops: float = 0.0

    def __post_init__(self):
        _check("log.interval", self.interval, self.interval >= 1, ">= 1")
        _check("log.peak_flops", self.peak_flops, self.peak_flops >= 0, ">= 0 (0: the default)")


@dataclass
class CheckpointConfig:
    interval: int = 200  # save every this many steps (and at the end); 0 only at the end
    # also write model.safetensors + minillm_config.json + tokenizer.model to out_dir
    export: bool = True

    def __post_init__(self):
        _check("checkpoint.interval", self.interval, self.interval >= 0,
               ">= 0 (0: only at the end)")


@dataclass
class TrainConfig:
    # ckpt.pt, train_config.json, the inference export, tb/: a new or empty directory, or one of
    # minillm's own runs (anything else is refused: util/fileio.py's ownership rule)
    out_dir: str = "out/tiny"
    # "scratch", or a checkpoint directory (HF/OpenLLaMA or minillm) to start from
    init_from: str = "scratch"
    seed: int = 1337  # model init and the data sampler
    device: str = "auto"  # auto | cpu | cuda | cuda:N  (under torchrun: cuda:LOCAL_RANK)
    # auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16 | float16 (GradScaler)
    dtype: str = "auto"
    # torch threads on CPU (0: torch's default, every core). On a machine shared with other busy
    # processes, 1 avoids OpenMP spin-wait stalls (measured 2-40x slower steps when overloaded)
    cpu_threads: int = 0
    compile: bool = False  # torch.compile the model
    # recompute each block in backward: less memory, ~33% more compute
    activation_checkpointing: bool = False
    # "ddp": every rank holds the whole model; "fsdp": FSDP2 shards the model, its gradients and
    # AdamW's state over the ranks, checkpoints in out_dir/ckpt/ (training/distributed.py)
    distributed: str = "ddp"
    # fsdp on GPUs: keep the shards and AdamW's state in host memory (and step AdamW there)
    cpu_offload: bool = False
    # sequences per micro-step, summed over all ranks (each rank takes batch_size / W)
    batch_size: int = 16
    block_size: int = 128  # tokens per sequence (<= model.max_seq_len)
    grad_accum_steps: int = 1  # micro-steps per optimizer step; tokens/step = batch*block*accum
    # stop after this step count (0: schedule.total_steps); the schedule is unchanged
    max_steps: int = 0
    # the architecture when init_from = "scratch" (a pretrained init_from brings its own). The
    # default is the "tiny" preset, 1.33M parameters (0.5M of them the 4096-row embedding, tied to
    # lm_head): about 5 minutes for 1000 steps on 2 cores
    model: ModelConfig = field(default_factory=lambda: ModelConfig.from_name("tiny"))
    data: DataConfig = field(default_factory=DataConfig)
    # "auto": the main job trains with Muon (0.21 nats lower whole-val loss than AdamW in the same
    # 1000 steps), a fine-tuning run with AdamW
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(
        # warmup-stable-decay: 30 steps up, flat at 6e-3, then down to 0 over the last 40%
        # (whole-val loss 3.381; cosine from 6e-3 to 6e-4: 3.443)
        default_factory=lambda: ScheduleConfig(
            name="wsd", max_lr=6e-3, min_lr=0.0, warmup_steps=30, total_steps=1000, decay_frac=0.4
        )
    )
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self):
        _choice("dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        _check("device", self.device,
               re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device) is not None,
               "auto, cpu, cuda, cuda:N or mps")
        _check("cpu_threads", self.cpu_threads, self.cpu_threads >= 0, ">= 0 (0: torch's default)")
        _choice("distributed", self.distributed, ("ddp", "fsdp"))
        fsdp = self.distributed == "fsdp"
        _check("cpu_offload", self.cpu_offload, fsdp or not self.cpu_offload,
               "false unless distributed = 'fsdp'")
        # QLoRA's NF4 base and lora8's int8 base are packed buffers, not parameters: FSDP2 would
        # keep them whole on every rank; fp16's GradScaler would check only this rank's shards
        _check("finetune.method", self.finetune.method,
               not fsdp or self.finetune.method not in ("qlora", "lora8"),
               "'full' or 'lora' with distributed = 'fsdp' (FSDP2 shards parameters, and a "
               "quantized base is packed buffers; use qlora or lora8 with ddp)")
        _check("dtype", self.dtype, not fsdp or self.dtype != "float16",
               "auto, float32 or bfloat16 with distributed = 'fsdp' (fp16 loss scaling would "
               "check each rank's shards alone for overflow)")
        self._check_preference()
        for name in ("batch_size", "block_size", "grad_accum_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, found {getattr(self, name)}")
        if self.block_size > self.model.max_seq_len:
            raise ValueError(
                f"TrainConfig: block_size={self.block_size} exceeds "
                f"model.max_seq_len={self.model.max_seq_len}"
            )
        if self.max_steps < 0:
            raise ValueError(f"TrainConfig.max_steps must be >= 0, found {self.max_steps}")

    def _check_preference(self):
        p, method = self.preference, self.finetune.method
        if self.data.format != "preference":
            return
        _check("init_from", self.init_from, self.init_from != "scratch",
               "a checkpoint directory with data.format = 'preference' (preference tuning "
               "starts from a trained model)")
        _check("data.packing", self.data.packing, not self.data.packing,
               "false with data.format = 'preference' (each response needs its own log-prob)")
        _check("preference.max_length", p.max_length, p.max_length <= self.block_size + 1,
               f"<= block_size + 1 = {self.block_size + 1} ids (block_size positions)")
        reference = p.loss in ("dpo", "ipo", "hinge")
        _check("preference.precompute_ref", p.precompute_ref,
               not p.precompute_ref or reference, "false with a reference-free loss")
        _check("finetune.modules_to_save", self.finetune.modules_to_save,
               not (reference and self.finetune.modules_to_save and not p.precompute_ref),
               "empty, or preference.precompute_ref = true (switching the adapters off would "
               "leave the fully trained modules in the reference)")
        _check("preference.precompute_ref", p.precompute_ref,
               not (reference and method == "full" and self.distributed == "fsdp")
               or p.precompute_ref, "true for full fine-tuning under FSDP (no frozen copy)")

    @property
    def optimizer(self) -> str:
        """optim.name with "auto" resolved: muon from scratch, adamw for every fine-tuning run."""
        if self.optim.name != "auto":
            return self.optim.name
        return "muon" if self.init_from == "scratch" else "adamw"

    @property
    def num_steps(self) -> int:
        return self.max_steps or self.schedule.total_steps


# fields that may differ between a run and its --resume (they do not change what is computed)
RESUMABLE_CHANGES = ("max_steps", "cpu_threads", "compile", "eval", "log", "checkpoint",
                     "data.num_workers", "device", "out_dir")  # out_dir: a moved run resumes


def _choice(key: str, value: str, allowed: tuple[str, ...]):
    if value not in allowed:
        raise ValueError(f"{key} must be one of {allowed}, found {value!r}")


def _check(key: str, value, ok: bool, expected: str):
    """Raise unless `ok`. NaN fails every comparison, so `ok` is False for it and it is refused
    too."""
    if not ok:
        raise ValueError(f"{key} must be {expected}, found {value!r}")


# --------------------------------------------------------------------------------------------------
# strict overrides: a flat {"section.key": value} applied to a config, each key and type checked


def apply_overrides(cfg, flat: dict[str, Any], source: str):
    """A new config with each dotted key set; unknown keys, sections set to scalars and wrong
    types raise."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        node, obj, parts = nested, cfg, key.split(".")
        for i, part in enumerate(parts):
            if (not dataclasses.is_dataclass(obj)
                    or part not in {f.name for f in dataclasses.fields(obj)}):
                where = ".".join(parts[:i]) or type(cfg).__name__
                is_section = dataclasses.is_dataclass(obj)
                known = sorted(f.name for f in dataclasses.fields(obj)) if is_section else []
                raise KeyError(f"{source}: unknown config key {key!r} "
                               f"({part!r} is not a field of {where}; expected one of {known})")
            tp = field_types(type(obj))[part]
            obj = getattr(obj, part)
            if i == len(parts) - 1:
                if dataclasses.is_dataclass(obj):
                    raise TypeError(f"{source}: {key} is a section ([{key}] in TOML), "
                                    f"found value {value!r}")
                node[part] = check_value(key, value, tp, source)
            else:
                node = node.setdefault(part, {})
    return _replace(cfg, nested, source)


def _replace(obj, nested: dict, source: str):
    changes = {k: (_replace(getattr(obj, k), v, source) if isinstance(v, dict) else v)
               for k, v in nested.items()}
    if isinstance(obj, ModelConfig) and "n_heads" in changes and "n_kv_heads" not in changes \
            and obj.n_kv_heads == obj.n_heads:
        # plain multi-head stays plain: None resolves to the new n_heads
        changes["n_kv_heads"] = None
    if isinstance(obj, ModelConfig) and {"dim", "n_heads"} & set(changes) \
            and "head_dim" not in changes and obj.head_dim == obj.dim // obj.n_heads:
        changes["head_dim"] = None  # a derived head width follows the new dim / n_heads
    try:
        # re-runs __post_init__: cross-field checks apply
        return dataclasses.replace(obj, **changes)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{source}: {e}") from None


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1}} -> {"optim.lr": 1}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_config(path: str | Path | None = None,
                overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults <- the TOML (or saved JSON) file at `path` <- `overrides` (dotted keys,
    "command line")."""
    cfg = TrainConfig()
    if path is not None:
        path = Path(path)  # the readers name a missing file, a directory, a device
        d = (read_json_object(path, "config file") if path.suffix == ".json"
             else read_toml(path, "config file"))
        cfg = apply_overrides(cfg, flatten(d), str(path))
    if overrides:
        cfg = apply_overrides(cfg, overrides, "command line")
    return cfg


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: TrainConfig, path: str | Path):
    atomic_write_bytes(path, (json.dumps(to_dict(cfg), indent=2) + "\n").encode())


def resume_mismatches(saved: dict, now: TrainConfig) -> list[str]:
    """Keys whose value differs between a checkpoint's config and this run's, other than
    RESUMABLE_CHANGES."""
    old, new = flatten(saved), flatten(to_dict(now))
    # a key the checkpoint lacks was added to TrainConfig after it was written: it ran the default
    old = {**flatten(to_dict(TrainConfig())), **old}
    keys = sorted(set(old) | set(new))
    allowed = lambda k: any(k == a or k.startswith(a + ".") for a in RESUMABLE_CHANGES)
    return [f"{k}: checkpoint {old.get(k)!r}, now {new.get(k)!r}" for k in keys
            if not allowed(k) and old.get(k) != new.get(k)]


# --------------------------------------------------------------------------------------------------
# the command line: one --section.key flag per field, generated from the dataclasses


def _parse_value(tp: Any, key: str):
    """An argparse `type=` for field type tp: "true"/"false" for bools, "none" for optionals,
    commas for lists."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def parse(s: str):
        if origin in (typing.Union, types.UnionType):
            if s.lower() == "none":
                return None
            (inner,) = [a for a in args if a is not type(None)]
            return _parse_value(inner, key)(s)
        if origin is list:
            return [x for x in s.split(",") if x]
        if tp is bool:
            if s.lower() not in ("true", "false", "1", "0"):
                raise argparse.ArgumentTypeError(f"--{key} expects true or false, found {s!r}")
            return s.lower() in ("true", "1")
        try:
            return tp(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--{key} expects {tp.__name__}, "
                                             f"found {s!r}") from None

    return parse


def add_config_flags(parser: argparse.ArgumentParser, cfg: TrainConfig | None = None):
    """One flag per leaf field (--out_dir, --optim.weight_decay, --schedule.max_lr, ...); dest is
    the dotted key, default SUPPRESS so only flags actually given become overrides."""
    cfg = cfg or TrainConfig()

    def walk(obj, prefix):
        for f in dataclasses.fields(obj):
            value, tp, key = getattr(obj, f.name), field_types(type(obj))[f.name], prefix + f.name
            if dataclasses.is_dataclass(value):
                walk(value, key + ".")
                continue
            metavar = {int: "INT", float: "FLOAT", bool: "BOOL", str: "STR"}.get(tp, "VALUE")
            parser.add_argument(f"--{key}", dest=key, type=_parse_value(tp, key),
                                default=argparse.SUPPRESS, metavar=metavar,
                                help=f"override {key} (default: {value!r})")

    walk(cfg, "")
