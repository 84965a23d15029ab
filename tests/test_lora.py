"""lora.py: the LoRALinear formula against a transcribed reference, init, merge/unmerge,
trainability, PEFT adapter files (exact key names and config fields), load errors, and QLoRA
merge over an NF4 base."""

import json
import math

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from minillm.config import ModelConfig
from minillm.finetune.adapters import (
    apply_lora,
    lora_disabled,
    lora_modules,
    mark_only_lora_trainable,
    merge_lora,
)
from minillm.finetune.lora import LoRALinear
from minillm.finetune.peft_io import load_adapter, save_adapter
from minillm.model import Llama
from minillm.training.flops import parameter_summary

# awkward widths: dim 40 (head_dim 10), GQA 4/2 heads, hidden 52, vocab 71
CFG = ModelConfig(dim=40, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=52, vocab_size=71,
                  max_seq_len=32)


def tiny_llama(seed=0, cfg=CFG, dtype=torch.float32):
    torch.manual_seed(seed)
    return Llama(cfg).to(dtype).eval()


def randomize_lora(model, seed=1, std=0.1):
    """B = 0 at init makes ΔW vanish; give every B random values so the adapters matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(std * torch.randn(m.lora_B.weight.shape, generator=g))


def idx(seed=0, B=2, T=13):
    return torch.randint(0, CFG.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def reference_lora(x, W, A, B, alpha, r):
    """The paper's formula, transcribed: h = W0 x + (α/r) B A x (no dropout)."""
    return x @ W.T + (alpha / r) * ((x @ A.T) @ B.T)


def test_zero_init_equals_base_and_a_is_kaiming_uniform():
    torch.manual_seed(0)
    base = nn.Linear(37, 23, bias=True)
    lora = LoRALinear(base, r=8, alpha=16, dropout=0.0)
    x = torch.randn(3, 5, 37)
    assert torch.equal(lora(x), base(x))  # B = 0: exactly the base output
    assert torch.equal(lora.lora_B.weight, torch.zeros(23, 8))
    bound = 1 / math.sqrt(37)  # kaiming_uniform_(a=√5) on fan_in 37 → U(-1/√37, 1/√37)
    a = lora.lora_A.weight
    assert a.shape == (8, 37) and a.abs().max() <= bound and a.abs().max() > 0.95 * bound
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert lora.lora_A.weight.requires_grad and lora.lora_B.weight.requires_grad


@pytest.mark.parametrize("rslora", [False, True])
def test_forward_matches_transcribed_formula(rslora):
    torch.manual_seed(0)
    base = nn.Linear(37, 23, bias=False)
    # eval: dropout off
    lora = LoRALinear(base, r=5, alpha=7, dropout=0.1, use_rslora=rslora).eval()
    nn.init.normal_(lora.lora_B.weight)
    x = torch.randn(4, 37)
    r_eff = math.sqrt(5) if rslora else 5  # rsLoRA scales by α/√r
    ref = reference_lora(x, base.weight, lora.lora_A.weight, lora.lora_B.weight, 7, r_eff)
    torch.testing.assert_close(lora(x), ref, atol=1e-6, rtol=1e-6)


def test_dropout_applies_to_the_adapter_input_only():
    torch.manual_seed(0)
    base = nn.Linear(16, 8, bias=False)
    lora = LoRALinear(base, r=4, alpha=8, dropout=0.5).train()
    nn.init.normal_(lora.lora_B.weight)
    x = torch.randn(6, 16)
    torch.manual_seed(123)
    y = lora(x)
    torch.manual_seed(123)
    xd = nn.functional.dropout(x, 0.5, training=True)
    A, B = lora.lora_A.weight, lora.lora_B.weight
    torch.testing.assert_close(y, x @ base.weight.T + (8 / 4) * ((xd @ A.T) @ B.T), atol=1e-5,
                               rtol=1e-5)


