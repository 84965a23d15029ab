"""A faster batch-1 CPU decode, as a module swap: every large nn.Linear becomes a `RowSplitLinear`,
which spreads a one-row matrix-vector product over all the threads (gpt-fast's way: the model is
built plain, then generate.py swaps layers in, as its quantize.py does).

Decoding one token multiplies one row x (1, K) by every weight W (N, K): a matrix-vector product
that reads each weight once and does 2 FLOPs per 4-byte read, so its speed is memory bandwidth. MKL
runs a one-row matmul on one thread, which streams about 9 GB/s on the 2-core CI machine while two
cores pull 15. So W's rows are cut into `chunks` slices and x is multiplied by all of them as one
batched matmul, which torch spreads over the threads, one slice each: every output is still
x · (a row of W).
1.4x the decode tokens/s of the 33M and 97M models of bench/cpu.py. Several rows (prefill,
training), a bias, a single thread, a non-CPU device, and any weight under 1 MiB (it sits in cache,
and the split only adds overhead) keep F.linear. The state dict is nn.Linear's.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


@torch.compiler.assume_constant_result  # torch.compile reads it once, at capture: no graph break
def cpu_threads() -> int:
    return torch.get_num_threads()


class RowSplitLinear(nn.Linear):
    """nn.Linear (same arguments, same state dict),
    with one CPU fast path for a single input row."""

    MIN_SPLIT = 1 << 18  # weights under 1 MiB (fp32) stay whole
    # 10% more GB/s than 1 per thread on the CI machine; 4 and 8 are no better
    CHUNKS_PER_THREAD = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the cheap tests first: this runs for every projection of every step
        if (x.numel() != self.in_features or self.weight.numel() < self.MIN_SPLIT
                or self.bias is not None):
            return F.linear(x, self.weight, self.bias)
        N, K = self.weight.shape
        chunks = self.CHUNKS_PER_THREAD * cpu_threads()
        if chunks < 4 or N % chunks or x.device.type != "cpu":
            return F.linear(x, self.weight)
        w = self.weight.view(chunks, N // chunks, K)  # (c, N/c, K): a view, no copy
        y = torch.bmm(x.reshape(1, 1, K).expand(chunks, 1, K), w.transpose(1, 2))  # (c, 1, N/c)
        return y.view(*x.shape[:-1], N)


def use_row_split_linears(model: nn.Module) -> int:
    """Swap every plain nn.Linear of `model` for a RowSplitLinear holding the same parameters
    (nothing is copied; a tied lm_head stays tied); returns how many. Other layer types (NF4Linear,
    LoRALinear) stay as they are; a LoRA adapter's A and B are plain nn.Linear layers, swapped too,
    and too small to split."""
    swapped = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]
    for name, linear in swapped:
        fast = RowSplitLinear(linear.in_features, linear.out_features,
                              bias=linear.bias is not None, device="meta")
        fast.weight, fast.bias = linear.weight, linear.bias
        model.set_submodule(name, fast)
    return len(swapped)
