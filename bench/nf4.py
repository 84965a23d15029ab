"""Benchmark the NF4 kernels: decode GEMV vs bf16 cuBLAS vs the memory roofline, dequantization
bandwidth, and the batched (dequantize + cuBLAS) matmul in TFLOP/s.

    python bench/nf4.py                       # Llama-7B projection shapes on CUDA
    python bench/nf4.py --shapes 4096x4096    # one shape

Roofline for decode: one token reads every weight once, so the fastest possible NF4 GEMV takes
(packed bytes + absmax bytes) / copy bandwidth, with the copy bandwidth measured here (read + write of a
large buffer). Without CUDA the script runs small shapes through the plain-PyTorch reference path and
says so: those numbers describe the reference, not the kernels.
"""

import argparse
import time
from dataclasses import dataclass

import torch

from minillm.kernels.nf4 import dequantize_nf4, quantize_nf4
from minillm.kernels.nf4_matmul import nf4_matmul


@dataclass
class BenchConfig:
    shapes: tuple[tuple[int, int], ...]  # (out_features, in_features) weights to time
    decode_rows: int = 1  # input rows for the decode (GEMV) case
    batch_rows: int = 2048  # input rows for the batched case
    warmup: int = 10  # untimed calls before timing
    iters: int = 50  # timed calls (mean reported)


CUDA_SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))  # Llama-7B: q/k/v/o, gate/up, down
CPU_SHAPES = ((256, 256), (512, 1024))


def time_cuda_us(fn, warmup: int, iters: int) -> float:
    """Mean microseconds per call of fn, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / iters


def time_cpu_us(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) * 1e6 / iters


def copy_bandwidth_gbs(cfg: BenchConfig) -> float:
    """Device copy bandwidth (bytes read + written per second) on a 1 GiB buffer."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = time_cuda_us(lambda: dst.copy_(src), cfg.warmup, cfg.iters)
    return 2 * src.numel() / us / 1e3


CUDA_HEADER = (
    f"{'out x in':<13} | {'decode us':>9} {'bf16 us':>8} {'roofline':>8} | "
    f"{'dequant us':>10} {'GB/s':>6} | {'batched TF/s':>12} {'bf16 TF/s':>9}"
)


def bench_cuda_shape(cfg: BenchConfig, n_out: int, n_in: int, bw_gbs: float) -> str:
    """One row of the CUDA table for an (n_out, n_in) bf16 weight."""
    timed = lambda fn: time_cuda_us(fn, cfg.warmup, cfg.iters)
    w = torch.randn(n_out, n_in, device="cuda", dtype=torch.bfloat16)
    packed, absmax = quantize_nf4(w)
    nf4_bytes = packed.numel() + 4 * absmax.numel()

    x = torch.randn(cfg.decode_rows, n_in, device="cuda", dtype=torch.bfloat16)
    decode_us = timed(lambda: nf4_matmul(x, packed, absmax, n_out, n_in))
    dense_us = timed(lambda: x @ w.t())  # (1, in) @ (in, out)
    roofline_us = nf4_bytes / bw_gbs / 1e3

    deq_us = timed(lambda: dequantize_nf4(packed, absmax, (n_out, n_in)))
    deq_gbs = (nf4_bytes + 2 * w.numel()) / deq_us / 1e3  # read NF4, write bf16

    xb = torch.randn(cfg.batch_rows, n_in, device="cuda", dtype=torch.bfloat16)
    flops = 2 * cfg.batch_rows * n_in * n_out
    batch_tflops = flops / timed(lambda: nf4_matmul(xb, packed, absmax, n_out, n_in)) / 1e6
    dense_tflops = flops / timed(lambda: xb @ w.t()) / 1e6
    return (
        f"{n_out:>5} x {n_in:<5} | {decode_us:>9.1f} {dense_us:>8.1f} {roofline_us:>8.1f} | "
        f"{deq_us:>10.1f} {deq_gbs:>6.0f} | {batch_tflops:>12.1f} {dense_tflops:>9.1f}"
    )


def bench_cuda(cfg: BenchConfig) -> None:
    bw_gbs = copy_bandwidth_gbs(cfg)
    print(f"device: {torch.cuda.get_device_name()}, copy bandwidth {bw_gbs:.0f} GB/s")
    print(CUDA_HEADER)
    print("-" * len(CUDA_HEADER))
    for n_out, n_in in cfg.shapes:
        print(bench_cuda_shape(cfg, n_out, n_in, bw_gbs))


CPU_HEADER = f"{'out x in':<13} | {'decode us':>9} {'fp32 us':>8} | {'dequant us':>10} | {'batched us':>10}"


def bench_cpu_shape(cfg: BenchConfig, n_out: int, n_in: int) -> str:
    """One row of the CPU table: the reference path (backend="torch") on an fp32 weight."""
    timed = lambda fn: time_cpu_us(fn, cfg.warmup, cfg.iters)
    w = torch.randn(n_out, n_in)
    packed, absmax = quantize_nf4(w, backend="torch")
    x = torch.randn(cfg.decode_rows, n_in)
    xb = torch.randn(cfg.batch_rows, n_in)
    decode_us = timed(lambda: nf4_matmul(x, packed, absmax, n_out, n_in, backend="torch"))
    dense_us = timed(lambda: x @ w.t())
    deq_us = timed(lambda: dequantize_nf4(packed, absmax, (n_out, n_in), backend="torch"))
    batch_us = timed(lambda: nf4_matmul(xb, packed, absmax, n_out, n_in, backend="torch"))
    timings = f"{decode_us:>9.1f} {dense_us:>8.1f} | {deq_us:>10.1f} | {batch_us:>10.1f}"
    return f"{n_out:>5} x {n_in:<5} | {timings}"


def bench_cpu(cfg: BenchConfig) -> None:
    print("CPU run (no CUDA): timing the plain-PyTorch reference path, not the Triton kernels.")
    print(CPU_HEADER)
    print("-" * len(CPU_HEADER))
    for n_out, n_in in cfg.shapes:
        print(bench_cpu_shape(cfg, n_out, n_in))


def parse_shape(text: str) -> tuple[int, int]:
    out_features, _, in_features = text.lower().partition("x")
    if not (out_features.isdigit() and in_features.isdigit()):
        raise argparse.ArgumentTypeError(f"shape must look like 4096x11008 (out x in), got {text!r}")
    return int(out_features), int(in_features)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shapes", type=parse_shape, nargs="+", default=None,
        help="weights as OUTxIN (default: Llama-7B shapes on CUDA, small ones on CPU)",
    )  # fmt: skip
    parser.add_argument("--decode-rows", type=int, default=1, help="input rows of the decode (GEMV) case")
    parser.add_argument(
        "--batch-rows", type=int, default=None, help="rows of the batched case (default 2048; 64 on CPU)"
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls (default 10; 1 on CPU)")
    parser.add_argument("--iters", type=int, default=None, help="timed calls (default 50; 3 on CPU)")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    cfg = BenchConfig(
        shapes=tuple(args.shapes or (CUDA_SHAPES if cuda else CPU_SHAPES)),
        decode_rows=args.decode_rows,
        batch_rows=args.batch_rows or (2048 if cuda else 64),
        warmup=args.warmup if args.warmup is not None else (10 if cuda else 1),
        iters=args.iters or (50 if cuda else 3),
    )
    (bench_cuda if cuda else bench_cpu)(cfg)


if __name__ == "__main__":
    main()
