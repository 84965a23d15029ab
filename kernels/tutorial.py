"""What the kernel tutorials share: a ✅/❌ table for the check, and GB/s next to the roofline.

Each kernel file ends the way Triton's own tutorials do: it runs its kernel against its
plain-PyTorch reference on awkward shapes, prints one row per case, and on a GPU times the kernel in
GB/s:

    python -m minillm.kernels.nf4                     # on a machine with a CUDA GPU
    TRITON_INTERPRET=1 python -m minillm.kernels.nf4  # on a CPU, interpreted: correctness only
"""

import os
import sys
from collections.abc import Callable

import torch
import triton

OK, FAIL = "✅", "❌"


def print_table(rows: list[dict]) -> None:
    """Print rows (dicts with the same keys, values already formatted) as an aligned Markdown
    table."""
    keys = list(rows[0])
    width = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in keys}
    padded = lambda cells: (str(c).ljust(width[k]) for k, c in zip(keys, cells, strict=True))
    line = lambda cells: "| " + " | ".join(padded(cells)) + " |"
    print(line(keys))
    print("|" + "|".join("-" * (width[k] + 2) for k in keys) + "|")
    for r in rows:
        print(line([r[k] for k in keys]))


def time_s(fn: Callable[[], object]) -> float:
    """Median seconds per call of fn on the GPU (triton.testing.do_bench: warm-up, L2 flushed, CUDA
    events)."""
    return triton.testing.do_bench(fn, return_mode="median") / 1e3


def copy_gbs(device: torch.device, n_bytes: int = 2**30, timer: Callable = time_s) -> float:
    """GB/s of a device-to-device copy of n_bytes: bytes read + bytes written, per second.

    This is the roofline of a memory-bound kernel: the time to move its bytes at the GPU's real
    bandwidth, which we measure rather than take from a datasheet. A device-to-device copy of a
    large buffer reads and writes every byte once, so (2 x its size) / its time is the most GB/s a
    streaming kernel can hope for.
    """
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * n_bytes / timer(lambda: dst.copy_(src)) / 1e9


def main(
    check: Callable[[torch.device], bool], benchmark: Callable[[torch.device], None], module: str
) -> None:
    """Run a tutorial: the check everywhere, the benchmark on a GPU only; exit 1 if any row
    failed."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if not torch.cuda.is_available() and not interpret:
        sys.exit(f"no CUDA GPU here: run `TRITON_INTERPRET=1 python -m {module}` to check the "
                 "kernels through Triton's CPU interpreter (correctness only, no timings)")
    device = torch.device("cpu" if interpret else "cuda")
    where = "the Triton interpreter (CPU)" if interpret else "the GPU"
    print(f"{module}: kernel vs reference on {where}")
    ok = check(device)
    if device.type == "cuda":
        benchmark(device)
    sys.exit(0 if ok else 1)
