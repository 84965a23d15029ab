"""NF4Linear against nn.Linear on the dequantized weight (the QLoRA check), the model-wide swap,
state_dict round trips, the double-quantized variant, and double quantization itself
(minillm/finetune/double_quant.py)."""

import pytest
import torch
from torch import nn

from minillm.finetune.double_quant import (
    create_dynamic_map,
    double_dequantize,
    double_quantize,
    dynamic_code,
    quantize_dynamic,
)
from minillm.finetune.nf4_linear import NF4Linear, quantize_model_
from minillm.kernels.nf4 import quantize_nf4

# y = x @ W^T on identical weights: fp32 differs only by summation order,
# bf16 by 2 ulps of the output
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-5), torch.bfloat16: dict(atol=1.3e-1, rtol=1.6e-2)}


def make_linear(in_features, out_features, bias, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)


def dense_twin(layer: NF4Linear, dtype) -> nn.Linear:
    """nn.Linear holding the dequantized weight: what NF4Linear must compute."""
    twin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                     dtype=dtype)
    with torch.no_grad():
        twin.weight.copy_(layer.dequantize(dtype))
        if layer.bias is not None:
            twin.bias.copy_(layer.bias)
    twin.weight.requires_grad_(False)
    return twin


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 24])  # the fused GEMV path and the dequantize + matmul path
@pytest.mark.parametrize("bias", [False, True])
def test_forward_and_input_grad_match_linear(compute_dtype, rows, bias):
    linear = make_linear(129, 37, bias)  # 37*129 weights: blocks straddle rows, odd count
    layer = NF4Linear.from_linear(linear, compute_dtype=compute_dtype)
    twin = dense_twin(layer, compute_dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(rows, 129, generator=g).to(compute_dtype).requires_grad_()
    x_twin = x.detach().clone().requires_grad_()
    grad_y = torch.randn(rows, 37, generator=g).to(compute_dtype)

    y = layer(x)
    y_twin = twin(x_twin)
    assert y.dtype == compute_dtype and y.shape == (rows, 37)
    torch.testing.assert_close(y, y_twin, **TOL[compute_dtype])
    y.backward(grad_y)
    y_twin.backward(grad_y)
    torch.testing.assert_close(x.grad, x_twin.grad, **TOL[compute_dtype])
    assert not any(p.requires_grad for p in layer.parameters())  # frozen: everything is a buffer


def test_dequantized_weight_is_close_to_original():
    linear = make_linear(96, 40, bias=False)
    layer = NF4Linear.from_linear(linear, compute_dtype=torch.float32)
    w = linear.weight.detach()
    absmax = w.reshape(-1, 64).abs().amax(1).repeat_interleave(64).view(w.shape)
    # nearest NF4 code: error at most half the widest code gap (0.1519) times the block absmax
    assert ((layer.dequantize() - w).abs() <= 0.1519 * absmax).all()
    assert layer.dequantize().dtype == torch.float32
    assert layer.dequantize(torch.bfloat16).dtype == torch.bfloat16


def test_input_dtype_is_kept():
    layer = NF4Linear.from_linear(make_linear(64, 16, bias=True))  # computes in bf16
    x = torch.randn(2, 5, 64)
    y = layer(x)
    assert y.dtype == torch.float32 and y.shape == (2, 5, 16)
    expect = dense_twin(layer, torch.bfloat16)(x.to(torch.bfloat16)).float()
    torch.testing.assert_close(y, expect, **TOL[torch.bfloat16])


def test_from_weight_matches_quantize_nf4():
    w = torch.randn(33, 70, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    layer = NF4Linear.from_weight(w)
    packed, absmax = quantize_nf4(w)
    assert torch.equal(layer.packed, packed) and torch.equal(layer.absmax, absmax)
    assert (layer.out_features, layer.in_features) == (33, 70)
    assert "blocksize=64" in repr(layer) and "double_quant=False" in repr(layer)
    with pytest.raises(ValueError, match="2-D"):
        NF4Linear.from_weight(torch.randn(4, 4, 4))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.ModuleDict({"q_proj": nn.Linear(32, 32, bias=False),
                                   "o_proj": nn.Linear(32, 32)})
        self.mlp = nn.Sequential(nn.Linear(32, 80, bias=False), nn.SiLU(),
                                 nn.Linear(80, 32, bias=False))

    def forward(self, x):
        x = x + self.attn["o_proj"](self.attn["q_proj"](x))
        return x + self.mlp(x)


def test_quantize_model_swaps_nested_linears():
    torch.manual_seed(3)
    model = nn.Sequential(Block(), Block(), nn.LayerNorm(32))
    model.lm_head = nn.Linear(32, 50, bias=False)
    dense_before = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    n_swapped = quantize_model_(model, compute_dtype=torch.float32)
    assert n_swapped == 8  # 4 per block, lm_head skipped
    assert isinstance(model.lm_head, nn.Linear)
    assert isinstance(model[0].attn["q_proj"], NF4Linear) and isinstance(model[1].mlp[2], NF4Linear)
    assert model[0].attn["o_proj"].bias is not None
    # the old dense weights were released
    assert all(m.weight is None for n, m in dense_before.items() if n != "lm_head")

    # the quantized model computes what a dense model on the dequantized weights computes
    twin = nn.Sequential(Block(), Block(), nn.LayerNorm(32))
    twin.load_state_dict(model.state_dict(), strict=False)
    for name, module in model.named_modules():
        if isinstance(module, NF4Linear):
            twin.get_submodule(name).weight.data.copy_(module.dequantize())
            if module.bias is not None:
                twin.get_submodule(name).bias.data.copy_(module.bias)
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(model[:3](x), twin(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("double_quant", [False, True])
def test_state_dict_round_trip(double_quant):
    layer = NF4Linear.from_linear(make_linear(100, 21, bias=True), double_quant=double_quant)
    state = layer.state_dict()
    scale_keys = {"qabsmax", "absmax_scales", "absmax_offset"} if double_quant else {"absmax"}
    expect_keys = {"packed", "bias"} | scale_keys
    assert set(state) == expect_keys
    fresh = NF4Linear(100, 21, bias=True, double_quant=double_quant)
    fresh.load_state_dict(state)
    for key in state:
        assert torch.equal(fresh.state_dict()[key], state[key])
    x = torch.randn(3, 100, generator=torch.Generator().manual_seed(5))
    assert torch.equal(fresh(x), layer(x))
    assert torch.equal(layer.to("cpu")(x), layer(x))
    with pytest.raises(TypeError, match="float32"):
        layer.to(torch.bfloat16)(x)  # casting rounds the scales: refused, not silently degraded


def test_double_quant_variant():
    # 320 NF4 blocks: two double-quant blocks, one partial
    linear = make_linear(256, 80, bias=False)
    plain = NF4Linear.from_linear(linear, compute_dtype=torch.float32)
    dq = NF4Linear.from_linear(linear, double_quant=True, compute_dtype=torch.float32)
    # same codes; only the scales are stored differently
    assert torch.equal(dq.packed, plain.packed)
    assert (dq.qabsmax.dtype == torch.uint8 and dq.absmax_scales.shape == (2,)
            and dq.absmax_offset.dim() == 0)
    # scales come back within half a dynamic-map step (0.00704) of the block's double-quant scale
    err = (dq.absmax_f32() - plain.absmax).abs()
    assert (err <= 0.00704 * dq.absmax_scales.repeat_interleave(256)[:320] + 1e-7).all()
    # so the dequantized weights differ by at most that relative error times |code| <= 1
    w_err = (dq.dequantize() - plain.dequantize()).abs().view(-1, 64).amax(1)
    assert (w_err <= err * 1.0001 + 1e-7).all()
    twin = dense_twin(dq, torch.float32)
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(dq(x), twin(x), **TOL[torch.float32])
    # bits per weight: 4 + 8/64 + 32 per 64*256 weights (one scale; here a partial second one +
    # offset), i.e. 4.127 for a large weight
    bits = (dq.packed.numel() * 8 + dq.qabsmax.numel() * 8
            + (dq.absmax_scales.numel() + 1) * 32) / (256 * 80)
    assert bits == 4 + 8 / 64 + 3 * 32 / (256 * 80)
    assert 4 + 8 / 64 + 32 / (64 * 256) == pytest.approx(4.127, abs=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 24])
def test_custom_ops_pass_opcheck(dtype, rows):
    # torch.library.opcheck checks the schema, the fake (shape-only) functions torch.compile uses,
    # and that the registered backward agrees with what autograd sees
    from minillm.finetune.nf4_linear import nf4_grad_x_op, nf4_linear_op

    layer = NF4Linear.from_linear(make_linear(129, 37, bias=False), compute_dtype=dtype)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(rows, 129, generator=g).to(dtype).requires_grad_()
    grad_y = torch.randn(rows, 37, generator=g).to(dtype)
    torch.library.opcheck(nf4_linear_op, (x, layer.packed, layer.absmax, 37, 129, 64))
    torch.library.opcheck(nf4_grad_x_op, (grad_y, layer.packed, layer.absmax, 37, 129, 64))


def tiny_qlora_model():
    from minillm.config import ModelConfig
    from minillm.finetune.adapters import apply_lora, mark_only_lora_trainable
    from minillm.model import Llama

    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                              hidden_dim=96, max_seq_len=32))
    quantize_model_(model, compute_dtype=torch.float32, double_quant=True)
    apply_lora(model, r=4, alpha=8, dropout=0.0)
    mark_only_lora_trainable(model)
    for module in model.modules():  # B starts at zero: make the adapters do something
        if hasattr(module, "lora_B"):
            nn.init.normal_(module.lora_B.weight, std=0.02)
    return model


def test_compiled_nf4_decode_step_has_no_graph_break():
    # generate.py --quantize nf4 --compile: the NF4 matmul must not break torch.compile's graph
    from minillm.generate.decode import decode_one_token, prefill

    model = tiny_qlora_model().eval()
    model.setup_caches(1, 8)
    with torch.no_grad():
        tok = prefill(model, torch.tensor([[1, 5, 9]]), torch.arange(3)).argmax(-1, keepdim=True)
        eager = decode_one_token(model, tok, torch.tensor([3]))
        compiled = torch.compile(decode_one_token, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(model, tok, torch.tensor([3])), eager, atol=1e-6,
                                   rtol=1e-6)


def test_compiled_qlora_training_step_matches_eager():
    # a QLoRA step under torch.compile (training.compile = true) goes
    # through the registered backward
    model = tiny_qlora_model().train()
    idx = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    _, loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    _, loss_c = torch.compile(model, backend="aot_eager", fullgraph=True)(idx[:, :-1], idx[:, 1:])
    loss_c.backward()
    torch.testing.assert_close(loss_c, loss, atol=1e-6, rtol=1e-6)
    assert eager and all(torch.allclose(p.grad, eager[n], atol=1e-6)
                         for n, p in model.named_parameters() if p.requires_grad)


# --------------------------------------------------------------------------------------------------
# Double quantization


def test_dynamic_map_known_entries():
    code = create_dynamic_map()
    assert code.dtype == torch.float32 and code.numel() == 256
    assert (code[1:] > code[:-1]).all()  # sorted, no duplicates
    assert code[127].item() == 0.0 and code[255].item() == 1.0
    assert torch.equal(code[:127], -code[128:255].flip(0))  # symmetric apart from 0 and 1.0
    # decade 1e-6 holds one value, the middle of [0.1, 1];
    # decade 1e-5 two: middles of [0.1, 0.55, 1]
    assert code[128].item() == pytest.approx(0.55e-6, rel=1e-6)
    assert code[129].item() == pytest.approx(3.25e-6, rel=1e-6)
    assert code[130].item() == pytest.approx(7.75e-6, rel=1e-6)
    # the top decade holds 64 values, the middles of linspace(0.1, 1, 65): the last is
    # (0.9859375 + 1) / 2
    assert code[254].item() == pytest.approx(0.99296875, rel=1e-6)
    assert code[253].item() == pytest.approx(0.97890625, rel=1e-6)
    assert code[0].item() == pytest.approx(-0.99296875, rel=1e-6)


def test_dynamic_quantize_is_nearest():
    code = create_dynamic_map()
    x = torch.rand(20000, generator=torch.Generator().manual_seed(5)) * 2 - 1
    x[:6] = torch.tensor([0.0, 1.0, -1.0, 0.55e-6, -1e-9, 0.996])
    q = quantize_dynamic(x, code).long()
    dist = (x[:, None] - code[None, :]).abs()
    assert torch.equal(dist.gather(1, q[:, None])[:, 0], dist.min(dim=1).values)
    assert q[:4].tolist() == [127, 255, 0, 128]


def test_double_quant_roundtrip():
    g = torch.Generator().manual_seed(6)
    absmax = torch.rand(1000, generator=g) * 0.2 + 0.01  # 4 blocks of 256, the last partial
    qabsmax, scales, offset = double_quantize(absmax)
    assert qabsmax.dtype == torch.uint8 and qabsmax.shape == (1000,)
    assert scales.dtype == torch.float32 and scales.shape == (4,)
    assert (offset.dtype == torch.float32
            and offset.item() == pytest.approx(absmax.mean().item(), rel=1e-6))
    back = double_dequantize(qabsmax, scales, offset)
    # the widest gap of the dynamic map is 0.9930 - 0.9789 = 0.01406:
    # error <= half of it times the scale
    bound = 0.00704 * scales.repeat_interleave(256)[:1000] + 1e-7
    assert ((back - absmax).abs() <= bound).all()
    # one multiply then one add, in float32
    code = create_dynamic_map()
    assert back[300].item() == (code[qabsmax[300].long()] * scales[1] + offset).item()


def test_double_quant_constant_block_is_exact():
    # centred values all 0: scale 0, NaN -> code 0, back to offset
    absmax = torch.full((300,), 0.125)
    back = double_dequantize(*double_quantize(absmax))
    assert torch.equal(back, absmax)


def test_dynamic_map_is_made_once_per_device():
    # NF4Linear dequantizes its scales on every forward: a host-to-device copy
    # per call would stall the GPU
    assert dynamic_code() is dynamic_code("cpu") is dynamic_code(torch.device("cpu"))
    assert torch.equal(dynamic_code(), create_dynamic_map()) and dynamic_code()[127].item() == 0.0
