"""Int8Linear (the LLM.int8 base layer) against the kernels' reference, its gradient through the
dequantized weight, quantize-on-load, an 8-bit LoRA / DoRA run through the training loop
(alpaca-lora's recipe: finetune.method = "lora8"), the merge into exactly the int8-rounded base,
the base_quantization.json record, and `generate.py --quantize int8` end to end."""

import json

import pytest
import torch
from test_train import alpaca_file, tiny_cfg
from tiny import script, stdlib_texts, tiny_tokenizer, write_hf_checkpoint
from torch import nn

from minillm import Int8Linear, Llama, dequantize_int8, int8_hook, load_pretrained, quantize_int8
from minillm.config import ModelConfig
from minillm.finetune.dora import DoRALinear
from minillm.finetune.lora import LoRALinear
from minillm.finetune.peft_io import BASE_QUANTIZATION, read_base_quantization
from minillm.kernels.int8_matmul import int8_matmul_ref
from minillm.ship.convert import ExportConfig, export
from minillm.training.config import load_config
from minillm.training.loop import train


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("int8_base")
    tok = tiny_tokenizer(d / "tokenizer.model")
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, vocab_size=tok.vocab_size,
                      max_seq_len=64)
    write_hf_checkpoint(d, cfg, seed=3, fmt="safetensors", tokenizer=tok)
    return d


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """What test_train's tiny configs point at: a corpus, a tokenizer, a cache folder."""
    d = tmp_path_factory.mktemp("int8_assets")
    (d / "corpus.txt").write_text("\n\n".join(stdlib_texts()))
    tok = tiny_tokenizer(d / "tok.model")
    return dict(corpus=str(d / "corpus.txt"), tokenizer=str(tok.path), cache=str(d / "cache"))


def test_forward_is_the_int8_matmul_and_backward_the_dequantized_weight():
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(48, 20, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(20, 48, generator=g) * 0.1)
    layer = Int8Linear.from_linear(linear, threshold=6.0, compute_dtype=torch.float32)
    CB, SCB = quantize_int8(linear.weight)
    assert torch.equal(layer.CB, CB) and torch.equal(layer.SCB, SCB)
    x = torch.randn(2, 5, 48, generator=g)
    x[..., 3] = 9.0  # an outlier column
    x.requires_grad_(True)
    y = layer(x)
    assert torch.equal(y, int8_matmul_ref(x.detach(), CB, SCB, 6.0, layer.bias))
    grad_y = torch.randn(2, 5, 20, generator=g)
    y.backward(grad_y)
    assert torch.equal(x.grad, grad_y @ dequantize_int8(CB, SCB))
    assert layer.dequantize(torch.float32).shape == (20, 48) and not list(layer.parameters())


def test_state_dict_round_trip_and_a_cast_model_refuses():
    layer = Int8Linear.from_weight(torch.randn(7, 33), bias=torch.randn(7), threshold=0.0)
    fresh = Int8Linear(33, 7, bias=True, threshold=0.0)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(3, 33)
    assert torch.equal(fresh(x), layer(x))
    assert sorted(layer.state_dict()) == ["CB", "SCB", "bias"]
    layer.half()
    with pytest.raises(TypeError, match="SCB is torch.float16, not float32"):
        layer(x)
    with pytest.raises(ValueError, match="NaN or inf"):
        Int8Linear.from_weight(torch.tensor([[1.0, float("inf")]]))
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        Int8Linear(4, 4, threshold=-1.0)


def test_quantize_on_load_matches_from_weight(base):
    dense = load_pretrained(base)
    q = load_pretrained(base, linear_hook=int8_hook(threshold=6.0, compute_dtype=torch.float32))
    swapped = [n for n, m in q.named_modules() if isinstance(m, Int8Linear)]
    assert len(swapped) == 2 * 7 and isinstance(q.lm_head, nn.Linear)
    for name in swapped:
        w = dense.get_submodule(name).weight
        assert torch.equal(q.get_submodule(name).CB, quantize_int8(w)[0]), name
    idx = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():  # close to the dense model: int8 weights and activations
        torch.testing.assert_close(q(idx)[0], dense(idx)[0], atol=5e-2, rtol=0)


def test_dora_over_an_int8_base_uses_the_dequantized_norm():
    layer = Int8Linear.from_weight(torch.randn(12, 40), compute_dtype=torch.float32)
    dora = DoRALinear(layer, r=2, alpha=4)
    torch.testing.assert_close(dora.lora_magnitude_vector,
                               torch.linalg.norm(layer.dequantize(torch.float32), dim=1))


