"""New tokens: pieces appended to the tokenizer (e.g. ChatML's "<|im_start|>"), and the embedding
and lm_head rows they need.

    tokenizer.add_pieces(["<|im_start|>", "<|im_end|>"])  V → V + 2 pieces, USER_DEFINED, at the end
    resize_vocab(model, V + 2)                            embed_tokens (V+2, C), lm_head (V+2, C)

Initialisation of the new rows: the mean of the old rows, for each matrix on its own,

    E[V + i] = mean_j E[j]          H[V + i] = mean_j H[j]          (j < V: the old rows)

A random row would give the new token an arbitrary logit, which can be large enough to make the
model emit it everywhere before any training step; with lm_head's mean row its logit h·mean(H) is
the average of the old logits, so the fine-tuning starts from nearly the base model's distribution
(Hewitt 2021, https://nlp.stanford.edu/~johnhew/vocab-expansion.html; HF's
`resize_token_embeddings(mean_resizing=True)` samples around the same mean). The new rows must then
be trained: in full fine-tuning they are; with LoRA / QLoRA put "embed_tokens" and "lm_head" in
`finetune.modules_to_save` (PEFT's name), so both matrices are trained in full and saved in the
adapter (minillm/finetune/peft_io.py).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn


def _grow_rows(weight: torch.Tensor, n: int) -> torch.Tensor:
    """(V, C) → (n, C): the old rows, then n - V copies of their mean (computed in float32)."""
    mean = weight.detach().float().mean(dim=0, keepdim=True)  # (1, C)
    new = mean.to(weight.dtype).expand(n - weight.shape[0], -1)  # (n - V, C)
    return torch.cat([weight.detach(), new], dim=0)


def resize_vocab(model: nn.Module, n: int) -> None:
    """Grow a Llama's embed_tokens and lm_head to `n` rows in place (new rows: the mean of the old
    ones) and set model.config.vocab_size = n. A tied lm_head stays tied. Shrinking is an error (it
    would drop trained rows), as is an lm_head that is not a plain nn.Linear (wrapped by an
    adapter)."""
    old = model.config.vocab_size
    if n < old:
        raise ValueError(f"resize_vocab: {n} rows would drop trained rows of the "
                         f"{old}-row vocabulary")
    if not isinstance(model.lm_head, nn.Linear):
        raise TypeError(f"resize_vocab: lm_head is a {type(model.lm_head).__name__}; resize "
                        "before applying adapters to it (or train it in full with modules_to_save)")
    if n == old:
        return
    emb, head = model.embed_tokens, model.lm_head
    emb.weight = nn.Parameter(_grow_rows(emb.weight, n),
                              requires_grad=emb.weight.requires_grad)  # (n, C)
    emb.num_embeddings = n
    if model.config.tie_embeddings:
        head.weight = emb.weight
    else:
        head.weight = nn.Parameter(_grow_rows(head.weight, n),
                                   requires_grad=head.weight.requires_grad)  # (n, C)
    head.out_features = n
    model.config = dataclasses.replace(model.config, vocab_size=n)
