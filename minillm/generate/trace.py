"""A shape tracer: print every module's output shape and dtype through one forward pass.

    python generate.py --checkpoint out/tiny --prompt "x = 1" --trace

It is the picture most tutorials leave out: which tensor is (B, T, C), where heads appear, how wide
the MLP gets, what comes out of lm_head. Implemented with forward hooks, so it works on any
checkpoint and on swapped modules (LoRA, NF4) without touching model.py.
"""

from __future__ import annotations

import sys

import torch
import torch.nn as nn


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}"
    if isinstance(x, (tuple, list)):
        return ", ".join(_describe(v) for v in x if v is not None)
    return type(x).__name__


@torch.no_grad()
def trace_forward(model: nn.Module, idx: torch.Tensor, out=sys.stdout,
                  max_depth: int | None = None) -> list[str]:
    """Run model(idx) once with a hook on every submodule; print and return one line per module
    call, in execution order: qualified name, module class, input shape(s) → output shape(s)."""
    lines: list[str] = []
    handles = []
    for name, module in model.named_modules():
        if not name or (max_depth is not None and name.count(".") >= max_depth):
            continue

        def hook(mod, inputs, output, name=name):
            lines.append(f"{name:<40} {type(mod).__name__:<12} {_describe(inputs[:1])} -> "
                         f"{_describe(output)}")

        handles.append(module.register_forward_hook(hook))
    try:
        logits, _ = model(idx)
    finally:
        for h in handles:
            h.remove()
    lines.insert(0, f"{'input ids':<40} {'':<12} {_describe(idx)}")
    lines.append(f"{'logits':<40} {'':<12} {_describe(logits)}")
    for line in lines:
        print(line, file=out)
    return lines
