"""minillm.training.flops: parameter, FLOP and memory estimates against the real model.

The activation estimate is checked against what autograd actually keeps: a saved_tensors_hooks pack
hook sees every tensor saved for backward during the forward pass; we sum the bytes of their
distinct storages (views of one tensor count once, parameters are excluded and counted as weights),
and add the logits the forward returns. On a CPU there is no torch.cuda.max_memory_allocated, and an
RSS delta is dominated by the allocator's caching; the saved tensors are the exact quantity the
estimate models — the memory held between the end of the forward pass and the start of the backward
pass.
"""

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minillm.config import PRESETS, ModelConfig
from minillm.finetune.adapters import apply_lora, mark_only_lora_trainable
from minillm.finetune.nf4_linear import NF4Linear, quantize_model_
from minillm.model import Llama
from minillm.training import flops
from minillm.training.config import TrainConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_params_and_flops_match_the_model(name):
    cfg = ModelConfig.from_name(name)
    with torch.device("meta"):
        model = Llama(cfg)
    assert flops.model_params(model) == (flops.count_params(cfg)["total"],) * 2
    assert flops.model_flops_per_token(model, 1024) == flops.flops_per_token(cfg, 1024)


def test_tiny_preset_is_the_model_the_main_job_trains():
    """One "tiny": the preset, the default TrainConfig and configs/tiny.toml (what
    `python3 run.py train` trains) are the same 1.33M-parameter model; ModelConfig's
    defaults are its shape, untied."""
    tiny = ModelConfig.from_name("tiny")
    assert tiny == TrainConfig().model == load_config(ROOT / "configs" / "tiny.toml").model
    assert tiny == dataclasses.replace(ModelConfig(), tie_embeddings=True)
    assert ((tiny.dim, tiny.n_layers, tiny.n_heads, tiny.hidden_dim, tiny.vocab_size)
            == (128, 4, 4, 352, 4096))
    # 4096 · 128 (the embedding, which is also lm_head)
    # + 4 · (4 · 128² + 3 · 128 · 352 + 2 · 128) + 128
    report = flops.main(["--preset", "tiny"])
    assert "parameters                   1,328,256" in report
    # the default 1024 capped at the model's context
    assert "method full, batch 1, seq 256" in report


def test_tied_lm_head_still_costs_its_matmul():
    # tying shares the weight, not the work: lm_head's (C -> V) matmul runs either way
    untied = ModelConfig(tie_embeddings=False)
    tied = ModelConfig(tie_embeddings=True)
    assert flops.count_params(untied)["total"] - flops.count_params(tied)["total"] == 4096 * 128
    assert flops.flops_per_token(tied, 128) == flops.flops_per_token(untied, 128)


def test_openllama_7b_numbers():
    cfg = ModelConfig.from_name("openllama-7b")
    n = 6_738_415_616  # the published parameter count of LLaMA-7B / OpenLLaMA-7B
    assert flops.count_params(cfg)["total"] == n
    full = flops.estimate(cfg, "full", batch=4, seq=1024)
    assert (full.weights, full.gradients, full.optimizer) == (4 * n, 4 * n, 8 * n)
    assert full.kv_cache == 2 * 32 * 4 * 1024 * 4096 * 2  # 2 GiB
    assert full.flops_per_token == 6 * (n - 32000 * 4096) + 12 * 32 * 4096 * 1024
    lora = flops.estimate(cfg, "lora", batch=4, seq=1024, lora_r=8,
                          lora_targets=("q_proj", "v_proj"))
    adapters = 32 * 2 * 8 * (4096 + 4096)
    assert lora.trainable == adapters == 4_194_304
    assert lora.weights == 2 * n + 4 * adapters
    assert (lora.gradients, lora.optimizer) == (4 * adapters, 8 * adapters)
    qlora = flops.estimate(cfg, "qlora", batch=4, seq=1024, lora_r=8,
                           lora_targets=("q_proj", "v_proj"))
    block_linear = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert qlora.weights == block_linear * 9 // 16 + 2 * (n - block_linear) + 4 * adapters
    assert qlora.activations_checkpointed < qlora.activations


