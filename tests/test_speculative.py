"""Speculative decoding: greedy output equals the target alone (draft agreeing always, never,
sometimes), and the rejection rule keeps the target's distribution, checked statistically on a
6-token vocabulary with a bound that a wrong rule fails."""

import pytest
import torch

from minillm.config import ModelConfig
from minillm.generate.decode import GenerationStats, generate_tokens
from minillm.generate.sampling import SamplingConfig
from minillm.generate.speculative import speculative_accept, speculative_generate_tokens
from minillm.model import Llama

V = 40


def tiny(seed, dim=32, n_layers=2):
    torch.manual_seed(seed)
    cfg = ModelConfig(dim=dim, n_layers=n_layers, n_heads=4, n_kv_heads=2, hidden_dim=64,
                      vocab_size=V, max_seq_len=64)
    return Llama(cfg).eval()


@pytest.fixture(scope="module")
def target():
    return tiny(0)


def perturbed(model, scale, seed=1):
    """A copy of `model` with Gaussian noise of relative size `scale` on every weight: a draft that
    agrees with the target on some tokens and not on others."""
    other = Llama(model.config).eval()
    other.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * p.std() * torch.randn(p.shape, generator=g))
    return other


@pytest.mark.parametrize("k", [1, 4])
def test_greedy_equals_target_alone(target, k):
    prompt = [1, 5, 9, 3]
    cfg = SamplingConfig(max_new_tokens=25, temperature=0.0)
    alone = list(generate_tokens(target, prompt, cfg))
    drafts = {"itself": target, "unrelated": tiny(7, dim=16, n_layers=1),
              "close": perturbed(target, 0.6)}
    rates = {}
    for name, draft in drafts.items():
        stats = GenerationStats()
        assert list(speculative_generate_tokens(target, draft, prompt, cfg, k=k,
                                                stats=stats)) == alone, name
        assert stats.new_tokens == 25
        rates[name] = stats.accepted / stats.drafted
    assert rates["itself"] == 1.0 and rates["unrelated"] < 0.2 and 0.0 < rates["close"] < 1.0


def test_greedy_stops_at_eos_and_at_the_cache_end(target):
    prompt = [1, 5, 9, 3]
    cfg = SamplingConfig(max_new_tokens=25, temperature=0.0)
    free = list(generate_tokens(target, prompt, cfg))
    eos = free[7]
    alone = list(generate_tokens(target, prompt, cfg, eos_id=eos))
    for draft in (target, perturbed(target, 0.6)):
        assert list(speculative_generate_tokens(target, draft, prompt, cfg, k=4,
                                                eos_id=eos)) == alone
    long = SamplingConfig(max_new_tokens=500, temperature=0.0)  # capped by max_seq_len = 64
    ref = list(generate_tokens(target, prompt, long))
    assert (len(ref) == 60
            and list(speculative_generate_tokens(target, target, prompt, long, k=4)) == ref)


def test_sampling_with_draft_equal_to_target_accepts_everything(target):
    # p = q at every position, so min(1, p/q) = 1: every proposal is kept
    stats = GenerationStats()
    cfg = SamplingConfig(max_new_tokens=20, temperature=1.0, top_k=None, seed=3)
    out = list(speculative_generate_tokens(target, target, [1, 2], cfg, k=3, stats=stats))
    assert len(out) == 20 and stats.accepted == stats.drafted > 0
    # seeded: reproducible
    assert out == list(speculative_generate_tokens(target, target, [1, 2], cfg, k=3))


def test_speculative_rejects_what_it_cannot_do(target):
    with pytest.raises(ValueError, match="repetition_penalty"):
        list(speculative_generate_tokens(target, target, [1],
                                         SamplingConfig(repetition_penalty=1.1)))
    other = Llama(ModelConfig(dim=16, n_layers=1, n_heads=2, hidden_dim=32, vocab_size=V + 1,
                              max_seq_len=64))
    with pytest.raises(ValueError, match="share a tokenizer"):
        list(speculative_generate_tokens(target, other, [1], SamplingConfig()))


# --------------------------------------------------------------------------------------------------
# the rejection rule, statistically

P = torch.tensor([[0.30, 0.25, 0.20, 0.10, 0.10, 0.05],  # target at position 0
                  [0.05, 0.05, 0.40, 0.30, 0.10, 0.10],  # position 1
                  [1 / 6] * 6])
