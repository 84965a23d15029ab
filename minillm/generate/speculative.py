"""Speculative decoding (Leviathan et al. 2023, https://arxiv.org/abs/2211.17192; Chen et al. 2023,
https://arxiv.org/abs/2302.01318; gpt-fast's --speculate_k). A small draft model proposes k tokens
one at a time; the target scores all of them in one forward pass over k + 1 positions; a rejection
rule keeps a prefix of the proposals plus one token of its own, so every target pass yields
1 … k + 1 tokens whose distribution is exactly the target's.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from minillm.generate.decode import (
    Clock,
    GenerationStats,
    check_prompt_length,
    decode_one_token,
    decoding,
    prefill,
)
from minillm.generate.sampling import SamplingConfig, next_token_probs, sampling_generator
from minillm.model import Llama


def speculative_accept(p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor,
                       generator=None) -> list[int]:
    """The rejection rule. p (k+1, V) target probabilities at the k+1 verified positions, q (k, V)
    the draft's, draft (k,) the proposed ids (draft[i] ~ q[i]) → the tokens to keep
    (1 … k+1 of them).

    For i = 0, 1, …: keep draft[i] with probability min(1, p_i(x) / q_i(x)), x = draft[i]. At the
    first rejection, draw the replacement from the residual norm(max(0, p_i − q_i)) and stop. If all
    k are kept, draw one more from p_k. Each kept-or-replaced token is then distributed exactly as
    p_i:
        P(x) = q(x)·min(1, p(x)/q(x))
               + (1 − Σ_y min(p(y), q(y))) · max(0, p(x) − q(x)) / Σ_y max(0, p(y) − q(y))
             = min(p(x), q(x)) + max(0, p(x) − q(x)) = p(x).
    """
    k = draft.numel()
    rows = torch.arange(k, device=draft.device)
    ratio = p[rows, draft] / q[rows, draft]  # (k,); q > 0 where the draft sampled
    r = torch.rand(k, generator=generator, device=p.device)  # (k,) uniform in [0, 1)
    n = int((r < ratio).long().cumprod(0).sum())  # the number of leading accepted proposals
    if n == k:
        last = p[k]
    else:
        last = (p[n] - q[n]).clamp(min=0)
        last = last / last.sum()
    extra = int(torch.multinomial(last, 1, generator=generator))
    return draft[:n].tolist() + [extra]


@torch.inference_mode()
def speculative_generate_tokens(
    target: Llama,
    draft_model: Llama,
    prompt_ids: list[int],
    cfg: SamplingConfig,
    k: int = 5,
    eos_id: int | None = None,
    stats: GenerationStats | None = None,
) -> Iterator[int]:
    """Like generate_tokens for `target`, with `draft_model` proposing k tokens per target forward.

    Each round, with the last token `cur` at position pos, not yet in either cache:
      1. the draft decodes cur, d_0, …, d_{k-2} at pos … pos+k-1, sampling d_0 … d_{k-1} (and q);
      2. the target runs once over [cur, d_0 … d_{k-1}] at pos … pos+k → p (k+1, V);
      3. speculative_accept keeps n proposals plus one token; the next cur is that token,
         at pos+n+1.
    Rolling back a rejection costs nothing: the caches hold stale keys and values in the slots after
    pos+n, but the mask only shows a query the slots up to its own position, and every slot up to
    there is written again before any query can see it. When all k are accepted, the draft still
    lacks d_{k-1} in its cache and decodes it once more. Greedy output equals the target alone (up
    to float rounding between one k+1-token pass and k+1 single-token passes). The repetition
    penalty is not supported.
    """
    if cfg.repetition_penalty != 1.0:
        raise ValueError("speculative decoding does not support repetition_penalty (found "
                         f"{cfg.repetition_penalty}); use 1.0")
    if k < 1:
        raise ValueError(f"speculate k must be >= 1, found {k}")
    if draft_model.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"draft vocab_size={draft_model.config.vocab_size} differs from the "
                         f"target's {target.config.vocab_size}: the two models must share a "
                         "tokenizer")
    device = target.embed_tokens.weight.device
    T = len(prompt_ids)
    max_len = min(target.config.max_seq_len, draft_model.config.max_seq_len)
    check_prompt_length(T, max_len)
    total = min(T + cfg.max_new_tokens, max_len)
    generator = sampling_generator(cfg, device)
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = T
    with decoding([target, draft_model], 1, total):
        clock = Clock(stats, device)
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, T)
        prefill(draft_model, ids, torch.arange(T, device=device))
        p = next_token_probs(prefill(target, ids, torch.arange(T, device=device)), cfg)  # (1, V)
        cur = int(torch.multinomial(p[0], 1, generator=generator))
        clock.prefill_done()
        pos, new, ended = T, [cur] if total > T else [], False  # new[-1] is cur, at position pos
        while True:
            for tok in new:
                if tok == eos_id:
                    ended = True
                    break
                stats.new_tokens += 1
                yield tok
            if ended or pos >= total - 1:
                break
            kk = min(k, total - 1 - pos)  # the last round may have less room
            x, proposed, qs = cur, [], []
            for i in range(kk):  # 1. draft
                logits = decode_one_token(draft_model, torch.tensor([[x]], device=device),
                                          torch.tensor([pos + i], device=device))  # (1, V)
                q = next_token_probs(logits, cfg)[0]  # (V,)
                x = int(torch.multinomial(q, 1, generator=generator))
                proposed.append(x)
                qs.append(q)
            # 2. verify
            verify = torch.tensor([[cur] + proposed], device=device)  # (1, kk+1)
            logits, _ = target(verify, input_pos=torch.arange(pos, pos + kk + 1, device=device))
            p = next_token_probs(logits[0], cfg)  # (kk+1, V)
            kept = speculative_accept(p, torch.stack(qs), torch.tensor(proposed, device=device),
                                      generator)
            n = len(kept) - 1
            stats.drafted += kk
            stats.accepted += n
            if n == kk:  # the draft never saw its own last proposal: write it into its cache
                decode_one_token(draft_model, torch.tensor([[proposed[-1]]], device=device),
                                 torch.tensor([pos + kk], device=device))
            # kept[i] lies at pos+1+i: a bonus token past the cache is dropped
            new = kept[: total - 1 - pos]
            cur, pos = new[-1], pos + len(new)
            clock.step_done()
        clock.decode_done()