def test_apply_lora_targets_short_names_and_errors():
    model = tiny_llama()
    names = apply_lora(model, targets=["q", "v"], r=4, alpha=8)
    assert names == [
        "layers.0.self_attn.q_proj",
        "layers.0.self_attn.v_proj",
        "layers.1.self_attn.q_proj",
        "layers.1.self_attn.v_proj",
    ]
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.embed_tokens, nn.Embedding)
    with pytest.raises(ValueError, match=r"\['qq_proj'\] match no module"):
        apply_lora(tiny_llama(), targets=["q_proj", "qq_proj"])
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        apply_lora(model, targets=["q"])
    all_names = apply_lora(tiny_llama(), r=2)
    assert len(all_names) == 2 * 7


def test_only_lora_trainable_counts_and_summary():
    model = tiny_llama()
    total_before = sum(p.numel() for p in model.parameters())
    apply_lora(model, r=4, alpha=8)
    mark_only_lora_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters()
                         if ".lora_A." in n or ".lora_B." in n}
    C, Hd, KVd, F = 40, 4 * 10, 2 * 10, 52
    # r·(in + out)
    per_layer = 4 * ((C + Hd) + (C + KVd) + (C + KVd) + (Hd + C) + 2 * (C + F) + (F + C))
    expected = 2 * per_layer
    pct = 100 * expected / (total_before + expected)
    assert parameter_summary(model) == (
        f"trainable params: {expected:,d} || all params: "
        f"{total_before + expected:,d} || trainable%: {pct:.4f}"
    )


def test_base_weights_bit_identical_after_optimizer_steps():
    model = tiny_llama()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, r=4, alpha=8, dropout=0.05)
    mark_only_lora_trainable(model)
    model.train()
    # weight decay on every parameter: frozen ones have no grad, so AdamW must leave them alone
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(3):
        _, loss = model(idx(step), idx(step + 10))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    for k, v in base_state.items():
        key = k.replace("_proj.weight", "_proj.base.weight") if "layers." in k else k
        assert torch.equal(after[key], v), k
    assert all(m.lora_B.weight.abs().sum() > 0 for m in lora_modules(model).values())