def test_lora_and_nf4_counts_match_the_modules():
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=96,
                      max_seq_len=32)
    model = Llama(cfg)
    apply_lora(model, ["q_proj", "k_proj", "down_proj"], r=4)
    mark_only_lora_trainable(model)
    assert (flops.model_params(model)[1]
            == flops.lora_params(cfg, 4, ["q_proj", "k_proj", "down_proj"]))
    base = Llama(cfg)
    quantize_model_(base)
    nf4_bytes = sum(b.numel() * b.element_size() for name, b in base.named_buffers()
                    if "layers." in name)
    assert nf4_bytes == flops.count_params(cfg)["block_linear"] * flops.NF4_BITS_PER_PARAM / 8
    # double quantization, on a 7B projection's buffers (allocated, not quantized): the formula
    # misses only the layer's one float32 offset
    layer = NF4Linear(4096, 4096, double_quant=True)
    dq_bytes = sum(b.numel() * b.element_size() for b in layer.buffers())
    assert dq_bytes - 4096 * 4096 * flops.NF4_DQ_BITS_PER_PARAM / 8 == 4


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_adapted_model_count_and_flops_agree_with_the_estimator(method):
    """A model built as the trainer builds it (NF4 base for qlora, adapters on three projections):
    its parameter count (NF4 weights counted as in·out) and its training FLOPs are the
    estimator's."""
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=96,
                      max_seq_len=32)
    targets = ("q_proj", "v_proj", "down_proj")
    model = Llama(cfg)
    if method == "qlora":
        quantize_model_(model, double_quant=True)
        assert isinstance(model.layers[0].self_attn.k_proj, NF4Linear)  # its weight is no parameter
    apply_lora(model, list(targets), r=4)
    mark_only_lora_trainable(model)
    est = flops.estimate(cfg, method, batch=2, seq=32, lora_r=4, lora_targets=targets,
                         double_quant=True)
    n = flops.count_params(cfg)["total"]
    adapters = 2 * 4 * ((64 + 64) + (64 + 32) + (128 + 64))  # L · r · (in + out) per target
    assert flops.model_params(model) == (est.params, est.trainable) == (n + adapters, adapters)
    # 4N + 6·N_adapter + 12·L·C·T, N without the embedding
    expected = 4 * (n - 96 * 64) + 6 * adapters + 12 * 2 * 64 * 32
    assert flops.model_flops_per_token(model, 32) == est.flops_per_token == expected


def saved_bytes(model: Llama, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes autograd saves for backward (distinct storages,
    parameters excluded) + the returned logits."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits, _ = model(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1),
                               reduction="sum")
    storages[logits.untyped_storage().data_ptr()] = logits.untyped_storage().nbytes()
    loss.backward()
    return sum(storages.values())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_and_weight_estimate_within_15_percent(checkpointing):
    torch.manual_seed(0)
    cfg = ModelConfig(dim=96, n_layers=3, n_heads=6, n_kv_heads=3, hidden_dim=200, vocab_size=300,
                      max_seq_len=64)
    B, T = 3, 40
    model = Llama(cfg)
    model.activation_checkpointing = checkpointing
    x = torch.randint(0, 300, (B, T))
    measured = saved_bytes(model, x, x) + sum(p.numel() * 4 for p in model.parameters())
    est = flops.estimate(cfg, "full", B, T, act_bytes=4)
    act = est.activations
    if checkpointing:
        # at the end of the forward only the block inputs are held; the block recomputed in
        # backward, which the estimate also counts, is not allocated yet
        act = est.activations_checkpointed - 4 * flops.layer_activation_elements(cfg, B, T)
    predicted = est.weights + act
    assert abs(predicted - measured) / measured < 0.15, (predicted, measured)


