"""The chunked loss against the plain one: F.cross_entropy over the full (B, T, V) logits.

Values and every gradient (hidden states, a trained lm_head, LoRA factors on lm_head, the whole
model through token_loss_sum), with chunks that divide the rows, that do not, of one row, and a
batch whose every target is -100; float64 where the two must agree to rounding, float32 and bf16
autocast where they must agree to the dtype's precision.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minillm.config import ModelConfig
from minillm.finetune.adapters import apply_lora
from minillm.model import Llama
from minillm.training.loss import IGNORE, chunked_cross_entropy, token_loss_sum


def plain(head, h, targets):
    logits = head(h)  # (B, T, V)
    logits = logits.float() if logits.dtype == torch.bfloat16 else logits
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


def case(dtype=torch.float64, V=37, C=12, B=3, T=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(C, V, bias=False).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, C, generator=g, dtype=dtype))
    h = torch.randn(B, T, C, generator=g, dtype=dtype, requires_grad=True)
    targets = torch.randint(V, (B, T), generator=g)
    targets[0, :4] = IGNORE  # a prompt
    targets[-1, -3:] = IGNORE  # padding
    return head, h, targets


def grads(fn, head, h, targets):
    head.zero_grad()
    h.grad = None
    loss = fn(head, h, targets)
    loss.backward()
    weight_grads = [p.grad.clone() for p in head.parameters() if p.requires_grad]
    return loss.detach(), h.grad.clone(), weight_grads


@pytest.mark.parametrize("chunk_elements", [37, 37 * 4, 37 * 5, 37 * 1000])
@pytest.mark.parametrize("train_head", [True, False])
def test_fused_linear_matches_the_plain_loss(chunk_elements, train_head):
    head, h, targets = case()
    head.weight.requires_grad_(train_head)
    want = grads(plain, head, h, targets)
    got = grads(lambda *a: chunked_cross_entropy(*a, chunk_elements=chunk_elements),
                head, h, targets)
    assert got[0].dtype == torch.float64 and len(got[2]) == int(train_head)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=1e-12)
    for a, b in zip(got[2], want[2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_a_wrapped_head_is_checkpointed_chunk_by_chunk():
    """LoRA on lm_head: the factors' gradients equal the plain loss's, chunks recomputed in
    backward."""
    head, h, targets = case()

    class Holder(nn.Module):  # apply_lora replaces children by name
        def __init__(self):
            super().__init__()
            self.lm_head = head

    holder = Holder()
    apply_lora(holder, targets=("lm_head",), r=4, alpha=8)
    lora = holder.double().lm_head
    assert type(lora) is not nn.Linear
    with torch.no_grad():
        for p in lora.parameters():
            if p.requires_grad:
                p.normal_(generator=torch.Generator().manual_seed(3))
    want = grads(plain, lora, h, targets)
    got = grads(lambda *a: chunked_cross_entropy(*a, chunk_elements=37 * 4), lora, h, targets)
    assert len(got[2]) == 2
    for a, b in zip((got[0], got[1], *got[2]), (want[0], want[1], *want[2]), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_no_target_gives_a_zero_that_still_backpropagates():
    head, h, targets = case()
    targets[:] = IGNORE
    loss = chunked_cross_entropy(head, h, targets)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(h.grad, torch.zeros_like(h)) and not head.weight.grad.any()


def test_without_grad_it_is_the_same_number():
    head, h, targets = case()
    with torch.no_grad():
        torch.testing.assert_close(chunked_cross_entropy(head, h, targets, chunk_elements=37 * 2),
                                   plain(head, h, targets), rtol=1e-12, atol=1e-12)


def test_float32_and_bf16_autocast_agree_to_their_precision():
    head, h, targets = case(torch.float32, V=300, C=32, B=2, T=40, seed=1)
    want = grads(plain, head, h, targets)
    got = grads(lambda *a: chunked_cross_entropy(*a, chunk_elements=300 * 7), head, h, targets)
    for a, b in zip((got[0], got[1], *got[2]), (want[0], want[1], *want[2]), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = grads(plain, head, h, targets)
        got = grads(lambda *a: chunked_cross_entropy(*a, chunk_elements=300 * 7),
                    head, h, targets)
    torch.testing.assert_close(got[0], want[0], rtol=2e-3, atol=0)
    for a, b in zip((got[1], *got[2]), (want[1], *want[2]), strict=True):
        torch.testing.assert_close(a, b, rtol=0.02, atol=0.02 * b.abs().max().item())


@pytest.mark.parametrize("tie", [False, True])
def test_the_model_loss_and_every_gradient_match_the_logits_path(tie):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                      max_seq_len=16, tie_embeddings=tie)
    model = Llama(cfg).double()
    x = torch.randint(97, (2, 16))
    y = torch.roll(x, -1, 1)
    y[:, :5] = IGNORE

    def step(loss_of):
        model.zero_grad()
        loss = loss_of()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    want = step(lambda: F.cross_entropy(model(x)[0].view(-1, 97), y.view(-1),
                                        ignore_index=IGNORE, reduction="sum"))
    got = step(lambda: token_loss_sum(model, x, y))
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    assert got[1].keys() == want[1].keys()
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], rtol=1e-10, atol=1e-12,
                                   msg=name)
    # the model's own mean loss is the plain one, untouched
    mean = model(x, y)[1]
    torch.testing.assert_close(mean.double() * (y != IGNORE).sum(), want[0], rtol=1e-6, atol=0)


def test_backward_keeps_no_logits():
    """Nothing autograd saves for backward is as large as one chunk of logits, let alone (B, T,
    V): the fused path keeps the gradients (N, C) and (V, C) only."""
    V, C, B, T = 4096, 8, 4, 64
    head, h, targets = case(torch.float32, V=V, C=C, B=B, T=T)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = chunked_cross_entropy(head, h, targets, chunk_elements=V * 16)
    loss.backward()
    assert sizes and max(sizes) <= V * C < V * 16 < B * T * V