# the draft: far from the target (TV 0.45, 0.40)
Q = torch.tensor([[0.05, 0.10, 0.10, 0.20, 0.25, 0.30],
                  [0.30, 0.30, 0.10, 0.10, 0.10, 0.10]])
N = 5_000


def always_accept(p, q, draft, generator):
    return draft.tolist() + [int(torch.multinomial(p[-1], 1, generator=generator))]


def resample_from_target(p, q, draft, generator):
    """A plausible wrong rule: on rejection, draw from p instead of the residual max(0, p − q)."""
    kept = speculative_accept(p, q, draft, generator)
    n = len(kept) - 1
    if n < len(draft):
        kept[-1] = int(torch.multinomial(p[n], 1, generator=generator))
    return kept


def empirical(rule):
    """Run the rule N times with fresh draft proposals d_i ~ Q_i → (counts of the first
    output token, counts of the second output token when the first proposal was kept). Both
    should follow P[0], P[1]."""
    g = torch.Generator().manual_seed(0)
    first, second = torch.zeros(6), torch.zeros(6)
    for _ in range(N):
        draft = torch.multinomial(Q, 1, generator=g)[:, 0]  # (2,)
        kept = rule(P, Q, draft, g)
        first[kept[0]] += 1
        if len(kept) >= 2:
            second[kept[1]] += 1
    return first, second


def chi2_tv(counts, p):
    n = counts.sum()
    chi2 = float(((counts - n * p) ** 2 / (n * p)).sum())
    return chi2, float((counts / n - p).abs().sum() / 2)


# 5 degrees of freedom: P(chi2 > 25.7) = 1e-4. The runs are seeded, so the outcome is fixed; the
# bound says the fixed outcome is what a correct rule gives, and a wrong one lands far outside it.
CHI2_BOUND, TV_BOUND = 25.7, 0.04


def test_rejection_rule_keeps_the_target_distribution():
    first, second = empirical(speculative_accept)
    assert second.sum() > N / 3  # the second position is exercised too
    for counts, p in ((first, P[0]), (second, P[1])):
        chi2, tv = chi2_tv(counts, p)
        assert chi2 < CHI2_BOUND and tv < TV_BOUND, (chi2, tv)


@pytest.mark.parametrize("rule", [always_accept, resample_from_target])
def test_the_statistical_check_fails_a_wrong_rule(rule):
    first, _ = empirical(rule)
    chi2, tv = chi2_tv(first, P[0])
    assert chi2 > 10 * CHI2_BOUND and tv > 2.5 * TV_BOUND, (chi2, tv)


def test_rejection_rule_exact_cases():
    g = torch.Generator().manual_seed(0)
    one_hot = torch.eye(6)
    # greedy (one-hot p and q): keep while the target agrees, then the target's token
    p = one_hot[[2, 4, 1]]  # target argmax 2, 4, then 1
    assert speculative_accept(p, one_hot[[2, 5]], torch.tensor([2, 5]), g) == [2, 4]
    # all kept + bonus
    assert speculative_accept(p, one_hot[[2, 4]], torch.tensor([2, 4]), g) == [2, 4, 1]
    assert speculative_accept(p, one_hot[[3, 4]], torch.tensor([3, 4]), g) == [2]


def test_generate_cli_with_a_draft_prints_the_targets_greedy_text(tmp_path, capsys):
    from tiny import script, tiny_tokenizer

    generate = script("generate")
    from minillm.formats.native import save_model

    tok = tiny_tokenizer(tmp_path / "tokenizer.model")
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                      vocab_size=tok.vocab_size, max_seq_len=64)
    big = Llama(cfg).eval()
    save_model(big, tmp_path / "target", tokenizer_path=tok.path)
    save_model(perturbed(big, 0.5), tmp_path / "draft", tokenizer_path=tok.path)
    common = ["--checkpoint", str(tmp_path / "target"), "--prompt", "import json",
              "--temperature", "0", "--max-new-tokens", "20"]
    generate.main(common)
    alone = capsys.readouterr()
    generate.main(common + ["--draft", str(tmp_path / "draft"), "--speculate_k", "3"])
    spec = capsys.readouterr()
    assert spec.out == alone.out and "draft tokens accepted" in spec.err

