"""generate/fast_linear.py: the batch-1 CPU GEMV split over the threads, as a module swap,
computes what nn.Linear computes (values and gradients), takes its bmm path exactly when it
should, and decodes a model to the full forward's logits; the swap keeps the parameters (and
a tied lm_head) shared."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from minillm.config import ModelConfig
from minillm.generate.fast_linear import RowSplitLinear, use_row_split_linears
from minillm.model import Llama


class CountOps(TorchDispatchMode):
    """Counts the aten ops run inside the `with` block, by name (e.g. "bmm", "mm")."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("shape", [(1, 1, 64), (1, 64), (64,)])
def test_linear_one_row_splits_over_threads(split_every_gemv, shape):
    torch.manual_seed(0)
    layer = RowSplitLinear(64, 96, bias=False)  # 96 rows = 4 chunks of 24 on 2 threads
    x = torch.randn(shape)
    with CountOps() as ops, torch.no_grad():
        y = layer(x)
    assert ops.counts.get("bmm") == 1 and "mm" not in ops.counts
    assert y.shape == (*shape[:-1], 96)
    torch.testing.assert_close(y, F.linear(x, layer.weight), atol=1e-6, rtol=0)


@pytest.mark.parametrize("rows, n_in, n_out, bias", [(2, 64, 96, False), (1, 64, 90, False),
                                                     (1, 64, 96, True)])
def test_linear_keeps_f_linear_otherwise(split_every_gemv, rows, n_in, n_out, bias):
    # several rows (prefill, training), rows not divisible into 4 chunks, or a bias: plain F.linear
    torch.manual_seed(0)
    layer = RowSplitLinear(n_in, n_out, bias=bias)
    x = torch.randn(rows, n_in)
    with CountOps() as ops, torch.no_grad():
        y = layer(x)
    assert "bmm" not in ops.counts
    torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias), atol=0, rtol=0)


def test_linear_split_is_differentiable(split_every_gemv):
    torch.manual_seed(0)
    layer = RowSplitLinear(64, 96, bias=False)
    x = torch.randn(1, 64, requires_grad=True)
    layer(x).square().sum().backward()
    gx, gw = x.grad.clone(), layer.weight.grad.clone()
    x.grad, layer.weight.grad = None, None
    F.linear(x, layer.weight).square().sum().backward()
    torch.testing.assert_close(gx, x.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(gw, layer.weight.grad, atol=1e-5, rtol=0)


def test_batch1_decoding_with_split_gemvs_equals_full_forward(split_every_gemv):
    torch.manual_seed(0)
    cfg = ModelConfig(dim=96, n_layers=3, n_heads=6, n_kv_heads=2, hidden_dim=200, vocab_size=131,
                      max_seq_len=64, rope_theta=500000.0)
    model = Llama(cfg).eval()
    assert use_row_split_linears(model) == 7 * cfg.n_layers + 1  # every projection, and lm_head
    idx = torch.randint(0, cfg.vocab_size, (1, 12))
    with torch.inference_mode():
        full, _ = model(idx)
        model.setup_caches(batch_size=1, max_seq_len=16)
        steps = [model(idx[:, :5], input_pos=torch.arange(5))[0]]
        with CountOps() as ops:
            for t in range(5, 12):
                steps.append(model(idx[:, t:t + 1], input_pos=torch.tensor([t]))[0])
    # every projection of every layer at every step; lm_head's 131 rows do not split into 4 chunks
    assert ops.counts["bmm"] == 7 * 7 * cfg.n_layers, ops.counts
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_swap_shares_parameters_and_keeps_the_tie():
    cfg = ModelConfig(dim=48, n_layers=1, n_heads=3, hidden_dim=80, vocab_size=61, max_seq_len=32,
                      tie_embeddings=True)
    model = Llama(cfg)
    before = {n: p for n, p in model.named_parameters()}
    use_row_split_linears(model)
    assert isinstance(model.layers[0].mlp.up_proj, RowSplitLinear)
    assert {n: p for n, p in model.named_parameters()} == before  # the very same Parameter objects
    assert model.lm_head.weight is model.embed_tokens.weight
