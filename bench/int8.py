"""Benchmark the LLM.int8 kernels: the int8 GEMM (x quantized, int8 x int8 -> int32, dequantizing
epilogue, outlier columns in 16 bits) against bf16 cuBLAS on the dense weight, and against
bitsandbytes' bnb.matmul.

    python bench/int8.py                       # Llama-7B projection shapes on CUDA
    python bench/int8.py --shapes 4096x4096    # one weight shape
    python bench/int8.py --peer                # + bitsandbytes (bench/peers.py)

Each weight (out x in) is timed at a decode batch (--decode-rows, default 1: memory bound, the
kernel reads 1 byte per weight where cuBLAS reads 2) and at a batch of --batch-rows (default 2048:
compute bound, int8 tensor cores at twice the bf16 rate), with threshold 0 and 6 (a few outlier
columns planted in x). Without CUDA the script times the plain-PyTorch reference path on small
shapes and says so: those numbers describe the reference, not the kernels.
"""

import argparse
import time

import peers  # bench/peers.py: bitsandbytes, imported only when --peer asks for it
import torch

from minillm.kernels.int8 import quantize_int8
from minillm.kernels.int8_matmul import int8_matmul

CUDA_SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))  # Llama-7B: q/k/v/o, gate/up, down
CPU_SHAPES = ((256, 256), (512, 1024))


def timer(cuda: bool, warmup: int, iters: int):
    """Mean microseconds per call: CUDA events on a GPU, perf_counter on a CPU."""
    def time_us(fn) -> float:
        for _ in range(warmup):
            fn()
        if not cuda:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            return (time.perf_counter() - t0) * 1e6 / iters
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1000 / iters

    return time_us


def activations(rows: int, n_in: int, device, dtype) -> torch.Tensor:
    """N(0, 1) rows with two columns of outliers (|x| = 20 > 6), as LLM.int8 finds in large
    models."""
    x = torch.randn(rows, n_in, device=device, dtype=dtype)
    x[:, 3] = 20.0
    x[:, n_in // 2] = -20.0
    return x


def bench_shape(n_out, n_in, rows, cuda, time_us, peer) -> list[dict]:
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    backend = "triton" if cuda else "torch"
    w = torch.randn(n_out, n_in, device=device, dtype=dtype) * 0.02
    CB, SCB = quantize_int8(w)
    out = []
    for m in rows:
        x = activations(m, n_in, device, dtype)
        flops = 2 * m * n_in * n_out
        dense_us = time_us(lambda: x @ w.t())  # noqa: B023 (timed right here)
        row = {"out x in": f"{n_out} x {n_in}", "rows": str(m),
               f"{'bf16 cuBLAS' if cuda else 'fp32'} us": f"{dense_us:.1f}"}
        for t in (0.0, 6.0):
            us = time_us(lambda: int8_matmul(x, CB, SCB, t, backend=backend))  # noqa: B023
            row[f"int8 t={t:g} us"] = f"{us:.1f}"
            row[f"int8 t={t:g} TFLOP/s"] = f"{flops / us / 1e6:.2f}"
            if peer:
                bnb = peers.bnb_int8_matmul(w, t)
                row[f"bnb t={t:g} us"] = f"{time_us(lambda: bnb(x.half())):.1f}"  # noqa: B023
        out.append(row)
    return out


def parse_shape(text: str) -> tuple[int, int]:
    out_features, _, in_features = text.lower().partition("x")
    if not (out_features.isdigit() and in_features.isdigit()):
        raise argparse.ArgumentTypeError(f"shape must look like 4096x11008 (out x in), "
                                         f"got {text!r}")
    return int(out_features), int(in_features)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", type=parse_shape, nargs="+", default=None,
                        help="weights as OUTxIN (default: Llama-7B shapes on CUDA, small on CPU)")
    parser.add_argument("--decode-rows", type=int, default=1, help="rows of the decode case")
    parser.add_argument("--batch-rows", type=int, default=None,
                        help="rows of the batched case (default 2048; 64 on CPU)")
    parser.add_argument("--iters", type=int, default=None,
                        help="timed calls (default 50; 3 on CPU)")
    parser.add_argument("--peer", action="store_true",
                        help="add bitsandbytes' bnb.matmul (MatMul8bitLt) timings")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    shapes = args.shapes or (CUDA_SHAPES if cuda else CPU_SHAPES)
    rows = (args.decode_rows, args.batch_rows or (2048 if cuda else 64))
    time_us = timer(cuda, 10 if cuda else 1, args.iters or (50 if cuda else 3))
    table = [r for n_out, n_in in shapes
             for r in bench_shape(n_out, n_in, rows, cuda, time_us, args.peer)]
    where = (f"{torch.cuda.get_device_name()}, bf16 activations" if cuda else
             "CPU run (no CUDA): timing the plain-PyTorch reference path, not the Triton kernels; "
             "fp32 activations")
    print(where + (f"; peer {peers.versions('bitsandbytes')}" if args.peer else ""))
    print("| " + " | ".join(table[0]) + " |")
    print("|" + "---|" * len(table[0]))
    for row in table:
        print("| " + " | ".join(row.values()) + " |")


if __name__ == "__main__":
    main()
