"""Where a job computes and in what precision: the one device/dtype picker of train, generate,
export and the tour.

    pick_device("auto")                      -> cuda if there is a GPU, else cpu
    pick_device("cuda", local_rank=1, world_size=2)
                                             -> cuda:1 (under torchrun, each rank its own GPU)
    pick_dtype("auto", device)               -> bfloat16 on a GPU that supports it, else float32
    pick_dtype("auto", device, training=True, width=576)
                                             -> the same, and bfloat16 on a CPU that multiplies
                                                bfloat16 in hardware (native_bf16_matmul), for a
                                                model at least CPU_BF16_MIN_WIDTH wide
    pick_dtype("bf16", device)               -> torch.bfloat16 (any name in DTYPES)

Why these defaults: bfloat16 keeps float32's exponent range, so it needs no loss scaling and halves
the bytes a matmul reads. Most CPUs have no bfloat16 arithmetic (it is emulated, slower than
float32), so they stay in float32; those that do (Intel's AMX since Sapphire Rapids, AVX512-BF16 on
Cooper Lake and AMD Zen 4, Arm's BF16 extension) train under bfloat16 autocast: on a 2-core Xeon
with AMX a 2048² matmul runs at 2.1 TFLOP/s in bfloat16 against 0.31 in float32. That gain needs
matmuls large enough to pay for autocast's casts: measured there (batch 16 × 128 tokens, one
training step), a 128-wide model ran 0.90× as fast in bfloat16, 256-wide 1.66×, 576-wide 1.58×.
So the tiny model trains in float32 on every machine alike, and a real model in bfloat16. Training
keeps float32 master weights and optimizer state either way. Generation and export never switch on
their own: on a CPU their "auto" stays float32, the numbers every machine gives alike. float16 is
only ever chosen by name (training then uses a GradScaler, see training/loop.py).
"""

from __future__ import annotations

import platform

import torch

# every spelling a CLI or config accepts: the torch names, the short ones, and the
# GGUF/llama.cpp ones
# the narrowest model (hidden size) a CPU trains in bfloat16 when dtype is "auto" (measured above)
CPU_BF16_MIN_WIDTH = 256

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


def pick_dtype(setting: str, device: torch.device, training: bool = False,
               width: int | None = None) -> torch.dtype:
    """"auto" (bfloat16 on a CUDA GPU with bfloat16 support, and with `training` on a CPU with
    native_bf16_matmul for a model of hidden size `width` >= CPU_BF16_MIN_WIDTH; float32
    otherwise) or a name from DTYPES."""
    if setting == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        wide = (width or 0) >= CPU_BF16_MIN_WIDTH
        native = training and device.type == "cpu" and wide and native_bf16_matmul()
        return torch.bfloat16 if native else torch.float32
    if setting not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, found {setting!r}")
    return DTYPES[setting]


def native_bf16_matmul() -> bool:
    """Does this CPU multiply bfloat16 in hardware (so oneDNN's bf16 matmuls outrun float32)?

    x86: AMX tiles or AVX512-BF16, as torch's own CPU probe reports them (torch.cpu, with
    /proc/cpuinfo's flags amx_bf16 / avx512_bf16 where that probe is missing). Arm: the "bf16"
    feature of /proc/cpuinfo (Graviton 3, Neoverse V1/N2). Anything else, or nothing readable:
    False."""
    probes = [getattr(torch.cpu, name, None)
              for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    if platform.machine().lower() in ("x86_64", "amd64") and None not in probes:
        return any(probe() for probe in probes)
    flags = set()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags |= set(line.split(":", 1)[-1].split())
    except OSError:
        return False
    return bool(flags & {"amx_bf16", "avx512_bf16", "bf16"})


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
