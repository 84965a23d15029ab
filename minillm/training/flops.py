"""How much compute and memory a training run needs, before running it.

    python -m minillm.training.flops --preset openllama-7b --method qlora --seq 1024 --batch 4
    python -m minillm.training.flops --config configs/1b.toml

This file is the one place parameters and FLOPs are counted: the estimator below, the trainer's
printed summary and its MFU (training/loop.py) all call it.

Compute (PaLM appendix B): each weight does one multiply-add per token forward (2 FLOPs) and two in
backward (4 FLOPs), so training costs 6N FLOPs/token for the N non-embedding weights (lm_head
included), plus the attention scores and weighted sum, 12·L·C·T (T the sequence length). LoRA/QLoRA
still run the full forward and the backward through every layer, but skip the weight gradients of
the frozen base: 4N + 6·N_adapter. MFU divides the FLOPs of the method that ran by the accelerator's
peak.

Parameters are logical weights: an NF4 projection (QLoRA's base) holds its in·out weights as packed
4-bit codes in buffers, not as parameters, and still counts in·out (model_params counts a built
model this way, count_params a config; tests/test_flops.py checks that the two agree).

Memory, per component:

    weights      full: fp32 master copy (4 B/param, autocast runs the matmuls in bf16)
                 lora: frozen base in bf16 (2 B) + fp32 adapters
                 qlora: block projections in NF4, 4.5 bits/param (4-bit code + one fp32 absmax
                        per 64; 4.127 with double quantization), embeddings / lm_head / norms
                        bf16, fp32 adapters
                 lora8: block projections in LLM.int8, 1 byte/param + one fp32 absmax per output
                        row (alpaca-lora's load_in_8bit), the rest as qlora
    gradients    fp32, only for what trains (full: every weight; lora/qlora: the adapters)
    optimizer    AdamW: two fp32 moments per trained parameter (8 B); adamw8bit: 2 B + one fp32
                 absmax per 256 for tensors of >= 4096 values, 8 B below and for the embedding
                 (training/adamw8bit.py)
    activations  what autograd keeps for backward, counted from model.py (elements per layer,
                 C = dim, Ckv = kv width, F = hidden_dim, H = heads):
                   RMSNorm × 2  3·BTC each (its input, the normalised x, the scaled output) + BT
                   attention    q (BTC) and k, v (2·BT·Ckv) for SDPA, its output (BTC),
                                logsumexp (BHT)
                   SwiGLU       gate, up, silu(gate), their product: 4·BTF
                 plus the final norm (3·BTC + BT) and the loss (training/loss.py): the
                 gradient of the final hidden states (BTC), taken in the forward pass, and
                 one chunk of logits at a time (min(BTV, CHUNK_ELEMENTS)): the (B, T, V)
                 logits never exist.
                 With activation checkpointing only each block's input (BTC) is kept, plus one
                 block's activations while it is recomputed in backward.
                 Bytes per element: 2 under bf16 autocast (an approximation: RMSNorm keeps fp32),
                 4 in fp32.
    KV cache     inference: 2 (k and v) · L · B · T · Ckv · 2 bytes (bf16)

Per rank, over W ranks (`--ranks W`): DDP holds all of the above on every rank. FSDP
(training/distributed.py) holds 1/W of the weights, gradients and AdamW state, the whole
activations of its own micro-batch, and the weights it has gathered: the root's (embeddings,
lm_head, final norm: kept for the whole step) and two blocks' (the one computing, the next one
prefetched), at the compute dtype's bytes (act_bytes). QLoRA is not sharded (its NF4 base is
buffers, not parameters), so it has no FSDP row.

tests/test_flops.py checks these counts against the bytes of the tensors autograd actually saves in
a small CPU model (within 15%).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch.nn as nn

from minillm.config import ModelConfig
from minillm.finetune.adapters import DEFAULT_TARGETS
from minillm.training.loss import CHUNK_ELEMENTS
from minillm.util.cli import ArgumentParser, int_at_least, run_cli

# dense bf16 tensor-core peak of an H100 SXM: the MFU denominator on CUDA
H100_BF16_PEAK_FLOPS = 989e12
NF4_BITS_PER_PARAM = 4.5  # 4-bit codes + an fp32 absmax per block of 64 (32 / 64 = 0.5 bit)
# double quantization: 8-bit absmax + fp32 per 256 blocks
NF4_DQ_BITS_PER_PARAM = 4 + 8 / 64 + 32 / (64 * 256)


def int8_block_bytes(cfg: ModelConfig) -> int:
    """Bytes of the block projections in LLM.int8: an int8 code per weight + a float32 absmax per
    output row (Int8Linear's CB and SCB)."""
    return cfg.n_layers * sum(i * o + 4 * o for i, o in linear_shapes(cfg).values())


def adamw8bit_state_bytes(sizes, float32_sizes=()) -> int:
    """AdamW8bit's state for trained tensors of these element counts: two 1-byte codes and two
    float32 absmax per block of 256 for each tensor of at least MIN_8BIT_SIZE values, two float32
    moments for each smaller one and for each of `float32_sizes` (the embedding: loop.py's
    configure_optimizer); the step counters aside."""
    from minillm.training.adamw8bit import BLOCKSIZE, MIN_8BIT_SIZE

    return (sum(2 * n + 8 * -(-n // BLOCKSIZE) if n >= MIN_8BIT_SIZE else 8 * n for n in sizes)
            + 8 * sum(float32_sizes))


def trained_tensor_sizes(cfg: ModelConfig, method: str, r: int, targets) -> tuple[list, list]:
    """The element counts of the trained tensors, as (8-bit candidates, float32 ones): each
    weight for full training, the embedding among the float32 ones; each adapter's A (r, in) and
    B (out, r) otherwise."""
    shapes = linear_shapes(cfg)
    if method != "full":
        return [n for t in targets for n in (r * shapes[t][0], shapes[t][1] * r)] * cfg.n_layers, []
    per_layer = [i * o for i, o in shapes.values()] + [cfg.dim, cfg.dim]  # + the two norms
    head = [] if cfg.tie_embeddings else [cfg.vocab_size * cfg.dim]
    return per_layer * cfg.n_layers + [cfg.dim] + head, [cfg.vocab_size * cfg.dim]


def linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of each projection in one block."""
    C, Ckv, F = cfg.dim, cfg.n_kv_heads * cfg.head_dim, cfg.hidden_dim
    return dict(q_proj=(C, C), k_proj=(C, Ckv), v_proj=(C, Ckv), o_proj=(C, C),
                gate_proj=(C, F), up_proj=(C, F), down_proj=(F, C))


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts by kind; the total equals model_params(Llama(cfg))[0]."""
    block_linear = cfg.n_layers * sum(i * o for i, o in linear_shapes(cfg).values())
    norms = (2 * cfg.n_layers + 1) * cfg.dim
    embedding = cfg.vocab_size * cfg.dim
    lm_head = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim
    return dict(block_linear=block_linear, norms=norms, embedding=embedding, lm_head=lm_head,
                total=block_linear + norms + embedding + lm_head)


def lora_params(cfg: ModelConfig, r: int, targets: list[str]) -> int:
    """A (r, in) + B (out, r) per targeted projection per block."""
    shapes = linear_shapes(cfg)
    unknown = [t for t in targets if t not in shapes]
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {unknown}; expected names from {list(shapes)}")
    return cfg.n_layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)


def flops_per_token(cfg: ModelConfig, seq_len: int, method: str = "full",
                    adapter_params: int = 0) -> float:
    """Training FLOPs per token, N the parameters that multiply: the blocks, the norms and lm_head's
    vocab·C (also when it is tied to the embedding, whose lookup costs nothing):

      full:        6N + 12·L·C·T
                   (per weight: 2 forward, 2 for the input gradient, 2 for its own gradient)
      lora/qlora:  4N + 6·N_adapter + 12·L·C·T
                   (a frozen weight skips its own gradient; the input gradient still flows
                   through it to the adapters below)
    The attention term (scores and weighted sum, forward + backward) is the same in all three."""
    n = count_params(cfg)
    per_weight = 6 if method == "full" else 4
    matmul_params = n["block_linear"] + n["norms"] + cfg.vocab_size * cfg.dim
    return per_weight * matmul_params + 6 * adapter_params + 12 * cfg.n_layers * cfg.dim * seq_len


def model_params(model: nn.Module) -> tuple[int, int]:
    """(all, trainable) parameters of a built model, as logical weights: a module that computes with
    `dequantize()` instead of an nn.Linear weight (an NF4Linear) counts its in·out weights. For a
    model built for `method`, these are estimate(cfg, method, ...).params and .trainable."""
    total = sum(p.numel() for p in model.parameters())  # a tied lm_head is yielded once
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for m in model.modules():
        if hasattr(m, "dequantize") and not isinstance(m, nn.Linear):
            total += m.in_features * m.out_features
    return total, trainable


def parameter_summary(model: nn.Module) -> str:
    """One line, as PEFT's print_trainable_parameters prints it (the trainer prints it for adapter
    runs): "trainable params: … || all params: … || trainable%: …" (an NF4 base counts its in·out
    weights)."""
    total, trainable = model_params(model)
    pct = 100 * trainable / total
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}"


def model_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """flops_per_token for a built Llama: "full" when every parameter trains, else a frozen base
    with the trainable parameters as adapters (4N + 6·N_adapter)."""
    total, trainable = model_params(model)
    if trainable == total:
        return flops_per_token(model.config, seq_len, "full")
    return flops_per_token(model.config, seq_len, "lora", adapter_params=trainable)


def layer_activation_elements(cfg: ModelConfig, batch: int, seq: int, lora_r: int = 0,
                              lora_targets: tuple[str, ...] = ()) -> int:
    """Elements one block saves for backward (see the module docstring for the list)."""
    B, T, C, F = batch, seq, cfg.dim, cfg.hidden_dim
    Ckv = cfg.n_kv_heads * cfg.head_dim
    return (
        # input_layernorm, post_attention_layernorm: x, x·rsqrt, ·weight; rsqrt
        2 * (3 * B * T * C + B * T)
        # attention: q, out; k, v; logsumexp
        + 2 * B * T * C + 2 * B * T * Ckv + cfg.n_heads * B * T
        + 4 * B * T * F  # SwiGLU: gate, up, silu(gate), product
        + len(lora_targets) * B * T * lora_r  # each adapter's (B, T, r) intermediate A·x
    )


def activation_elements(cfg: ModelConfig, batch: int, seq: int, checkpointing: bool = False,
                        lora_r: int = 0, lora_targets: tuple[str, ...] = ()) -> int:
    """Elements autograd holds for backward: the blocks, the final norm (3·BTC + BT) and the chunked
    loss (the hidden states' gradient, BTC, and one chunk of logits). With checkpointing: each
    block's input, plus one block being recomputed."""
    B, T = batch, seq
    per_layer = layer_activation_elements(cfg, B, T, lora_r, lora_targets)
    top = 4 * B * T * cfg.dim + B * T + min(B * T * cfg.vocab_size, CHUNK_ELEMENTS)
    if checkpointing:
        return cfg.n_layers * B * T * cfg.dim + per_layer + top
    return cfg.n_layers * per_layer + top


def kv_cache_bytes(cfg: ModelConfig, batch: int, seq: int, bytes_per_elem: int = 2) -> int:
    return 2 * cfg.n_layers * batch * seq * cfg.n_kv_heads * cfg.head_dim * bytes_per_elem


@dataclass
class Estimate:
    params: int  # all parameters of the model
    trainable: int  # those with a gradient and optimizer state
    flops_per_token: float
    weights: int  # bytes
    gradients: int
    optimizer: int
    activations: int  # without activation checkpointing
    activations_checkpointed: int
    kv_cache: int
    fsdp_gathered: int  # the whole weights FSDP holds at once: the root's and two blocks'

    def total(self, checkpointing: bool) -> int:
        act = self.activations_checkpointed if checkpointing else self.activations
        return self.weights + self.gradients + self.optimizer + act

    def fsdp_per_rank(self, world_size: int, checkpointing: bool) -> int:
        """Bytes on each of W FSDP ranks: (weights + gradients + AdamW) / W + activations +
        gathered weights. (DDP's per-rank bytes are total(): every rank holds everything.)"""
        act = self.activations_checkpointed if checkpointing else self.activations
        states = self.weights + self.gradients + self.optimizer
        return -(-states // world_size) + act + self.fsdp_gathered


METHODS = ("full", "lora", "qlora", "lora8")


def estimate(cfg: ModelConfig, method: str, batch: int, seq: int, lora_r: int = 8,
             lora_targets: tuple[str, ...] = DEFAULT_TARGETS, act_bytes: int = 2,
             double_quant: bool = False, optim: str = "adamw") -> Estimate:
    """Bytes of each memory component for one training micro-batch (batch, seq) under `method`
    (full | lora | qlora | lora8) and `optim` (adamw | adamw8bit; muon is counted as AdamW)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, found {method!r}")
    n = count_params(cfg)
    r, targets = (lora_r, tuple(lora_targets)) if method != "full" else (0, ())
    adapters = lora_params(cfg, r, list(targets)) if method != "full" else 0
    if method == "full":
        trainable, weights = n["total"], 4 * n["total"]
    elif method == "lora":
        trainable, weights = adapters, 2 * n["total"] + 4 * adapters
    elif method == "lora8":
        dense = n["total"] - n["block_linear"]
        trainable, weights = adapters, int8_block_bytes(cfg) + 2 * dense + 4 * adapters
    else:
        dense = n["total"] - n["block_linear"]
        trainable = adapters
        bits = NF4_DQ_BITS_PER_PARAM if double_quant else NF4_BITS_PER_PARAM
        weights = round(n["block_linear"] * bits / 8) + 2 * dense + 4 * adapters
    act = lambda ckpt: act_bytes * activation_elements(cfg, batch, seq, ckpt, r, targets)
    block = (n["block_linear"] + n["norms"] - cfg.dim) // cfg.n_layers + adapters // cfg.n_layers
    root = n["embedding"] + n["lm_head"] + cfg.dim
    return Estimate(
        params=n["total"] + adapters, trainable=trainable,
        flops_per_token=flops_per_token(cfg, seq, method, adapters),
        weights=weights, gradients=4 * trainable,
        optimizer=(adamw8bit_state_bytes(*trained_tensor_sizes(cfg, method, r, targets))
                   if optim == "adamw8bit" else 8 * trainable),
        activations=act(False), activations_checkpointed=act(True),
        kv_cache=kv_cache_bytes(cfg, batch, seq),
        fsdp_gathered=act_bytes * (root + 2 * block),
    )


def format_report(cfg: ModelConfig, name: str, method: str, batch: int, seq: int,
                  est: Estimate, ranks: int = 8, rank_est: Estimate | None = None,
                  optim: str = "adamw") -> str:
    """rank_est: the estimate for one rank's micro-batch, when `batch` is global (a config's
    batch_size is split over the ranks); default `est`."""
    gib = lambda b: f"{b / 2**30:9.2f} GiB"
    rank_est = rank_est or est
    if method in ("qlora", "lora8"):
        fsdp = "n/a (a quantized base is not sharded; fsdp trains full or lora)"
    else:
        fsdp = (f"{gib(rank_est.fsdp_per_rank(ranks, False))}   "
                f"({gib(rank_est.fsdp_per_rank(ranks, True)).strip()} with checkpointing)   "
                f"(÷ {ranks}, + {gib(rank_est.fsdp_gathered).strip()} gathered)")
    lines = [
        f"{name}: dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads ({cfg.n_kv_heads} kv), "
        f"hidden {cfg.hidden_dim}, vocab {cfg.vocab_size} | "
        f"method {method}, batch {batch}, seq {seq}",
        f"parameters             {est.params:>15,d}   (trainable {est.trainable:,d})",
        f"training FLOPs/token   {est.flops_per_token:>15.4g}   "
        f"({'6N' if method == 'full' else '4N + 6N_adapter'} + 12·L·C·T)",
        f"FLOPs per micro-batch  {est.flops_per_token * batch * seq:>15.4g}",
        f"weights                {gib(est.weights)}",
        f"gradients              {gib(est.gradients)}",
        f"optimizer ({'AdamW8bit' if optim == 'adamw8bit' else 'AdamW'}){' ' * (11 - len(optim))}"
        f"{gib(est.optimizer)}",
        f"activations            {gib(est.activations)}   "
        f"({gib(est.activations_checkpointed).strip()} with activation checkpointing)",
        f"total                  {gib(est.total(False))}   "
        f"({gib(est.total(True)).strip()} with checkpointing)",
        f"KV cache (inference)   {gib(est.kv_cache)}   (bf16, batch {batch} × {seq} tokens)",
        f"per rank of {ranks}, DDP  {gib(rank_est.total(False))}   "
        f"({gib(rank_est.total(True)).strip()} with checkpointing)   (every rank holds it all)",
        f"per rank of {ranks}, FSDP {fsdp}",
    ]
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = ArgumentParser(description="Parameters, training FLOPs and memory of a Llama config.")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--preset", default=None,
                     help="a ModelConfig preset name, e.g. openllama-7b, 1b, tiny")
    src.add_argument("--config", default=None,
                     help="a train TOML (configs/*.toml): model, batch_size, block_size, "
                          "finetune.* from it")
    parser.add_argument("--method", choices=METHODS, default=None,
                        help="what trains; lora8: LoRA over an LLM.int8 base (default: full, or "
                             "finetune.method from --config)")
    parser.add_argument("--optim", choices=("adamw", "adamw8bit"), default=None,
                        help="optimizer state (default: adamw, or optim.name from --config)")
    parser.add_argument("--seq", type=int_at_least(1), default=None,
                        help="sequence length (default: block_size, or 1024 capped at the "
                             "preset's max_seq_len)")
    parser.add_argument("--batch", type=int_at_least(1), default=None,
                        help="micro-batch size (default 1 or batch_size)")
    parser.add_argument("--lora-r", type=int_at_least(1), default=None,
                        help="LoRA rank (default 8 or finetune.lora_r)")
    parser.add_argument("--lora-targets", default=None,
                        help="comma-separated projections to adapt "
                             "(default: all seven, q_proj … down_proj)")
    parser.add_argument("--act-bytes", type=int_at_least(1), default=2,
                        help="bytes per activation element (2 bf16, 4 fp32)")
    parser.add_argument("--ranks", type=int, default=8,
                        help="world size for the per-rank DDP and FSDP rows (default 8; with "
                             "--config each rank takes batch_size / ranks sequences)")
    parser.add_argument("--double-quant", action="store_true",
                        help="qlora: NF4 scales double-quantized "
                             "(default: finetune.double_quant from --config)")
    args = parser.parse_args(argv)
    method, seq, batch, r, double_quant, optim = "full", 1024, 1, 8, False, "adamw"
    targets = list(DEFAULT_TARGETS)
    if args.config is not None:
        from minillm.training.config import load_config

        tc = load_config(args.config)
        cfg, name = tc.model, args.config
        method, seq, batch = tc.finetune.method, tc.block_size, tc.batch_size
        r, targets, double_quant = (tc.finetune.lora_r, tc.finetune.lora_targets,
                                    tc.finetune.double_quant)
        optim = "adamw8bit" if tc.optim.name == "adamw8bit" else "adamw"
    else:
        name = args.preset or "openllama-7b"
        cfg = ModelConfig.from_name(name)
    method = args.method or method
    seq, batch = args.seq or min(seq, cfg.max_seq_len), args.batch or batch
    r = args.lora_r or r
    targets = args.lora_targets.split(",") if args.lora_targets else targets
    optim = args.optim or optim
    if args.ranks < 1:
        parser.error(f"--ranks must be >= 1, found {args.ranks}")
    est = lambda b: estimate(cfg, method, b, seq, r, tuple(targets), args.act_bytes,
                             double_quant or args.double_quant, optim)
    # a config's batch_size is global: each rank's micro-batch is 1/W of it
    per_rank = est(max(1, batch // args.ranks)) if args.config is not None and args.batch is None \
        else None
    report = format_report(cfg, name, method, batch, seq, est(batch), args.ranks, per_rank, optim)
    print(report)
    return report


if __name__ == "__main__":
    sys.exit(run_cli(main))
