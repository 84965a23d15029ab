"""minillm/training/muon.py against slow obvious versions: Newton–Schulz as a polynomial of the
singular values, the AdamW groups against torch.optim.AdamW, one Muon step written out by hand."""

import copy
import math

import pytest
import torch

from minillm.config import ModelConfig
from minillm.model import Llama
from minillm.training.config import OptimConfig
from minillm.training.muon import NS_COEFFICIENTS, muon_adamw, newton_schulz


@pytest.mark.parametrize("shape", [(37, 91), (91, 37), (64, 64)])
def test_newton_schulz_maps_singular_values_by_its_polynomial(shape):
    """X ← aX + (bA + cA²)X with A = XXᵀ keeps the singular vectors and maps each singular
    value s to a·s + b·s³ + c·s⁵, five times, starting from s / ‖G‖_F: the reference does
    exactly that, in float64."""
    G = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    s = S / (G.norm() + 1e-7)
    a, b, c = NS_COEFFICIENTS
    for _ in range(5):
        s = a * s + b * s**3 + c * s**5
    expected = U @ torch.diag(s) @ Vh
    got = newton_schulz(G.float())
    assert got.dtype == torch.float32 and got.shape == shape
    torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=0)
    # every direction gets a step of about the same size; only a singular value near 0 (the square
    # Gaussian matrix has one) stays small after 5 steps
    assert s.max() < 1.25 and (s > 0.6).float().mean() > 0.95


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return Llama(ModelConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=48, vocab_size=50,
                             max_seq_len=16))


def set_grads(model, seed):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def test_groups_and_adamw_path_match_torch_adamw():
    """Hidden matrices are Muon's; embeddings / lm_head (decayed) and norms (not decayed) follow
    AdamW exactly as torch.optim.AdamW does, over three steps."""
    ours_model, ref_model = tiny_model(), tiny_model()
    ours = muon_adamw(ours_model, 0.1, 3e-3, (0.9, 0.95), 1e-8)
    muon_names = {n for n, p in ours_model.named_parameters()
                  if any(p is q for q in ours.param_groups[0]["params"])}
    assert ours.param_groups[0]["muon"] and len(muon_names) == 2 * 7
    assert all(n.startswith("layers.") and n.endswith("_proj.weight") for n in muon_names)
    decay = [p for n, p in ref_model.named_parameters() if p.dim() >= 2 and n not in muon_names]
    no_decay = [p for p in ref_model.parameters() if p.dim() < 2]
    ref = torch.optim.AdamW([dict(params=decay, weight_decay=0.1),
                             dict(params=no_decay, weight_decay=0.0)],
                            lr=3e-3, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    for step in range(3):
        set_grads(ours_model, step)
        set_grads(ref_model, step)
        ours.step()
        ref.step()
    ref_params = dict(ref_model.named_parameters())
    for name, p in ours_model.named_parameters():
        if name not in muon_names:
            torch.testing.assert_close(p, ref_params[name], atol=1e-6, rtol=1e-6, msg=name)


def test_one_muon_step_by_hand():
    """Step 1: M = (1−β)G, U = G + β(M − G) = (1 − β²)G;
    W ← W(1 − lr·wd) − lr·0.2·√max(out, in)·NS(U)."""
    model = tiny_model()
    opt = muon_adamw(model, 0.1, 3e-3, (0.9, 0.95), 1e-8)
    w = model.layers[0].mlp.up_proj.weight  # (48, 32)
    before = w.detach().clone()
    set_grads(model, 7)
    G = w.grad.clone()
    opt.step()
    beta, lr = 0.95, 3e-3
    expected = before * (1 - lr * 0.1) - lr * 0.2 * math.sqrt(48) * newton_schulz((1 - beta**2) * G)
    torch.testing.assert_close(w.detach(), expected, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(opt.state[w]["momentum"], (1 - beta) * G)


def test_state_dict_round_trip_continues_identically():
    a_model, b_model = tiny_model(), tiny_model()
    a = muon_adamw(a_model, 0.1, 3e-3, (0.9, 0.95), 1e-8)
    set_grads(a_model, 0)
    a.step()
    b_model.load_state_dict(a_model.state_dict())
    b = muon_adamw(b_model, 0.1, 3e-3, (0.9, 0.95), 1e-8)
    # as through a checkpoint file: no shared buffers
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for opt, model in ((a, a_model), (b, b_model)):
        set_grads(model, 1)
        opt.step()
    for (n, p), q in zip(a_model.named_parameters(), b_model.parameters(), strict=True):
        assert torch.equal(p, q), n


def test_unknown_optimizer_name_is_refused_and_auto_picks_by_the_run():
    with pytest.raises(ValueError, match=r"optim.name must be \"auto\", \"adamw\", \"adamw8bit\" "
                                         r"or \"muon\", found 'sgd'"):
        OptimConfig(name="sgd")
    from minillm.training.config import load_config

    assert load_config().optimizer == "muon"  # the main job, from scratch
    tune = load_config(overrides={"init_from": "out/tiny", "finetune.method": "lora"})
    assert tune.optim.name == "auto" and tune.optimizer == "adamw"  # fine-tuning: PEFT's AdamW
    assert load_config(overrides={"optim.name": "muon", "init_from": "x"}).optimizer == "muon"


@pytest.mark.parametrize("shape", [(5, 37, 91), (3, 91, 37)])
def test_newton_schulz_of_a_stack_is_each_matrix_alone(shape):
    G = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    got = newton_schulz(G)
    for i in range(shape[0]):
        torch.testing.assert_close(got[i], newton_schulz(G[i]), atol=1e-6, rtol=0)


def test_stack_size_cap_gives_the_same_step(monkeypatch):
    # same-shape matrices go through Newton–Schulz together; a cap of one matrix per stack is the
    # per-matrix loop, and must give the same parameters
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, n_layers=3, n_heads=2, hidden_dim=64, vocab_size=50, max_seq_len=16)
    a_model = Llama(cfg)
    b_model = copy.deepcopy(a_model)
    x = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    for model, cap in ((a_model, 1 << 26), (b_model, 1)):
        monkeypatch.setattr("minillm.training.muon.MuonAdamW.STACK_ELEMENTS", cap)
        opt = muon_adamw(model, 0.1, 3e-3, (0.9, 0.95), 1e-8)
        for _ in range(2):
            model(x[:, :-1], x[:, 1:])[1].backward()
            opt.step()
            opt.zero_grad()
    for (name, pa), pb in zip(a_model.named_parameters(), b_model.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=0, msg=name)
