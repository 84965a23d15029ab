"""Benchmark the NF4 kernels: decode GEMV vs bf16 cuBLAS vs the memory roofline, dequantization
bandwidth, and the batched (dequantize + cuBLAS) matmul in TFLOP/s.

    python bench/nf4.py                       # Llama-7B projection shapes on CUDA
    python bench/nf4.py --shapes 4096x4096    # one shape
    python bench/nf4.py --peer                # + bitsandbytes' quantize_4bit / matmul_4bit /
                                              # dequantize_4bit

Roofline for decode: one token reads every weight once, so the fastest possible NF4 GEMV takes
(packed bytes + absmax bytes) / copy bandwidth, with the copy bandwidth measured here (read + write
of a large buffer). Without CUDA the script runs small shapes through the plain-PyTorch reference
path and says so: those numbers describe the reference, not the kernels.
"""

import argparse
import time
from dataclasses import dataclass

import peers  # bench/peers.py: bitsandbytes, imported only when --peer asks for it
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


def table(title: str, rows: list[dict]) -> None:
    """Print rows (dicts with the same keys) as a Markdown table."""
    print(title)
    print("| " + " | ".join(rows[0]) + " |")
    print("|" + "---|" * len(rows[0]))
    for row in rows:
        print("| " + " | ".join(row.values()) + " |")


def bench_cuda_shape(cfg: BenchConfig, n_out: int, n_in: int, bw_gbs: float, peer: bool) -> dict:
    """One row of the CUDA table for an (n_out, n_in) bf16 weight."""
    timed = lambda fn: time_cuda_us(fn, cfg.warmup, cfg.iters)
    w = torch.randn(n_out, n_in, device="cuda", dtype=torch.bfloat16)
    packed, absmax = quantize_nf4(w)
    nf4_bytes = packed.numel() + 4 * absmax.numel()
    x = torch.randn(cfg.decode_rows, n_in, device="cuda", dtype=torch.bfloat16)
    xb = torch.randn(cfg.batch_rows, n_in, device="cuda", dtype=torch.bfloat16)
    flops = 2 * cfg.batch_rows * n_in * n_out

    decode_us = timed(lambda: nf4_matmul(x, packed, absmax, n_out, n_in))
    roofline_us = nf4_bytes / bw_gbs / 1e3
    deq_us = timed(lambda: dequantize_nf4(packed, absmax, (n_out, n_in)))
    deq_gbs = (nf4_bytes + 2 * w.numel()) / deq_us / 1e3  # read NF4, write bf16
    row = {
        "out x in": f"{n_out} x {n_in}",
        "decode us": f"{decode_us:.1f}",
        "roofline us": f"{roofline_us:.1f}",
        "% of roofline": f"{roofline_us / decode_us:.0%}",
        "bf16 cuBLAS us": f"{timed(lambda: x @ w.t()):.1f}",  # (1, in) @ (in, out)
        "dequant us": f"{deq_us:.1f}",
        "dequant % of copy BW": f"{deq_gbs / bw_gbs:.0%}",
        "batched TFLOP/s":
            f"{flops / timed(lambda: nf4_matmul(xb, packed, absmax, n_out, n_in)) / 1e6:.0f}",
        "bf16 cuBLAS TFLOP/s": f"{flops / timed(lambda: xb @ w.t()) / 1e6:.0f}",
    }
    if peer:
        bnb_matmul, bnb_dequantize = peers.bnb_nf4_ops(w)
        bnb_decode_us = timed(lambda: bnb_matmul(x))
        row["bnb decode us"] = f"{bnb_decode_us:.1f}"
        row["speed-up vs bnb"] = f"{bnb_decode_us / decode_us:.1f}x"
        row["bnb dequant us"] = f"{timed(bnb_dequantize):.1f}"
        row["bnb batched TFLOP/s"] = f"{flops / timed(lambda: bnb_matmul(xb)) / 1e6:.0f}"
    return row


