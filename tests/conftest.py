"""Shared test set-up.

Triton kernels run compiled on a GPU and through Triton's interpreter (TRITON_INTERPRET=1) on a
CPU-only machine such as CI. The variable must be set before triton is imported, so it is set here,
first.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


@pytest.fixture
def split_every_gemv(monkeypatch):
    """RowSplitLinear's batch-1 CPU path (row slices over the threads, one bmm) for every weight
    size, on 2 threads as on the 2-core CI machine (generate/fast_linear.py)."""
    from minillm.generate.fast_linear import RowSplitLinear

    monkeypatch.setattr(RowSplitLinear, "MIN_SPLIT", 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)
