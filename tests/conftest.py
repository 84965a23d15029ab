"""Shared test set-up.

Triton kernels run compiled on a GPU and through Triton's interpreter (TRITON_INTERPRET=1) on a CPU-only
machine such as CI. The variable must be set before triton is imported, so it is set here, first.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
