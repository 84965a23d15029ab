"""Peer goldens: bitsandbytes' LLM.int8 (quantize, dequantize, bnb.matmul) and AdamW8bit on its CPU
path, written for tests/test_int8_kernels.py and tests/test_adamw8bit.py to compare minillm with.

    /work/peers/venv/bin/python bench/peer_int8_check.py     # rewrites tests/data/bnb_*.safetensors

Run by hand in a venv that has bitsandbytes (never a minillm dependency, and that venv need not
have minillm or Triton: this script imports neither). Everything it feeds bitsandbytes is stored
beside the results, so the tests recompute minillm's side from the very same inputs:

tests/data/bnb_int8_golden.safetensors, per case NAME:
    q.NAME.x, q.NAME.threshold -> q.NAME.CB, q.NAME.SCB, q.NAME.cols   int8_vectorwise_quant(x, t)
                                  q.NAME.deq (threshold 0)             int8_vectorwise_dequant
    mm.NAME.x, mm.NAME.W, mm.NAME.threshold -> mm.NAME.CB, mm.NAME.SCB, mm.NAME.y
        bnb.matmul(x, W) with a MatmulLtState in inference mode (MatMul8bitLt: x and W rounded to
        float16 and quantized, int8 x int8 -> int32, mm_dequant, outlier columns in x's dtype)
tests/data/bnb_adamw8bit_golden.safetensors:
    p{i}.init, p{i}.grad{t}  ->  exact.p{i} / exact.p{i}.{m,v}_{codes,absmax}  and  lib.(same)
        AdamW8bit(lr 1e-2, wd 1e-2) for STEPS steps on CPU; "exact": bitsandbytes' CPU update with
        its default (pure PyTorch) quantize_blockwise, "lib": with its C library's (as shipped)
The safetensors metadata holds the versions.
"""

from __future__ import annotations

import os
from pathlib import Path

import bitsandbytes as bnb
import bitsandbytes.backends.cpu.ops as bnb_cpu_ops
import bitsandbytes.functional as F
import torch
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parents[1] / "tests" / "data"
STEPS = 5


def awkward(shape, dtype, seed):
    """Gaussian rows scaled 1e-3 .. 1e3 down the rows, a zero row, a huge row (1e30; 6e4 in
    float16), a row of subnormal-small values, and exact .5 ties after scaling."""
    g = torch.Generator().manual_seed(seed)
    m, k = shape
    x = torch.randn(m, k, generator=g) * (10.0 ** torch.linspace(-3, 3, m))[:, None]
    if m > 3:
        x[1] = 0.0
        x[2] *= 6e4 / 1e3 if dtype == torch.float16 else 1e30
        x[3] = torch.randn(k, generator=g) * (1e-7 if dtype == torch.float16 else 1e-39)
    if m > 4 and k > 3:
        x[4, :4] = torch.tensor([127.0, 0.5, 1.5, -2.5])  # absmax 127: v = x exactly
    return x.to(dtype)