def bench_cuda(cfg: BenchConfig, peer: bool) -> None:
    bw_gbs = copy_bandwidth_gbs(cfg)
    versions = f"; peer {peers.versions('bitsandbytes')}" if peer else ""
    title = (f"{torch.cuda.get_device_name()}, copy bandwidth {bw_gbs:.0f} GB/s; "
             f"decode {cfg.decode_rows} row(s), batched {cfg.batch_rows} rows, "
             f"bf16{versions}")  # fmt: skip
    table(title, [bench_cuda_shape(cfg, n_out, n_in, bw_gbs, peer) for n_out, n_in in cfg.shapes])


def bench_cpu_shape(cfg: BenchConfig, n_out: int, n_in: int, peer: bool) -> dict:
    """One row of the CPU table: the reference path (backend="torch") on an fp32 weight."""
    timed = lambda fn: time_cpu_us(fn, cfg.warmup, cfg.iters)
    w = torch.randn(n_out, n_in)
    packed, absmax = quantize_nf4(w, backend="torch")
    x = torch.randn(cfg.decode_rows, n_in)
    xb = torch.randn(cfg.batch_rows, n_in)
    row = {
        "out x in": f"{n_out} x {n_in}",
        "decode us":
            f"{timed(lambda: nf4_matmul(x, packed, absmax, n_out, n_in, backend='torch')):.1f}",
        "fp32 us": f"{timed(lambda: x @ w.t()):.1f}",
        "dequant us":
            f"{timed(lambda: dequantize_nf4(packed, absmax, (n_out, n_in), backend='torch')):.1f}",
        "batched us":
            f"{timed(lambda: nf4_matmul(xb, packed, absmax, n_out, n_in, backend='torch')):.1f}",
    }
    if peer:
        bnb_matmul, bnb_dequantize = peers.bnb_nf4_ops(w)
        row["bnb decode us"] = f"{timed(lambda: bnb_matmul(x)):.1f}"
        row["bnb dequant us"] = f"{timed(bnb_dequantize):.1f}"
        row["bnb batched us"] = f"{timed(lambda: bnb_matmul(xb)):.1f}"
    return row


def bench_cpu(cfg: BenchConfig, peer: bool) -> None:
    title = ("CPU run (no CUDA): timing the plain-PyTorch reference path, "
             "not the Triton kernels; fp32")
    table(title, [bench_cpu_shape(cfg, n_out, n_in, peer) for n_out, n_in in cfg.shapes])


def parse_shape(text: str) -> tuple[int, int]:
    out_features, _, in_features = text.lower().partition("x")
    if not (out_features.isdigit() and in_features.isdigit()):
        raise argparse.ArgumentTypeError(
            f"shape must look like 4096x11008 (out x in), got {text!r}")
    return int(out_features), int(in_features)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shapes", type=parse_shape, nargs="+", default=None,
        help="weights as OUTxIN (default: Llama-7B shapes on CUDA, small ones on CPU)",
    )  # fmt: skip
    parser.add_argument("--decode-rows", type=int, default=1,
                        help="input rows of the decode (GEMV) case")
    parser.add_argument("--batch-rows", type=int, default=None,
                        help="rows of the batched case (default 2048; 64 on CPU)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed calls (default 10; 1 on CPU)")
    parser.add_argument("--iters", type=int, default=None,
                        help="timed calls (default 50; 3 on CPU)")
    parser.add_argument("--peer", action="store_true",
                        help="add bitsandbytes' NF4 timings (bench/peers.py)")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    cfg = BenchConfig(
        shapes=tuple(args.shapes or (CUDA_SHAPES if cuda else CPU_SHAPES)),
        decode_rows=args.decode_rows,
        batch_rows=args.batch_rows or (2048 if cuda else 64),
        warmup=args.warmup if args.warmup is not None else (10 if cuda else 1),
        iters=args.iters or (50 if cuda else 3),
    )
    (bench_cuda if cuda else bench_cpu)(cfg, args.peer)


if __name__ == "__main__":
    main()
