"""Batched generation: B prompts of different lengths decoded together in one static KV cache.

    prompt 0:  <s> a b c d e        slots 0..5                     left_pad 0
    prompt 1:  ·  ·  ·  <s> f g     slots 3..5 (0..2 padding)      left_pad 3

Prompts are right-aligned (left padding), so every row's next token goes to the same slot and one
decode step serves the whole batch. The model itself knows nothing of padding: each call passes, per
row, the RoPE positions (counted from the row's first real token) and a mask that hides the padding
slots (`row_args`), so each row computes exactly what it would alone. This is static batching, not
continuous batching: a finished row keeps its slot (its tokens are computed and dropped) until every
row has ended.
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
from minillm.generate.sampling import SamplingConfig, sample, sampling_generator
from minillm.model import Llama, cache_mask


def left_pad_prompts(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists → ids (B, T) right-aligned, T the longest prompt, and left_pad (B,) = T − len.

    Padding repeats each row's first token (its BOS): the model never attends to a padding slot, and
    a repetition penalty, which reads the context, finds no token that is not already in the prompt.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt must hold at least one token (a BOS at least)")
    T = max(len(p) for p in prompts)
    ids = torch.tensor([[p[0]] * (T - len(p)) + list(p) for p in prompts],
                       dtype=torch.long)  # (B, T)
    return ids, torch.tensor([T - len(p) for p in prompts], dtype=torch.long)  # (B,)


def row_args(input_pos: torch.Tensor, left_pad: torch.Tensor, S: int) -> dict[str, torch.Tensor]:
    """The per-row `positions` (B, T) and `mask` (B, 1, T, S) of queries at cache slots input_pos
    (T,) when row b's prompt starts at slot left_pad[b] of an S-slot cache.

    Row b's RoPE positions count from its first real slot, and its queries see the usual cache_mask
    minus the padding slots before it. A padding query sees only itself (an all-masked row would
    give NaN, which the next layer would write into the cache)."""
    positions = (input_pos[None, :] - left_pad[:, None]).clamp(min=0)  # (B, T)
    first = torch.minimum(left_pad[:, None], input_pos[None, :])  # (B, T): the first visible slot
    slots = torch.arange(S, device=input_pos.device)  # (S,)
    mask = (cache_mask(input_pos, S)
            & (slots[None, None, :] >= first[:, :, None])[:, None])  # (B, 1, T, S)
    return dict(positions=positions, mask=mask)


def decode_batch_step(model: Llama, token: torch.Tensor, input_pos: torch.Tensor,
                      left_pad: torch.Tensor) -> torch.Tensor:
    """decode_one_token for a left-padded batch: token (B, 1) at slot input_pos (1,) → logits
    (B, V). Fixed shapes too, so it compiles as the batch-1 step does."""
    S = model.layers[0].self_attn.kv_cache.k.shape[2]
    return decode_one_token(model, token, input_pos, **row_args(input_pos, left_pad, S))


@torch.inference_mode()
def generate_tokens_batch(model: Llama, prompts: list[list[int]], cfg: SamplingConfig,
                          eos_id: int | None = None, stats: GenerationStats | None = None,
                          stopped: list[bool] | None = None,
                          decode_fn=decode_batch_step) -> Iterator[tuple[int, int | None]]:
    """Decode B prompts together; yield (row, token id) as each step produces them, and (row, None)
    when a row ends (EOS, which is not yielded, or max_new_tokens). Greedy rows equal their batch-1
    runs.

    stopped: optional list of B flags the caller may set while iterating (e.g. on a stop string) to
    end a row; no more events come for it. Rows share one cache: when max_seq_len binds, the longest
    prompt limits every row's new tokens. With sampling, a row's draws depend on the batch (one
    generator serves all rows).
    """
    device = model.embed_tokens.weight.device
    ids, pad = left_pad_prompts(prompts)
    ids, pad = ids.to(device), pad.to(device)  # (B, T), (B,)
    B, T = ids.shape
    check_prompt_length(T, model.config.max_seq_len)
    stopped = [False] * B if stopped is None else stopped
    if len(stopped) != B:
        raise ValueError(f"stopped has {len(stopped)} flags for {B} prompts")
    total = min(T + cfg.max_new_tokens, model.config.max_seq_len)
    generator = sampling_generator(cfg, device)
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = sum(len(p) for p in prompts)
    with decoding([model], B, total):
        clock = Clock(stats, device)
        input_pos = torch.arange(T, device=device)
        logits = prefill(model, ids, input_pos, **row_args(input_pos, pad, total))  # (B, V)
        token = sample(logits, ids, cfg, generator)  # (B, 1)
        clock.prefill_done()
        context = ids
        for pos in range(T, total):
            for row, tok in enumerate(token[:, 0].tolist()):
                if stopped[row]:
                    continue
                if tok == eos_id:
                    stopped[row] = True
                    yield row, None
                    continue
                stats.new_tokens += 1
                yield row, tok
            if all(stopped):
                break
            if pos + 1 >= total:
                for row in range(B):
                    if not stopped[row]:
                        stopped[row] = True
                        yield row, None
                break
            context = torch.cat([context, token], dim=1)  # (B, pos + 1)
            logits = decode_fn(model, token, torch.tensor([pos], device=device), pad)  # (B, V)
            token = sample(logits, context, cfg, generator)  # (B, 1)
            clock.step_done()
        clock.decode_done()
