"""DoRA (lora.DoRALinear): the forward and its gradients against the paper's equations transcribed,
PEFT's dropout rule, merge / unmerge, an NF4 base, and the PEFT adapter files
(lora_magnitude_vector, use_dora)."""

import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from minillm.config import ModelConfig
from minillm.finetune.adapters import (
    apply_lora,
    lora_disabled,
    lora_modules,
    mark_only_lora_trainable,
    merge_lora,
)
from minillm.finetune.dora import DoRALinear
from minillm.finetune.nf4_linear import NF4Linear
from minillm.finetune.peft_io import load_adapter, read_base_quantization, save_adapter
from minillm.model import Llama

CFG = ModelConfig(dim=40, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=52, vocab_size=71,
                  max_seq_len=32)


def reference_dora(x, W, b, A, B, m, scaling):
    """Liu et al. 2024, eq. (5) with §4.3's detached norm: W' = m · V / ‖V‖_c, V = W0 + s·BA, one
    norm per output row (torch's (out, in) layout: the paper's column norm); y = x W'^T + b."""
    V = W + scaling * (B @ A)  # (out, in)
    norm = torch.linalg.norm(V, dim=1, keepdim=True).detach()  # (out, 1)
    y = x @ (m[:, None] * V / norm).T
    return y if b is None else y + b