def test_merge_unmerge_and_merge_lora_fp32():
    model = tiny_llama()
    w0 = {n: m.weight.clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    apply_lora(model, r=4, alpha=8)
    randomize_lora(model)
    x = idx()
    with torch.no_grad():
        ref, _ = model(x)
        for m in lora_modules(model).values():
            m.merge()
            m.merge()  # a second merge is a no-op (the flag guards against double counting)
        merged, _ = model(x)
        torch.testing.assert_close(merged, ref, atol=1e-5, rtol=0)
        for m in lora_modules(model).values():
            m.unmerge()
        unmerged, _ = model(x)
        torch.testing.assert_close(unmerged, ref, atol=1e-5, rtol=0)
        for name, m in lora_modules(model).items():
            torch.testing.assert_close(m.base.weight, w0[name], atol=1e-6, rtol=0)
        with lora_disabled(model):
            base_logits, _ = model(x)
        assert not torch.allclose(base_logits, ref, atol=1e-3)
        names = merge_lora(model)
        assert len(names) == 14 and not lora_modules(model)
        # a plain layer again
        assert all(type(model.get_submodule(n)) is torch.nn.Linear for n in names)
        assert set(model.state_dict()) == set(tiny_llama().state_dict())
        plain, _ = model(x)
    torch.testing.assert_close(plain, ref, atol=1e-5, rtol=0)


def test_bf16_merge_difference_is_bounded():
    """In bf16, W0 + ΔW rounds to 8 mantissa bits: merged logits differ from the
    adapter's at that level."""
    model = tiny_llama(dtype=torch.bfloat16)
    apply_lora(model, r=4, alpha=8)
    randomize_lora(model)
    x = idx()
    with torch.no_grad():
        ref, _ = model(x)
        merge_lora(model)
        merged, _ = model(x)
    diff = (merged.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    print(f"bf16 merge: max |logit diff| = {diff:.3e} (max |logit| = {scale:.3e})")
    assert 0 < diff < 0.05 * scale


def test_save_load_roundtrip_peft_keys_and_config(tmp_path):
    model = tiny_llama()
    apply_lora(model, targets=["q", "k", "v", "o", "gate", "up", "down"], r=4, alpha=8,
               dropout=0.05)
    randomize_lora(model)
    save_adapter(model, tmp_path, base_model_name_or_path="openlm-research/open_llama_3b_v2")
    state = load_file(str(tmp_path / "adapter_model.safetensors"))
    expected_keys = {
        f"base_model.model.model.layers.{i}.{mod}.{proj}.lora_{ab}.weight"
        for i in range(2)
        for ab in "AB"
        for mod, proj in [("self_attn", p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        + [("mlp", p) for p in ("gate_proj", "up_proj", "down_proj")]
    }
    assert set(state) == expected_keys
    # (r, in)
    assert state["base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight"].shape == (4, 40)
    assert state["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"].shape == (
        20,
        4,
    )  # (out, r)
    assert state["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape == (4, 52)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config == {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "openlm-research/open_llama_3b_v2",
        "revision": None,
        "r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.05,
        "target_modules": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                           "v_proj"],
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    fresh = tiny_llama()  # same seed: the same base weights
    loaded = load_adapter(fresh, tmp_path)
    assert loaded == list(lora_modules(model))
    with torch.no_grad():
        a, _ = model(idx())
        b, _ = fresh(idx())
    assert torch.equal(a, b)


def test_load_adapter_errors_name_file_and_key(tmp_path):
    model = tiny_llama()
    apply_lora(model, targets=["q"], r=4, alpha=8)
    save_adapter(model, tmp_path)
    other = ModelConfig(dim=48, n_layers=2, n_heads=4, hidden_dim=52, vocab_size=71, max_seq_len=32)
    with pytest.raises(
        ValueError,
        match=r"adapter_model.safetensors: 'base_model.model.model.layers.0.self_attn"
        r".q_proj.lora_A.weight' has shape \(4, 40\), expected \(4, 48\)",
    ):
        load_adapter(Llama(other), tmp_path)
    deeper = ModelConfig(dim=40, n_layers=1, n_heads=4, hidden_dim=52, vocab_size=71,
                         max_seq_len=32)
    with pytest.raises(ValueError, match=r"names module 'layers.1.self_attn.q_proj', which "
                                         r"this model"):
        load_adapter(Llama(deeper), tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    state = load_file(str(path))
    state["base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight"] = torch.zeros(1)
    save_file(state, str(path))
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: unexpected key "
                                         r"'.*lora_C.weight'"):
        load_adapter(tiny_llama(), tmp_path)
    del state["base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight"]
    del state["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    save_file(state, str(path))
    with pytest.raises(
        ValueError,
        match=r"'base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight' is "
        r"missing",
    ):
        load_adapter(tiny_llama(), tmp_path)
    cfg_path = tmp_path / "adapter_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "use_dora": "yes"}))
    with pytest.raises(ValueError, match=r"adapter_config.json: use_dora = 'yes' is not supported"):
        load_adapter(tiny_llama(), tmp_path)


def test_qlora_merge_over_nf4_base_matches_lora_on_dequantized_weight():
    # written alongside; present in this repository
    nf4 = pytest.importorskip("minillm.finetune.nf4_linear")
    torch.manual_seed(0)
    dense = nn.Linear(64, 48, bias=False)
    q = nf4.NF4Linear.from_linear(dense, compute_dtype=torch.float32)
    w_hat = q.dequantize(torch.float32)  # (out, in): the weight QLoRA actually computes with
    qlora = LoRALinear(q, r=4, alpha=8)
    nn.init.normal_(qlora.lora_B.weight)
    x = torch.randn(3, 64)
    with torch.no_grad():
        ref = reference_lora(x, w_hat, qlora.lora_A.weight, qlora.lora_B.weight, 8, 4)
        torch.testing.assert_close(qlora(x), ref, atol=1e-4, rtol=1e-4)
        with pytest.raises(TypeError, match="use merge_lora"):
            qlora.merge()
        merged = qlora.to_dense_linear()
        assert type(merged) is torch.nn.Linear and merged.weight.dtype == torch.float32
        torch.testing.assert_close(merged(x), ref, atol=1e-5, rtol=1e-5)