def activations(shape, dtype, seed):
    """N(0, 1) rows with two outlier columns past 6, one value exactly on 6."""
    g = torch.Generator().manual_seed(seed)
    m, k = shape
    x = torch.randn(m, k, generator=g)
    x[: max(1, m // 3), k // 2] = -20.0
    x[m - 1, min(2, k - 1)] = 6.0
    return x.to(dtype)


def quantize_cases(out: dict) -> None:
    shapes = [(37, 129), (1, 1), (3, 5), (8, 300), (6, 4099), (130, 64)]
    for shape in shapes:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for threshold in (0.0, 6.0):
                name = f"{shape[0]}x{shape[1]}_{str(dtype)[6:]}_t{threshold:g}"
                x = (activations if threshold else awkward)(shape, dtype, seed=len(out))
                CB, SCB, cols = F.int8_vectorwise_quant(x.clone(), threshold=threshold)
                out[f"q.{name}.x"] = x
                out[f"q.{name}.threshold"] = torch.tensor(threshold)
                out[f"q.{name}.CB"], out[f"q.{name}.SCB"] = CB, SCB
                out[f"q.{name}.cols"] = cols if cols is not None else torch.tensor([-1])
                if not threshold:
                    out[f"q.{name}.deq"] = F.int8_vectorwise_dequant(CB, SCB)


def matmul_cases(out: dict) -> None:
    for (m, k, n) in [(37, 129, 29), (1, 64, 48), (16, 256, 96)]:
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for threshold in (0.0, 6.0):
                name = f"{m}x{k}x{n}_{str(dtype)[6:]}_t{threshold:g}"
                g = torch.Generator().manual_seed(m * k + n)
                W = (torch.randn(n, k, generator=g) * 0.05).to(dtype)
                x = activations((m, k), dtype, seed=n)
                state = bnb.MatmulLtState()
                state.has_fp16_weights, state.is_training = False, False
                state.CB, state.SCB, _ = F.int8_vectorwise_quant(W.to(torch.float16))
                y = bnb.matmul(x, state.CB, state=state, threshold=threshold)
                out[f"mm.{name}.x"], out[f"mm.{name}.W"] = x, W
                out[f"mm.{name}.threshold"] = torch.tensor(threshold)
                out[f"mm.{name}.CB"], out[f"mm.{name}.SCB"], out[f"mm.{name}.y"] = (
                    state.CB, state.SCB, y)


def exact_quantizer():
    """bitsandbytes' own default-backend (pure PyTorch) quantize_blockwise, in place of the C
    library's, for the optimizer's re-quantization."""
    op = torch.ops.bitsandbytes.quantize_blockwise.default
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)

    def quant(A_fp32, code, absmax_out, out_uint8, blocksize):
        q, absmax = op.redispatch(keys, A_fp32, code, blocksize)
        out_uint8.copy_(q)
        absmax_out.copy_(absmax)

    return quant


def adamw8bit_cases(out: dict) -> None:
    g = torch.Generator().manual_seed(0)
    # 8-bit with a partial last block; 8-bit, 2-D, whole blocks; float32 (under min_8bit_size)
    shapes = [(5000,), (64, 129), (100,)]
    inits = [torch.randn(s, generator=g) * 0.1 for s in shapes]
    grads = [[torch.randn(s, generator=g) * 10.0 ** (-t % 3) for s in shapes]
             for t in range(STEPS)]
    for i, p0 in enumerate(inits):
        out[f"p{i}.init"] = p0
        for t in range(STEPS):
            out[f"p{i}.grad{t}"] = grads[t][i]
    shipped = bnb_cpu_ops._quant_blockwise_fp32_direct
    for label, quantizer in (("exact", exact_quantizer()), ("lib", shipped)):
        bnb_cpu_ops._quant_blockwise_fp32_direct = quantizer
        params = [torch.nn.Parameter(p0.clone()) for p0 in inits]
        opt = bnb.optim.AdamW8bit(params, lr=1e-2, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=1e-2)
        for t in range(STEPS):
            for p, gt in zip(params, grads[t], strict=True):
                p.grad = gt.clone()
            opt.step()
        for i, p in enumerate(params):
            st = opt.state[p]
            out[f"{label}.p{i}"] = p.detach().clone()
            if st["state1"].dtype == torch.uint8:
                out[f"{label}.p{i}.m_codes"], out[f"{label}.p{i}.v_codes"] = (
                    st["state1"].clone(), st["state2"].clone())
                out[f"{label}.p{i}.m_absmax"], out[f"{label}.p{i}.v_absmax"] = (
                    st["absmax1"].clone(), st["absmax2"].clone())
            else:
                out[f"{label}.p{i}.m"], out[f"{label}.p{i}.v"] = (st["state1"].clone(),
                                                                  st["state2"].clone())
    bnb_cpu_ops._quant_blockwise_fp32_direct = shipped
    out["signed_map"] = F.create_dynamic_map(signed=True)
    out["unsigned_map"] = F.create_dynamic_map(signed=False)


def write(name: str, tensors: dict) -> None:
    meta = {"bitsandbytes": bnb.__version__, "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "made_by": "bench/peer_int8_check.py"}
    path = OUT / name
    tmp = path.with_name(f".{name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    print(f"wrote {path} ({len(tensors)} tensors, {path.stat().st_size / 1e3:.0f} kB) {meta}")


def main() -> None:
    q: dict = {}
    quantize_cases(q)
    matmul_cases(q)
    write("bnb_int8_golden.safetensors", q)
    a: dict = {}
    adamw8bit_cases(a)
    write("bnb_adamw8bit_golden.safetensors", a)


if __name__ == "__main__":
    main()