def randomized(layer: DoRALinear, seed=1):
    """A trained-looking DoRA layer: B ≠ 0 and m away from ‖W0‖."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.weight.copy_(0.2 * torch.randn(layer.lora_B.weight.shape, generator=g))
        layer.lora_magnitude_vector.mul_(1 + 0.3 * torch.rand(layer.out_features, generator=g))
    return layer


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    return Llama(CFG).eval()


def idx(seed=0, B=2, T=13):
    return torch.randint(0, CFG.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def test_init_magnitude_is_row_norm_and_output_is_the_base_exactly():
    torch.manual_seed(0)
    base = nn.Linear(37, 23, bias=True)
    dora = DoRALinear(base, r=8, alpha=16)
    torch.testing.assert_close(dora.lora_magnitude_vector, base.weight.norm(dim=1), atol=0,
                               rtol=1e-6)
    x = torch.randn(3, 5, 37)
    # s = m / ‖W0‖ = 1 and B = 0: the correction is exactly zero
    assert torch.equal(dora(x), base(x))


@pytest.mark.parametrize("rslora,bias", [(False, True), (True, False)])
def test_forward_and_gradients_match_the_equations(rslora, bias):
    torch.manual_seed(0)
    base = nn.Linear(37, 23, bias=bias)
    dora = randomized(DoRALinear(base, r=5, alpha=7, dropout=0.1, use_rslora=rslora).eval())
    scaling = 7 / 5**0.5 if rslora else 7 / 5
    x = torch.randn(4, 6, 37)
    y = dora(x)
    A = dora.lora_A.weight.detach().clone().requires_grad_()
    B = dora.lora_B.weight.detach().clone().requires_grad_()
    m = dora.lora_magnitude_vector.detach().clone().requires_grad_()
    ref = reference_dora(x, base.weight, base.bias, A, B, m, scaling)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (ref * g).sum().backward()
    for ours, theirs in ((dora.lora_A.weight, A), (dora.lora_B.weight, B),
                         (dora.lora_magnitude_vector, m)):
        torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-4, rtol=1e-4)
    assert base.weight.grad is None


def test_training_dropout_applies_to_both_terms_of_the_update_as_peft():
    """PEFT, DoraLinearVariant.forward: with dropout in training, y = W0 x + b + (s-1)
    W0 x̃ + s·(α/r)·BA x̃."""
    torch.manual_seed(0)
    base = nn.Linear(16, 8, bias=True)
    dora = randomized(DoRALinear(base, r=4, alpha=8, dropout=0.5).train())
    x = torch.randn(6, 16)
    torch.manual_seed(123)
    y = dora(x)
    torch.manual_seed(123)
    xd = nn.functional.dropout(x, 0.5, training=True)
    W, A, B, m = base.weight, dora.lora_A.weight, dora.lora_B.weight, dora.lora_magnitude_vector
    s = m / torch.linalg.norm(W + 2 * B @ A, dim=1)
    ref = base(x) + (s - 1) * (xd @ W.T) + s * 2 * (xd @ A.T @ B.T)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


def test_merge_equals_unmerged_forward_and_unmerge_restores_w():
    model = tiny_llama()
    w0 = {n: m.weight.clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    apply_lora(model, r=4, alpha=8, use_dora=True)
    for m in lora_modules(model).values():
        randomized(m)
    x = idx()
    with torch.no_grad():
        ref, _ = model(x)
        for m in lora_modules(model).values():
            m.merge()
            m.merge()  # no-op: the flag guards against folding the scale in twice
        merged, _ = model(x)
        torch.testing.assert_close(merged, ref, atol=1e-5, rtol=0)
        with lora_disabled(model):  # unmerges, runs the base, merges again
            base_logits, _ = model(x)
        for m in lora_modules(model).values():
            m.unmerge()
        for name, m in lora_modules(model).items():
            torch.testing.assert_close(m.base.weight, w0[name], atol=2e-7, rtol=1e-6)
        unmerged, _ = model(x)
        torch.testing.assert_close(unmerged, ref, atol=1e-5, rtol=0)
        assert not torch.allclose(base_logits, ref, atol=1e-3)
        torch.testing.assert_close(base_logits, tiny_llama()(x)[0], atol=1e-5, rtol=0)
        merge_lora(model)
        assert not lora_modules(model)
        plain, _ = model(x)
    torch.testing.assert_close(plain, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_base_uses_the_norm_of_the_dequantized_weight(double_quant):
    torch.manual_seed(0)
    dense = nn.Linear(64, 48, bias=False)
    q = NF4Linear.from_linear(dense, double_quant=double_quant, compute_dtype=torch.float32)
    w_hat = q.dequantize(torch.float32)  # (out, in): the weight QDoRA computes with
    dora = DoRALinear(q, r=4, alpha=8).eval()
    torch.testing.assert_close(dora.lora_magnitude_vector, w_hat.norm(dim=1), atol=0, rtol=1e-6)
    randomized(dora)
    x = torch.randn(3, 64)
    with torch.no_grad():
        ref = reference_dora(x, w_hat, None, dora.lora_A.weight, dora.lora_B.weight,
                             dora.lora_magnitude_vector, 2.0)
        torch.testing.assert_close(dora(x), ref, atol=1e-5, rtol=1e-5)
        with pytest.raises(TypeError, match="use merge_lora"):
            dora.merge()
        dense_merged = dora.to_dense_linear()
        assert type(dense_merged) is torch.nn.Linear
        torch.testing.assert_close(dense_merged(x), ref, atol=1e-5, rtol=1e-5)


def test_only_adapters_and_magnitudes_train():
    model = tiny_llama()
    apply_lora(model, targets=["q", "v"], r=4, alpha=8, use_dora=True)
    mark_only_lora_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"layers.{i}.self_attn.{p}.{w}" for i in range(2)
                         for p in ("q_proj", "v_proj")
                         for w in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")}


def test_save_load_peft_keys_config_and_logits(tmp_path):
    model = tiny_llama()
    apply_lora(model, targets=["q", "v", "down"], r=4, alpha=8, use_rslora=True, use_dora=True)
    for m in lora_modules(model).values():
        randomized(m)
    save_adapter(model, tmp_path)
    state = load_file(str(tmp_path / "adapter_model.safetensors"))
    # PEFT's: no ".weight"
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_magnitude_vector"
    assert state[key].shape == (20,)
    assert torch.equal(state[key], model.layers[1].self_attn.v_proj.lora_magnitude_vector.detach())
    assert len(state) == 2 * 3 * 3
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["use_rslora"] is True
    assert read_base_quantization(tmp_path) is None  # a dense base: nothing to record
    fresh = tiny_llama()
    assert load_adapter(fresh, tmp_path) == list(lora_modules(model))
    assert all(isinstance(m, DoRALinear) and m.scaling == 8 / 2
               for m in lora_modules(fresh).values())
    with torch.no_grad():
        assert torch.equal(model(idx())[0], fresh(idx())[0])
    del state[key]
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"'.*layers.1.self_attn.v_proj.lora_magnitude_vector' "
                                         r"is missing"):
        load_adapter(tiny_llama(), tmp_path)


def test_qdora_adapter_records_the_nf4_settings(tmp_path):
    from minillm.finetune.nf4_linear import quantize_model_

    model = tiny_llama()
    quantize_model_(model, blocksize=32, double_quant=True, compute_dtype=torch.float32)
    apply_lora(model, targets=["q", "k"], r=2, alpha=4, use_dora=True)
    save_adapter(model, tmp_path)
    assert read_base_quantization(tmp_path) == {"quant_method": "nf4", "blocksize": 32,
                                                "double_quant": True}
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True


def test_finetune_config_switches():
    from minillm.training.config import load_config

    # one switch: use_dora with lora or qlora (PEFT's name); there is no method "dora"
    qdora = load_config(overrides={"finetune.method": "qlora", "finetune.use_dora": True}).finetune
    assert qdora.use_dora and qdora.method == "qlora"
    assert not load_config(overrides={"finetune.method": "lora"}).finetune.use_dora
    with pytest.raises(ValueError, match=r"finetune.method must be one of \('full', "
                                         r"'lora', 'qlora', 'lora8'\)"):
        load_config(overrides={"finetune.method": "dora"})
    with pytest.raises(ValueError, match="finetune.use_dora must be false with method 'full'"):
        load_config(overrides={"finetune.use_dora": True})
    with pytest.raises(ValueError, match=r"finetune.modules_to_save must be \['embed_tokens', "
                                         r"'lm_head'\] when"):
        load_config(overrides={"finetune.method": "lora", "finetune.new_tokens": ["<x>"]})
    with pytest.raises(ValueError, match="finetune.modules_to_save must be a subset"):
        load_config(overrides={"finetune.method": "lora", "finetune.modules_to_save": ["norm"]})
