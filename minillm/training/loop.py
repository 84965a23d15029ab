"""The training loop: `train(cfg)` reads top to bottom, nanoGPT style, between `# ----` banners.

    prepare_data (TokenStream | InstructExamples) -> build_model (full / LoRA / QLoRA) -> AdamW
      -> [resume_state] -> compile / DDP
      -> for each step: lr = get_lr(step) ; k micro-batches ; forward/backward ; clip ; step
                        ; Logger.step ; eval + Logger.eval (sample)
                        ; write_outputs (checkpoint, export)

The pieces it needs sit above it, each small enough to test directly: the optimizer, the
token-normalised gradient accumulation, the eval loop, the two data sources behind one interface,
the model builder and the writer of a checkpoint step's outputs. Checkpoints with every RNG state
are in training/checkpoint.py, the logger (bar, tensorboard, MFU, samples) in training/log.py.

Gradient accumulation is normalised by target tokens, not by micro-batches: the loss of a step is
    L = (sum over all micro-batches and ranks of the token cross-entropies)
        / (number of non-ignored targets)
so k micro-batches give exactly the gradient of one batch k times larger, even when micro-batches
hold different numbers of -100 targets (padded instruction data). Averaging per-micro-batch means
would weight a token in a short micro-batch more than one in a long one.

Exact resume: the batch of a step is a pure function of the data generator's state (data.get_batch),
the lr is a pure function of the step (schedulers.py), eval and sampling draw from their own
generators, and the checkpoint holds model, optimizer, GradScaler, step and every RNG state. So on
CPU a run stopped at step k and resumed logs bit-identical losses to the uninterrupted run.

Fine-tuning uses the same loop: `init_from` names a checkpoint directory (HF/OpenLLaMA or minillm),
`finetune.method` = full | lora | qlora | lora8 (lora.py wraps the target projections of a frozen
base, held in NF4 for qlora, in LLM.int8 for lora8), and `data.format = "instruct"` draws padded or
packed prompt/response batches whose prompt targets are -100 (instruct.py). With adapters the
checkpoint holds only the trained tensors (the base is reloaded from init_from on resume), and the
export is both the PEFT adapter (out_dir/adapter) and a plain model with the adapters folded in, so
generate.py needs no LoRA support.

Multi-GPU: launched by `torchrun --nproc_per_node W train.py ...`, each rank draws the same global
batch offsets and keeps its 1/W slice, DDP averages gradients (we pre-multiply by W so the average
is the token-normalised sum above). gloo on CPU, nccl on CUDA. With `distributed = "fsdp"` the
model, its gradients and AdamW's state are sharded over the ranks instead (FSDP2), the checkpoint
is out_dir/ckpt/, one shard per rank, and the same loop runs over it (training/distributed.py).
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from minillm.config import ModelConfig
from minillm.data.chat_template import JinjaTemplate, model_template
from minillm.data.instruct import (
    Example,
    get_instruct_batch,
    iter_batches,
    load_instruct_data,
    prompt_text,
)
from minillm.data.preference import build_stdlib_preferences, load_preference_data
from minillm.data.pretrain import (
    CACHE_FILES,
    get_batch,
    prepare_dataset,
    read_corpus,
    train_corpus_tokenizer,
    unigram_entropy,
)
from minillm.data.templates import (
    TEMPLATE_RECORD,
    read_template_record,
    trained_template,
    write_template_record,
)
from minillm.finetune.adapters import apply_lora, mark_only_lora_trainable
from minillm.finetune.int8_linear import int8_hook
from minillm.finetune.new_tokens import resize_vocab
from minillm.finetune.nf4_linear import nf4_hook
from minillm.finetune.peft_io import save_adapter
from minillm.formats.known_models import base_model_name, resolve_checkpoint
from minillm.formats.load import load_pretrained, load_tokenizer, model_width, open_tokenizer
from minillm.formats.native import save_model
from minillm.model import Llama
from minillm.tokenizer.sentencepiece import Tokenizer
from minillm.training.adamw8bit import AdamW8bit
from minillm.training.checkpoint import (
    load_checkpoint,
    load_trainable_state,
    plain_llama,
    save_checkpoint,
    set_rng_states,
)
from minillm.training.config import TrainConfig, resume_mismatches, save_config
from minillm.training.distributed import (
    CKPT_DIR,
    check_fsdp_device,
    gather_full_state,
    load_sharded_checkpoint,
    materialize,
    read_train_state,
    save_sharded_checkpoint,
    setup_distributed,
    shard_model,
)
from minillm.training.flops import estimate
from minillm.training.log import Logger
from minillm.training.loss import held_out_loss, token_loss_sum
from minillm.training.muon import muon_adamw
from minillm.training.preference import PreferencePairs, add_reward_head
from minillm.training.schedulers import get_lr
from minillm.util.device import check_fits, pick_device, pick_dtype
from minillm.util.fileio import (
    atomic_write_bytes,
    claim_directory,
    lock_directory,
    remove_stale_temp_files,
)

# --------------------------------------------------------------------------------------------------
# optimizer


def configure_optimizer(model: torch.nn.Module, weight_decay: float, lr: float,
                        betas: tuple[float, float], eps: float, fused: bool,
                        name: str = "adamw") -> torch.optim.Optimizer:
    """AdamW with decay on >= 2-D tensors (matmul weights, embeddings) and none on 1-D (RMSNorm
    gains): decaying a norm gain pulls it toward 0, which only fights the normalisation. name
    "muon": the same groups, with Muon's orthogonalized updates for the blocks' matrices
    (minillm/training/muon.py); "adamw8bit": AdamW with its moments in 8 bits
    (minillm/training/adamw8bit.py)."""
    if name == "muon":
        return muon_adamw(model, weight_decay, lr, betas, eps)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [dict(params=decay, weight_decay=weight_decay),
              dict(params=no_decay, weight_decay=0.0)]
    if name == "adamw8bit":  # embeddings keep float32 moments (adamw8bit.py says why)
        embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
        groups = [dict(g, params=[p for p in g["params"] if id(p) not in embeddings])
                  for g in groups]
        groups.append(dict(params=[p for p in decay if id(p) in embeddings],
                           weight_decay=weight_decay, eight_bit=False))
        return AdamW8bit([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


# --------------------------------------------------------------------------------------------------
# loss and gradient accumulation


def forward_backward(model, batches, n_targets: int, world_size: int = 1, autocast=nullcontext,
                     scaler: torch.amp.GradScaler | None = None, loss_sum=None) -> torch.Tensor:
    """Accumulate into .grad the gradient of  sum(token losses of all ranks' batches) / n_targets.

    batches: this rank's micro-batches [(x, y) or (x, y, attn_mask)]; n_targets: the non-ignored
    targets of every micro-batch on every rank. Each rank scales by world_size because DDP averages
    over ranks. Returns this rank's summed token loss (detached), for logging. loss_sum(model,
    batch) replaces the token loss sum (preference pairs: the sum of per-pair losses, n_targets
    the step's pair count).
    """
    loss_sum = loss_sum or (lambda m, batch: token_loss_sum(m, *batch))
    total = torch.zeros((), device=batches[0][0].device)
    for i, batch in enumerate(batches):
        # DDP all-reduces in backward; only the last micro-batch needs to (the grads keep summing
        # locally)
        sync = (nullcontext() if not isinstance(model, DDP) or i == len(batches) - 1
                else model.no_sync())
        with sync:
            with autocast():
                summed = loss_sum(model, batch)
            loss = summed * (world_size / n_targets)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total += summed.detach()
    return total


# --------------------------------------------------------------------------------------------------
# evaluation and sampling


def estimate_loss(model, data, batch_size: int, block_size: int, iters: int, seed: int,
                  autocast=nullcontext, rank: int = 0, world_size: int = 1) -> float:
    """Mean token cross-entropy over `iters` random windows of `data`, drawn from a generator seeded
    with `seed` (the same windows at every evaluation, so val losses are comparable)."""
    g = torch.Generator().manual_seed(seed)
    batches = (get_batch(data, batch_size, block_size, g, rank, world_size) for _ in range(iters))
    return held_out_loss(model, batches, autocast, world_size)["loss"]


def estimate_instruct_loss(model, examples, batch_size: int, iters: int, pad_id: int,
                           autocast=nullcontext, rank: int = 0, world_size: int = 1) -> float:
    """Mean token cross-entropy over the first `iters` batches of the held-out examples, in file
    order (response tokens only, as in training); batch i is evaluated by rank i % world_size.
    Every rank runs as many forwards (a sharded model's forward is a collective): a rank one batch
    short repeats a batch with every target -100, which adds nothing to the sum or the count."""
    first = list(itertools.islice(iter_batches(examples, batch_size, pad_id), iters))
    batches = first[rank::world_size]
    short = -(-len(first) // world_size) - len(batches)
    batches += [(x, torch.full_like(y, -100)) for x, y in first[:short]]
    return held_out_loss(model, batches, autocast, world_size)["loss"]


# --------------------------------------------------------------------------------------------------
# data: pretraining and instruction tuning reach the loop through one small interface
#
#   data.tokenizer                          what both splits were encoded with
#   data.draw(generator, rank, world_size)  this rank's slice of one global micro-batch, (x, y) or
#                                           (x, y, attn_mask): a pure function of the generator
#   data.val_loss(model, autocast, rank, world_size)
#                                           token-mean val loss, over the same batches every time
#   data.prompt(text)                       a sample prompt, asked the way the examples were
#   data.baseline, data.describe()          for the printed summary
#   data.count(batch)                       [targets, tokens, …]: the step's denominators
#   data.loss_sum(model, batch, counts)     the summed loss of a batch (counts: the step's, over
#                                           every rank), divided by counts[0] for the step loss
#   data.step_metrics(n, world_size)        the step's extra metrics ({} but for preference pairs)
#   data.val_metrics                        the extra metrics of the last val_loss
# PreferencePairs (training/preference.py) is the third source.


class TokenLoss:
    """The token cross-entropy objective of pretraining and instruction tuning."""

    val_metrics: dict = {}

    def count(self, batch) -> list[int]:
        return [int((batch[1] != -100).sum()), batch[0].numel()]

    def loss_sum(self, model, batch, counts) -> torch.Tensor:
        return token_loss_sum(model, *batch)

    def step_metrics(self, n_targets: int, world_size: int) -> dict:
        return {}


@dataclass
class TokenStream(TokenLoss):
    """Pretraining: random (x, y) windows of the train / val token streams (np.memmap,
    data/pretrain.py)."""

    cfg: TrainConfig
    tokenizer: Tokenizer
    train: np.ndarray
    val: np.ndarray
    baseline: float = field(init=False)  # nats/token of a context-free model: the bar to beat

    def __post_init__(self):
        self.baseline = unigram_entropy(self.train)

    def draw(self, generator: torch.Generator, rank: int, world_size: int):
        c = self.cfg
        # (B/W, T) x2
        return get_batch(self.train, c.batch_size, c.block_size, generator, rank, world_size)

    def val_loss(self, model, autocast, rank: int, world_size: int) -> float:
        c = self.cfg
        return estimate_loss(model, self.val, c.batch_size, c.block_size, c.eval.iters, c.seed,
                             autocast, rank, world_size)

    def prompt(self, text: str) -> str:
        return text

    def describe(self) -> str:
        return (f"{len(self.train):,} train / {len(self.val):,} val tokens | "
                f"unigram baseline {self.baseline:.3f} nats/token")


@dataclass
class InstructExamples(TokenLoss):
    """Instruction tuning: tokenized prompt/response examples (instruct.py) whose prompt targets are
    -100, padded per batch, or packed several to a row with a block-diagonal attention mask."""

    cfg: TrainConfig
    tokenizer: Tokenizer
    train: list
    val: list
    baseline: float = float("nan")  # no token stream to count a unigram baseline on
    # what the examples were tokenized with: a templates.py name, a model's own Jinja chat
    # template, or None (the format's default)
    template: object = None

    def draw(self, generator: torch.Generator, rank: int, world_size: int):
        c = self.cfg
        # (B/W, T) x2, mask (B/W, 1, T, T) or None
        x, y, mask = get_instruct_batch(self.train, c.batch_size, generator, self.tokenizer.pad_id,
                                        c.data.packing, c.block_size, pad_to_max=c.compile,
                                        rank=rank, world_size=world_size)
        return (x, y) if mask is None else (x, y, mask)

    def val_loss(self, model, autocast, rank: int, world_size: int) -> float:
        c = self.cfg
        return estimate_instruct_loss(model, self.val, c.batch_size, c.eval.iters,
                                      self.tokenizer.pad_id, autocast, rank, world_size)

    def prompt(self, text: str) -> str:
        # asked as the training examples were: in their template (a model's own chat template too)
        return prompt_text(Example("alpaca", "eval.sample_prompt", instruction=text),
                           self.template)

    def describe(self) -> str:
        return f"{len(self.train):,} train / {len(self.val):,} val examples"


# --------------------------------------------------------------------------------------------------
# set-up pieces


def prepare_data(cfg: TrainConfig,
                 verbose: bool) -> TokenStream | InstructExamples | PreferencePairs:
    """The tokenizer and the train / val data: token streams (np.memmap) for pretraining, lists of
    tokenized examples for instruct. The tokenizer is data.tokenizer if set, else the init
    checkpoint's, else one trained on the corpus (pretraining from scratch)."""
    if cfg.data.tokenizer:
        tokenizer = open_tokenizer(cfg.data.tokenizer)
    elif cfg.init_from != "scratch":
        # the checkpoint's own: tokenizer.model or tokenizer.json beside it, or a GGUF's vocabulary
        tokenizer = load_tokenizer(resolve_checkpoint(cfg.init_from))
    else:
        tokenizer = None
    # appended as USER_DEFINED pieces; build_model grows the model to match
    if cfg.finetune.new_tokens:
        if tokenizer is None:
            raise ValueError("finetune.new_tokens extends a pretrained model's tokenizer: "
                             "set init_from")
        tokenizer = tokenizer.add_pieces(cfg.finetune.new_tokens,
                                         Path(cfg.out_dir) / tokenizer.file_name)
    if cfg.data.format == "preference":
        return prepare_preference_data(cfg, tokenizer, verbose)
    if cfg.data.format == "instruct":
        if tokenizer is None:
            raise ValueError("data.format='instruct' needs a tokenizer: "
                             "set init_from or data.tokenizer")
        paths, test_paths = cfg.data.corpus, None
        if cfg.data.corpus == "stdlib":  # the embedded instruction set, with its held-out split
            from minillm.data.stdlib_qa import build_stdlib_dataset

            ds = build_stdlib_dataset(Path(cfg.data.cache_dir))
            paths, test_paths = ds.train_path, ds.test_path
        # data.template, else the template the init checkpoint records (a minillm fine-tune) or
        # ships (a model's own chat template), else the format's default
        template = cfg.data.template or None
        if template is None and cfg.init_from != "scratch":
            init = resolve_checkpoint(cfg.init_from)
            template = read_template_record(init if init.is_dir() else None) or model_template(init)
        tokenized_with = template
        data = load_instruct_data(paths, tokenizer, template,
                                  cfg.data.instruct_format, cfg.block_size,
                                  cfg.data.train_on_inputs, cfg.data.val_frac,
                                  test_paths=test_paths, seed=cfg.data.seed,
                                  kinds=cfg.data.kinds)
        if not data.test:
            raise ValueError(f"{cfg.data.corpus}: data.val_frac={cfg.data.val_frac} leaves no "
                             f"example of {len(data.train)} for validation (a val loss would be "
                             f"NaN); raise data.val_frac")
        if verbose:
            print(data.summary())
            kinds = [e.example.kind for e in data.train]
            if isinstance(template, JinjaTemplate):  # the model's own: every chat example used it
                template = template if set(kinds) - {"completion"} else None
            else:
                template = trained_template(template or "", kinds)
            # export ships it as a chat template; generate.py --chat uses it
            if template is not None:
                write_template_record(cfg.out_dir, template)
        return InstructExamples(cfg, tokenizer, data.train, data.test, template=tokenized_with)
    corpus = read_corpus(cfg.data.corpus)
    cache_dir = claim_directory(cfg.data.cache_dir, "data cache", legacy=CACHE_FILES)
    if tokenizer is None:
        tokenizer = train_corpus_tokenizer(corpus, cache_dir / "tokenizer.model",
                                           cfg.model.vocab_size, cfg.data.tokenizer_max_chars,
                                           cfg.data.seed)
    data = prepare_dataset(corpus, tokenizer, cache_dir, cfg.data.val_frac, cfg.data.seed,
                           cfg.data.num_workers, verbose=verbose)
    return TokenStream(cfg, tokenizer, data.train, data.val)


def prepare_preference_data(cfg: TrainConfig, tokenizer: Tokenizer,
                            verbose: bool) -> PreferencePairs:
    """Preference pairs (data/preference.py): data.corpus files, or "stdlib", the embedded set
    with its held-out symbols."""
    paths, test_paths = cfg.data.corpus, None
    if cfg.data.corpus == "stdlib":
        paths, test_path = build_stdlib_preferences(cfg.data.cache_dir)
        test_paths = [test_path]
    data = load_preference_data(paths, tokenizer, cfg.data.template,
                                cfg.preference.max_length or cfg.block_size + 1,
                                cfg.preference.max_prompt_length, cfg.data.val_frac,
                                test_paths, cfg.data.seed, embedded=cfg.data.corpus == "stdlib")
    if not data.test:
        raise ValueError(f"{cfg.data.corpus}: data.val_frac={cfg.data.val_frac} leaves no pair "
                         f"of {len(data.train)} for validation; raise data.val_frac")
    if verbose:
        print(data.summary())
    return PreferencePairs(cfg, tokenizer, data)


def build_model(cfg: TrainConfig, device: torch.device, dtype: torch.dtype) -> Llama:
    """scratch: a fresh Llama(cfg.model); otherwise the init_from checkpoint. Full training keeps
    float32 weights (autocast runs the matmuls in `dtype`); LoRA freezes a base held in `dtype`,
    QLoRA one in NF4, lora8 one in LLM.int8, and wraps the finetune.lora_targets projections in
    trainable float32 adapters."""
    method = cfg.finetune.method
    if cfg.init_from == "scratch":
        if method != "full":
            raise ValueError(f"finetune.method={method!r} adapts a pretrained model: "
                             "set init_from to its checkpoint directory")
        return Llama(cfg.model).to(device)
    new_rows = len(cfg.finetune.new_tokens)  # pieces prepare_data appended to the tokenizer
    if method == "full":
        model = load_pretrained(resolve_checkpoint(cfg.init_from), dtype=torch.float32,
                                device=device).train()
        resize_vocab(model, model.config.vocab_size + new_rows)
        return add_head(model, cfg)
    hook = None  # lora: the base in `dtype`; qlora / lora8: quantized as it streams in
    if method == "qlora":
        hook = nf4_hook(double_quant=cfg.finetune.double_quant, compute_dtype=dtype, device=device)
    elif method == "lora8":
        hook = int8_hook(threshold=cfg.finetune.int8_threshold, compute_dtype=dtype, device=device)
    model = load_pretrained(resolve_checkpoint(cfg.init_from), dtype=dtype, device=device,
                            linear_hook=hook)
    resize_vocab(model, model.config.vocab_size + new_rows)  # new rows: the mean of the old ones
    add_adapters(model, cfg)
    return add_head(model, cfg).train()


def add_head(model: Llama, cfg: TrainConfig) -> Llama:
    """A reward model's scalar head `score` (training/preference.py), trained in float32."""
    if cfg.data.format == "preference" and cfg.preference.loss == "reward":
        add_reward_head(model)
    return model


def check_micro_batch_fits(cfg: TrainConfig, model_cfg, device, dtype, world_size: int):
    """Refuse a batch the machine cannot hold (training/flops.py's estimate of one micro-batch's
    activations, gradients and optimizer state, those two sharded 1/W under FSDP, which also
    gathers whole blocks), before the first step allocates it."""
    rows = 2 if cfg.data.format == "preference" else 1  # a pair is two sequences
    est = estimate(model_cfg, cfg.finetune.method, rows * cfg.batch_size // world_size,
                   cfg.block_size,
                   cfg.finetune.lora_r, tuple(cfg.finetune.lora_targets),
                   act_bytes=torch.empty(0, dtype=dtype).element_size(),
                   double_quant=cfg.finetune.double_quant)
    act = est.activations_checkpointed if cfg.activation_checkpointing else est.activations
    states = est.gradients + est.optimizer
    if cfg.distributed == "fsdp":
        states = -(-states // world_size) + est.fsdp_gathered
    check_fits(act + states, device,
               f"batch_size={cfg.batch_size} x block_size={cfg.block_size} (one micro-batch's "
               f"activations, the gradients and the optimizer state; `python3 run.py flops` "
               f"breaks it down)",
               "lower batch_size (raising grad_accum_steps keeps the tokens per step), block_size, "
               "or set activation_checkpointing = true")


def add_adapters(model: Llama, cfg: TrainConfig):
    """Wrap the finetune.lora_targets projections in adapters; only they (and
    finetune.modules_to_save) train."""
    f = cfg.finetune
    apply_lora(model, f.lora_targets, f.lora_r, f.lora_alpha, f.lora_dropout, f.use_rslora,
               f.use_dora)
    mark_only_lora_trainable(model, f.modules_to_save)


def model_skeleton(cfg: TrainConfig, config: ModelConfig, dtype: torch.dtype) -> Llama:
    """build_model's model without weights: the same modules, shapes and dtypes on the meta
    device (no memory), for `config` (the built model's: its vocabulary may have grown)."""
    with torch.device("meta"):
        model = Llama(config)
    if cfg.finetune.method != "full":
        add_adapters(model.to(dtype), cfg)
    return add_head(model, cfg)


def build_sharded_model(cfg: TrainConfig, device: torch.device, dtype: torch.dtype,
                        master: bool) -> Llama:
    """FSDP2: rank 0 builds the model on the CPU as one process would (the same weights, the same
    seed), and every rank keeps its shard of it (distributed.shard_model)."""
    check_fsdp_device(device, cfg.cpu_offload)
    full = build_model(cfg, torch.device("cpu"), dtype) if master else None
    adapters = cfg.finetune.method != "full"
    return shard_model(full, lambda config: model_skeleton(cfg, config, dtype), device, dtype,
                       cfg.compile, cfg.cpu_offload,
                       tuple(cfg.finetune.modules_to_save) if adapters else ())


def resume_state(path: Path, cfg: TrainConfig, model: Llama, optimizer, scaler,
                 data_generator) -> int:
    """Load ckpt.pt into a freshly built run (model, AdamW, GradScaler, every RNG); returns the step
    to run next. The config must match the checkpoint's except for RESUMABLE_CHANGES
    (training/config.py)."""
    ckpt = load_checkpoint(path)
    bad = resume_mismatches(ckpt["config"], cfg)
    if bad:
        raise ValueError(f"{path}: --resume with a different config:\n  " + "\n  ".join(bad))
    load_trainable_state(model, ckpt["model"], str(path))
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    set_rng_states(ckpt["rng"], data_generator)
    return ckpt["step"]


def write_outputs(out_dir: Path, model: Llama, optimizer, scaler, step: int, data_generator,
                  cfg: TrainConfig, val_loss: float | None, tokenizer: Tokenizer):
    """Everything a checkpoint step writes (rank 0): unless checkpoint.export is off, the export
    (export_model), then ckpt.pt to resume from.

    The order makes the pair consistent: every file is atomic, and ckpt.pt comes last, so after a
    kill at any moment model.safetensors (its metadata records the step) is never behind ckpt.pt;
    at worst it is one checkpoint ahead, and a resume recomputes those steps bit for bit."""
    if cfg.checkpoint.export:
        export_model(out_dir, model, cfg, tokenizer.path, step)
    save_checkpoint(out_dir / "ckpt.pt", model, optimizer, scaler, step, data_generator, cfg,
                    val_loss)


def write_sharded_outputs(out_dir: Path, model: Llama, optimizer, scaler, step: int,
                          data_generator, cfg: TrainConfig, dtype: torch.dtype,
                          val_loss: float | None, tokenizer: Tokenizer, last: bool):
    """What a checkpoint step writes under FSDP, from every rank: ckpt/ (one shard per rank), and
    after the last step the export, consolidated once: the shards gathered onto rank 0's CPU."""
    save_sharded_checkpoint(out_dir / CKPT_DIR, model, optimizer, scaler, step, data_generator,
                            cfg, dtype, tokenizer.path, val_loss)
    if last and cfg.checkpoint.export:
        state = gather_full_state(model)
        if dist.get_rank() == 0:
            whole = materialize(model_skeleton(cfg, model.config, dtype), state)
            export_model(out_dir, whole, cfg, tokenizer.path, step)


REWARD_HEAD = "reward_head.safetensors"  # a reward model's score.weight (1, dim)


def export_model(out_dir: Path, model: Llama, cfg: TrainConfig, tokenizer_path, step: int):
    """What generate.py loads from out_dir: the model (adapters folded in) with its tokenizer,
    plus for LoRA / QLoRA the adapter alone in PEFT's layout (out_dir/adapter); the model's
    metadata records `step`. A reward model's head goes to out_dir/reward_head.safetensors."""
    from safetensors.torch import save as save_safetensors

    if hasattr(model, "score"):  # a reward model: its head beside the model
        atomic_write_bytes(out_dir / REWARD_HEAD,
                           save_safetensors({"score.weight": model.score.weight.detach().cpu()}))
    if cfg.finetune.method == "full":
        save_model(plain_llama(model) if hasattr(model, "score") else model, out_dir,
                   tokenizer_path, step=step)
        return
    save_model(plain_llama(model), out_dir, tokenizer_path, step=step)
    save_adapter(model, out_dir / "adapter", base_model_name(cfg.init_from),
                 cfg.finetune.modules_to_save, tokenizer_path if cfg.finetune.new_tokens else None)
    if (out_dir / TEMPLATE_RECORD).is_file():  # the adapter carries its chat template to export
        atomic_write_bytes(out_dir / "adapter" / TEMPLATE_RECORD,
                           (out_dir / TEMPLATE_RECORD).read_bytes())


def stopping(ckpt_path: Path) -> str:
    """ckpt_path: out_dir/ckpt.pt, or the sharded out_dir/ckpt/."""
    if ckpt_path.is_file() or ckpt_path.is_dir():
        step = (load_checkpoint if ckpt_path.is_file() else read_train_state)(ckpt_path)["step"]
        return f"stopping; the last good checkpoint {ckpt_path} (step {step}) is kept"
    return "stopping before any checkpoint was written"


@dataclass
class TrainResult:
    # step -> train loss (token mean, all ranks)
    losses: dict[int, float] = field(default_factory=dict)
    # step -> global grad norm before clipping
    grad_norms: dict[int, float] = field(default_factory=dict)
    val_losses: dict[int, float] = field(default_factory=dict)  # completed steps -> val loss
    # nats/token of the train split: the context-free baseline
    unigram_entropy: float = float("nan")
    tokens_per_s: float = 0.0  # over the whole run (excluding eval)
    samples: list[str] = field(default_factory=list)  # the text sampled after each eval
    # the trained model (unwrapped from DDP / compile; under FSDP this rank's shards, which
    # distributed.gather_full_state collects)
    model: Llama | None = None


# --------------------------------------------------------------------------------------------------
# the loop


def train(cfg: TrainConfig, resume: bool = False) -> TrainResult:
    # ---- processes, device, precision ------------------------------------------------------------
    rank, local_rank, world_size = setup_distributed(cfg.device, cfg.distributed)
    master = rank == 0
    sharded = cfg.distributed == "fsdp"  # FSDP2: every rank holds 1/W of the model
    device = pick_device(cfg.device, local_rank, world_size)
    width = (cfg.model.dim if cfg.init_from == "scratch"
             else model_width(resolve_checkpoint(cfg.init_from)))
    dtype = pick_dtype(cfg.dtype, device, training=True, width=width)
    if device.type == "cpu" and cfg.cpu_threads > 0:
        torch.set_num_threads(cfg.cpu_threads)
    if cfg.batch_size % world_size != 0:
        raise ValueError(f"batch_size={cfg.batch_size} is not divisible by the {world_size} ranks")
    # mixed precision: trained weights and AdamW state stay float32, the matmuls run in `dtype`
    autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    # fp16 needs loss scaling
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    out_dir = Path(cfg.out_dir)
    if master:  # a new directory, or this kind's own (util/fileio.py: never anyone else's files)
        claim_directory(out_dir, "training run", legacy=("train_config.json", "ckpt.pt"))
        lock_directory(out_dir)  # one writer per run directory
        remove_stale_temp_files(out_dir)  # what a killed earlier run left
    torch.manual_seed(cfg.seed)  # model init (and LoRA dropout)

    # ---- data: rank 0 builds the tokenizer and token cache, then the others reuse it -------------
    if master:
        data = prepare_data(cfg, verbose=True)
    if world_size > 1:
        dist.barrier()
    if not master:
        data = prepare_data(cfg, verbose=False)
    # every rank alike: same global offsets
    data_generator = torch.Generator().manual_seed(cfg.seed)

    # ---- model (full, LoRA or QLoRA), optimizer, resume, compile / DDP / FSDP --------------------
    model = (build_sharded_model(cfg, device, dtype, master) if sharded
             else build_model(cfg, device, dtype))
    if model.config.vocab_size != data.tokenizer.vocab_size:
        raise ValueError(f"model vocab_size={model.config.vocab_size} but the tokenizer "
                         f"{data.tokenizer.path} has {data.tokenizer.vocab_size} pieces")
    if cfg.block_size > model.config.max_seq_len:
        raise ValueError(f"block_size={cfg.block_size} exceeds the model's "
                         f"max_seq_len={model.config.max_seq_len}")
    model.activation_checkpointing = cfg.activation_checkpointing
    check_micro_batch_fits(cfg, model.config, device, dtype, world_size)
    raw_model = model  # the Llama itself: what is saved, sampled from and counted
    trainable = [p for p in raw_model.parameters() if p.requires_grad]
    fused = device.type in ("cuda", "cpu")  # one kernel: 5x the for-loop on CPU
    optimizer = configure_optimizer(model, cfg.optim.weight_decay, get_lr(0, cfg.schedule),
                                    (cfg.optim.beta1, cfg.optim.beta2), cfg.optim.eps, fused=fused,
                                    name=cfg.optimizer)
    start_step = 0
    ckpt_path = out_dir / (CKPT_DIR if sharded else "ckpt.pt")
    if resume:
        start_step = (load_sharded_checkpoint(ckpt_path, cfg, raw_model, optimizer, scaler,
                                              data_generator) if sharded
                      else resume_state(ckpt_path, cfg, raw_model, optimizer, scaler,
                                        data_generator))
        if master:
            print(f"resumed from {ckpt_path} at step {start_step}")
    if cfg.data.format == "preference":  # the reference: adapters off, a copy, or a table
        data.bind(raw_model, lambda: build_model(cfg, device, dtype), device, autocast, rank,
                  world_size, start_step)
    if cfg.compile and not sharded:  # FSDP compiled each block
        model = torch.compile(model)
    if world_size > 1 and not sharded:
        # DDP broadcasts rank 0's buffers at every forward: the RoPE tables must not differ in
        # length because the ranks' first batches did (padded per batch)
        raw_model.grow_rope(cfg.block_size)
        model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)

    # ---- logging ---------------------------------------------------------------------------------
    if master:
        save_config(cfg, out_dir / "train_config.json")
    log = Logger(cfg, data, raw_model, device, dtype, world_size, start_step, master)
    result = TrainResult(unigram_entropy=data.baseline, model=raw_model)
    last_val = None
    if cfg.init_from != "scratch" and start_step == 0 and cfg.eval.interval > 0:
        # the starting model's numbers: what fine-tuning has to beat
        last_val = result.val_losses[0] = data.val_loss(model, autocast, rank, world_size)
        log.eval(0, last_val, raw_model)

    # ---- the loop --------------------------------------------------------------------------------
    model.train()
    for step in range(start_step, cfg.num_steps):
        t0 = time.perf_counter()
        # 1) the learning rate of this step, a pure function of the step
        lr = get_lr(step, cfg.schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # 2) the step's micro-batches (this rank's slices) and the target count over every rank
        batches = [tuple(t.to(device, non_blocking=True)
                         for t in data.draw(data_generator, rank, world_size))
                   for _ in range(cfg.grad_accum_steps)]  # each x, y (B/W, T)[, mask]
        counts = torch.tensor([data.count(b) for b in batches], dtype=torch.float64,
                              device=device).sum(0)  # [targets (pairs), tokens, …]
        if world_size > 1:
            dist.all_reduce(counts)
        step_counts = [int(c) for c in counts.tolist()]
        n_targets, n_tokens = step_counts[0], step_counts[1]

        # 3) forward + backward, token-normalised (pair-normalised) over micro-batches and ranks
        loss_sum = forward_backward(model, batches, n_targets, world_size, autocast, scaler,
                                    functools.partial(data.loss_sum, counts=step_counts))
        if world_size > 1:
            dist.all_reduce(loss_sum)
        loss = loss_sum.item() / n_targets
        metrics = data.step_metrics(n_targets, world_size)
        if not math.isfinite(loss):
            log.close()
            raise FloatingPointError(f"step {step}: training loss is {loss} (lr {lr:.3g}); "
                                     f"{stopping(ckpt_path)}")

        # 4) clip the global grad norm, then step (GradScaler skips steps whose fp16 grads
        #    overflowed)
        scaler.unscale_(optimizer)
        max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm).item()
        if not math.isfinite(grad_norm) and not scaler.is_enabled():
            log.close()
            raise FloatingPointError(f"step {step}: gradient norm is {grad_norm} (lr {lr:.3g}); "
                                     f"{stopping(ckpt_path)}")
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

        # 5) log
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        result.losses[step], result.grad_norms[step] = loss, grad_norm
        log.step(step, loss, lr, grad_norm, n_tokens, time.perf_counter() - t0, metrics)

        # 6) eval + sample, checkpoint (both also after the last step)
        done, last = step + 1, step + 1 == cfg.num_steps
        if last or (cfg.eval.interval > 0 and done % cfg.eval.interval == 0):
            last_val = result.val_losses[done] = data.val_loss(model, autocast, rank, world_size)
            log.eval(done, last_val, raw_model)
        if last or (cfg.checkpoint.interval > 0 and done % cfg.checkpoint.interval == 0):
            if sharded:
                write_sharded_outputs(out_dir, raw_model, optimizer, scaler, done, data_generator,
                                      cfg, dtype, last_val, data.tokenizer, last)
            elif master:
                write_outputs(out_dir, raw_model, optimizer, scaler, done, data_generator, cfg,
                              last_val, data.tokenizer)

    # ---- wrap up ---------------------------------------------------------------------------------
    log.close(last_val)
    result.tokens_per_s, result.samples = log.tokens_per_s(), log.samples
    return result