def test_cli_prints_the_breakdown(capsys, tmp_path):
    report = flops.main(["--preset", "openllama-7b", "--method", "qlora", "--seq", "1024",
                         "--batch", "4"])
    assert capsys.readouterr().out.strip() == report
    # all seven projections at r=8: 32 · 8 · (4·(4096+4096) + 3·(4096+11008)) adapter parameters
    assert "parameters               6,758,404,096   (trainable 19,988,480)" in report
    # 4N + 6N_adapter + 12·L·C·T = 4·6,607,343,616 + 6·19,988,480 + 12·32·4096·1024
    assert f"training FLOPs/token   {28_159_918_080:>15.4g}" in report
    assert "KV cache (inference)        2.00 GiB" in report
    report = flops.main(["--config",
                         str(Path(__file__).resolve().parents[1] / "configs" / "1b.toml")])
    assert "method full, batch 8, seq 2048" in report


def test_fsdp_per_rank_memory_divides_the_states_by_the_world_size():
    """FSDP: (weights + gradients + AdamW) / W + activations + the gathered root and two blocks
    (bf16); DDP: everything on every rank; QLoRA has no FSDP row."""
    cfg = ModelConfig.from_name("openllama-7b")
    n = 6_738_415_616
    full = flops.estimate(cfg, "full", batch=4, seq=1024)
    block = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096  # projections and two norm gains
    root = 2 * 32000 * 4096 + 4096  # embedding, lm_head, final norm
    assert full.fsdp_gathered == 2 * (root + 2 * block)
    assert full.fsdp_per_rank(8, False) == 16 * n // 8 + full.activations + full.fsdp_gathered
    assert full.fsdp_per_rank(1, True) == full.total(True) + full.fsdp_gathered
    report = flops.main(["--preset", "openllama-7b", "--seq", "1024", "--batch", "4",
                         "--ranks", "8"])
    assert "per rank of 8, DDP     121.31 GiB   (102.20 GiB with checkpointing)" in report
    assert "per rank of 8, FSDP     34.69 GiB   (15.58 GiB with checkpointing)" in report
    qlora = flops.main(["--preset", "openllama-7b", "--method", "qlora", "--ranks", "2"])
    assert "per rank of 2, FSDP n/a" in qlora


def test_lora8_weights_and_adamw8bit_state_match_the_modules():
    """The estimator's int8 base bytes are Int8Linear's buffers (CB + SCB), and its AdamW8bit state
    is what the trainer's optimizer holds after a step, for full training and for adapters."""
    from minillm.finetune.int8_linear import Int8Linear, int8_hook
    from minillm.training.loop import configure_optimizer

    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=96,
                      max_seq_len=32)
    model = Llama(cfg)
    hook = int8_hook(compute_dtype=torch.float32)
    for key, w in list(model.state_dict().items()):
        hook(model, key, w)  # what load_pretrained does with each projection as it streams in
    int8_bytes = sum(t.numel() * t.element_size() for m in model.modules()
                     if isinstance(m, Int8Linear) for t in (m.CB, m.SCB))
    assert int8_bytes == flops.int8_block_bytes(cfg)
    est = flops.estimate(cfg, "lora8", batch=2, seq=32, lora_r=4, lora_targets=("q_proj",))
    # + the bf16 embedding, lm_head and 5 norms, + the float32 adapters: 2 layers of r (64 + 64)
    assert est.weights == (flops.int8_block_bytes(cfg) + 2 * (96 * 64 * 2 + 5 * 64)
                           + 4 * 2 * 4 * 128)
    for method, built in (("full", Llama(cfg)), ("lora8", model)):
        if method == "lora8":
            apply_lora(built, ["q_proj"], r=4)
            mark_only_lora_trainable(built)
        opt = configure_optimizer(built, 0.1, 1e-3, (0.9, 0.95), 1e-8, False, "adamw8bit")
        for p in built.parameters():
            p.grad = torch.zeros_like(p) if p.requires_grad else None
        opt.step()
        held = sum(t.numel() * t.element_size() for s in opt.state.values()
                   for k, t in s.items() if k != "step")
        est = flops.estimate(cfg, method, 2, 32, 4, ("q_proj",), optim="adamw8bit")
        assert held == est.optimizer
