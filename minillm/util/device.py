"""Where a job computes and in what precision: the one device/dtype picker of train, generate,
export and the tour.

    pick_device("auto")                      -> cuda if there is a GPU, else cpu
    pick_device("cuda", local_rank=1, world_size=2)
                                             -> cuda:1 (under torchrun, each rank its own GPU)
    pick_dtype("auto", device)               -> bfloat16 on a GPU that supports it, else float32
    pick_dtype("bf16", device)               -> torch.bfloat16 (any name in DTYPES)

Why these defaults: bfloat16 keeps float32's exponent range, so it needs no loss scaling and halves
the bytes a matmul reads; a CPU has no fast bfloat16 matmuls for most ops, so it stays in float32.
float16 is only ever chosen by name (training then uses a GradScaler, see training/loop.py).
"""

from __future__ import annotations

import torch

# every spelling a CLI or config accepts: the torch names, the short ones, and the
# GGUF/llama.cpp ones
DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "f32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16,
}


def pick_device(setting: str = "auto", local_rank: int = 0, world_size: int = 1) -> torch.device:
    """"auto" | "cpu" | "cuda" | "cuda:N" | any torch device string. With several ranks, plain
    "cuda" means this rank's GPU (cuda:local_rank). A CUDA device becomes the current one, so later
    bare "cuda" allocations (caches, NCCL buffers) land on it; asking for CUDA without a GPU is an
    error here, not a crash at the first tensor."""
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and world_size > 1:
        setting = f"cuda:{local_rank}"
    device = torch.device(setting)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device={setting!r} but CUDA is not available")
        torch.cuda.set_device(device)
    return device


def pick_dtype(setting: str, device: torch.device) -> torch.dtype:
    """"auto" (bfloat16 on a CUDA GPU with bfloat16 support, float32 otherwise) or a name from
    DTYPES."""
    if setting == "auto":
        return (torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported()
                else torch.float32)
    if setting not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, found {setting!r}")
    return DTYPES[setting]


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on `device`: CUDA's free memory, or the kernel's MemAvailable on a
    Linux CPU; None where it cannot be read (then nothing is refused)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_fits(need_bytes: int, device: torch.device, what: str, advice: str):
    """Refuse, with one line, an allocation the device cannot hold, before it is tried: a size a
    user asked for (a batch, a context, a token budget) then fails in a second, not with a
    MemoryError after minutes (or the kernel's OOM killer)."""
    free = available_memory(device)
    if free is not None and need_bytes > free:
        raise ValueError(f"{what} needs about {need_bytes / 2**30:,.1f} GiB, but {device} has "
                         f"{free / 2**30:,.1f} GiB free; {advice}")