def test_lora8_trains_exports_the_int8_base_and_generates(assets, base, tmp_path, capsys,
                                                           monkeypatch):
    # alpaca-lora's recipe on a tiny base: LoRA (DoRA here, to cover both) over an LLM.int8 base.
    # The layers take the PyTorch reference path (the kernels are checked against it in
    # test_int8_kernels.py): the interpreter would spend seconds per step here.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cfg = tiny_cfg(assets, tmp_path / "run", init_from=str(base), finetune__method="lora8",
                   finetune__lora_r=4, finetune__use_dora=True,
                   finetune__lora_targets=["q_proj", "v_proj", "down_proj"],
                   data__format="instruct", data__tokenizer="",
                   data__corpus=str(alpaca_file(tmp_path / "alpaca.jsonl")), data__val_frac=0.2,
                   block_size=48, schedule__total_steps=3, eval__interval=0,
                   eval__sample_tokens=0, checkpoint__interval=0)
    result = train(cfg)
    model = result.model
    q_proj = model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, LoRALinear) and isinstance(q_proj.base, Int8Linear)
    assert isinstance(model.layers[0].mlp.gate_proj, Int8Linear)  # quantized, not adapted
    assert q_proj.base.threshold == 6.0
    assert all(map(torch.isfinite, torch.tensor(list(result.losses.values()))))
    adapter = tmp_path / "run" / "adapter"
    assert read_base_quantization(adapter) == {"quant_method": "int8", "threshold": 6.0}

    # the merge exports W_hat + ΔW, W_hat the int8-rounded weight the adapter trained on
    out = export(ExportConfig(checkpoint=str(base), adapter=str(adapter), format="hf",
                              outtype="f32", out=str(tmp_path / "merged")))
    merged = Llama.from_pretrained(out)
    w = load_pretrained(base).layers[1].self_attn.v_proj.weight
    expect = model.layers[1].self_attn.v_proj.merged_weight()  # s ⊙ (W_hat + ΔW), DoRA
    assert torch.equal(model.layers[1].self_attn.v_proj.base.CB, quantize_int8(w)[0])
    torch.testing.assert_close(merged.layers[1].self_attn.v_proj.weight, expect, atol=1e-6,
                               rtol=0)
    # a projection without an adapter is exported as its dequantized int8 weight
    assert torch.equal(merged.layers[0].mlp.up_proj.weight,
                       dequantize_int8(*quantize_int8(load_pretrained(base).layers[0]
                                                      .mlp.up_proj.weight)))

    # generate.py --quantize int8 on the base, greedy, end to end
    capsys.readouterr()
    script("generate").main(["--checkpoint", str(base), "--quantize", "int8", "--prompt",
                             "def f(x):", "--temperature", "0", "--max-new-tokens", "6"])
    got = capsys.readouterr()
    assert got.out.startswith("def f(x):") and "decode:" in got.err


def test_export_flags_and_records(base, tmp_path):
    with pytest.raises(ValueError, match="exclude each other"):
        ExportConfig(checkpoint=str(base), out="x.gguf", adapter="a", qlora=True, int8=True)
    with pytest.raises(ValueError, match="int8=True needs an adapter"):
        ExportConfig(checkpoint=str(base), out="x.gguf", int8=True)
    record = tmp_path / BASE_QUANTIZATION
    record.write_text(json.dumps({"quant_method": "nf4", "blocksize": 64, "double_quant": False}))
    from minillm.ship.convert import base_quantization

    with pytest.raises(ValueError, match="trained on a nf4 base, but --int8 says int8"):
        base_quantization(ExportConfig(checkpoint=str(base), out="x.gguf", adapter=str(tmp_path),
                                       int8=True))
    record.write_text(json.dumps({"quant_method": "int8", "threshold": -1}))
    with pytest.raises(ValueError, match=r"base_quantization.json: expected"):
        read_base_quantization(tmp_path)


def test_config_names_and_checks():
    cfg = load_config(overrides={"finetune.method": "lora8", "finetune.int8_threshold": 0.0})
    assert cfg.finetune.method == "lora8" and cfg.finetune.int8_threshold == 0.0
    with pytest.raises(ValueError, match=r"'full', 'lora', 'qlora', 'lora8'"):
        load_config(overrides={"finetune.method": "int8"})
    with pytest.raises(ValueError, match="int8_threshold must be >= 0 and finite"):
        load_config(overrides={"finetune.int8_threshold": float("nan")})
