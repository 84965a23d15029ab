"""Every Triton kernel compiles for real GPUs (an H100, sm_90, and an A100, sm_80) — checked
ahead of time, with no GPU.

CI runs the kernels through Triton's interpreter, which accepts some programs the compiler rejects
(constexpr misuse, type mismatches, unsupported ops, a literal typed fp64). Compiling each kernel to
a cubin for each architecture, for every dtype variant the launchers use and every autotuner tile
for sm_90 (the default tile of each GEMV loop, plain and paired, for sm_80, to keep the test short),
catches those without a device (the int8 GEMM: every tile on one dtype variant, the default tile
on the other); numerics are tested elsewhere. It runs in a fresh
process: `@triton.jit` decides at import time whether a kernel is interpreted, and the other tests
import the kernels with the interpreter on.
"""

import os
import subprocess
import sys

import pytest

SIGNATURES = {
    "quantize": ("minillm.kernels.nf4", "_nf4_quantize_kernel", [
        ({"w_ptr": f"*{t}", "packed_ptr": "*u8", "absmax_ptr": "*fp32", "mid_ptr": "*fp32",
          "n": "i32", "n_blocks": "i32", "BLOCKSIZE": "constexpr", "BLOCKS_PER_PROG": "constexpr"},
         {"BLOCKSIZE": 64, "BLOCKS_PER_PROG": 16}) for t in ("fp32", "fp16", "bf16")]),
    "dequantize": ("minillm.kernels.nf4", "_nf4_dequantize_kernel", [
        ({"packed_ptr": "*u8", "absmax_ptr": "*fp32", "code_ptr": "*fp32", "out_ptr": f"*{t}",
          "n": "i32", "n_bytes": "i32", "BLOCKSIZE": "constexpr", "BLOCK_BYTES": "constexpr",
          "OUT_BF16": "constexpr"},
         {"BLOCKSIZE": 64, "OUT_BF16": t == "i16"}) for t in ("fp32", "fp16", "i16")]),
    "gemv": ("minillm.kernels.nf4_matmul", "_nf4_gemv_kernel", [
        ({"x_ptr": f"*{x}", "packed_ptr": "*u8", "absmax_ptr": "*fp32", "code_ptr": "*fp32",
          "y_ptr": f"*{y}", "N_OUT": "i32", "N_RED": "i32", "K": "i32", "stride_xm": "i32",
          "stride_ym": "i32", "BLOCKSIZE": "constexpr", "TRANS_W": "constexpr",
          "X_BF16": "constexpr", "BLOCK_O": "constexpr", "BLOCK_R": "constexpr"},
         {"BLOCKSIZE": 64, "TRANS_W": tw, "X_BF16": x == "bf16"})
        for x, y in (("fp32", "fp32"), ("fp16", "fp16"), ("bf16", "i16")) for tw in (False, True)]),
    # the LLM.int8 kernels launch with enable_fp_fusion=False (kernels/int8.py says why)
    "int8_quantize": ("minillm.kernels.int8", "_int8_quantize_rows_kernel", [
        ({"x_ptr": f"*{x}", "codes_ptr": "*i8", "absmax_ptr": "*fp32", "outlier_col_ptr": "*i8",
          "threshold": "fp32", "M": "i32", "K": "i32", "stride_xm": "i32",
          "HAS_OUTLIERS": "constexpr", "X_BF16": "constexpr", "BLOCK_M": "constexpr",
          "BLOCK_K": "constexpr"},
         {"HAS_OUTLIERS": outliers, "X_BF16": x == "i16", "BLOCK_M": 8, "BLOCK_K": 1024})
        for x, outliers in (("fp32", False), ("fp16", True), ("i16", False), ("i16", True))],
        {"enable_fp_fusion": False}),
    "int8_gemm": ("minillm.kernels.int8_matmul", "_int8_matmul_kernel", [
        ({"a_ptr": "*i8", "b_ptr": "*i8", "sa_ptr": "*fp32", "sb_ptr": "*fp32",
          "bias_ptr": "*fp32", "y_ptr": f"*{y}", "M": "i32", "N": "i32", "K": "i32",
          "HAS_BIAS": "constexpr", "Y_BF16": "constexpr", "BLOCK_M": "constexpr",
          "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "GROUP_M": "constexpr"},
         {"HAS_BIAS": bias, "Y_BF16": y == "i16"})
        for y, bias in (("i16", False), ("fp16", True))],
        # every tile on the first variant; the others' epilogue differs, the tiles' K loop not
        {"enable_fp_fusion": False, "tiles_on_first_variant_only": True}),
}

COMPILE = """
import importlib, inspect, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
module, name, variants, *options = {job!r}
options = dict(options[0]) if options else {{}}
first_only = options.pop("tiles_on_first_variant_only", False)
arch = {arch!r}
fn = getattr(importlib.import_module(module), name)
tiles = [({{}}, 4, 3)]  # (tile constexprs, num_warps, num_stages); an autotuned kernel brings
if type(fn).__name__ == "Autotuner":  # its own list
    tiles = [(config.kwargs, config.num_warps, config.num_stages) for config in fn.configs]
    assert len(tiles) > 1, "the autotuner was built for the interpreter"
    fn = fn.fn
# every tile for the H100; elsewhere the default tile of each loop (PAIRED or not) suffices
if arch != 90:
    tiles = [t for i, t in enumerate(tiles)
             if t[0].get("PAIRED") not in [u[0].get("PAIRED") for u in tiles[:i]]]
assert type(fn).__name__ == "JITFunction", type(fn)
def source(fn, signature, constexprs):
    if "constexprs" in inspect.signature(ASTSource.__init__).parameters:  # Triton >= 3.3
        return ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    # Older Triton: arguments by position, constexprs given as
    # constants and left out of the signature
    at = {{name: i for i, name in enumerate(fn.arg_names)}}
    return ASTSource(fn=fn,
                     signature={{at[k]: v for k, v in signature.items() if v != "constexpr"}},
                     constants={{at[k]: v for k, v in constexprs.items()}})
for v, (signature, constexprs) in enumerate(variants):
    for tile, num_warps, num_stages in (tiles[:1] if first_only and v else tiles):
        src = source(fn, signature, {{**constexprs, **tile}})
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={{"num_warps": num_warps, "num_stages": num_stages,
                                           **options}})
        assert compiled.asm["cubin"][:4] == b"\\x7fELF"  # a real device binary came out of ptxas
    print("compiled", name, "sm_%d" % arch, sorted(constexprs.items()), len(tiles), "tiles")
"""


@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("kernel", list(SIGNATURES))
def test_kernel_compiles(kernel, arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the default today; set to silence Triton's warning
    job = SIGNATURES[kernel]
    script = COMPILE.format(job=job, arch=arch)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("compiled") == len(job[2])
