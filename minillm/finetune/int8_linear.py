"""Int8Linear: a frozen nn.Linear stored as LLM.int8, the 8-bit base layer of alpaca-lora's recipe.

LLM.int8() (Dettmers et al. 2022, https://arxiv.org/abs/2208.07339) keeps the pretrained weight W0
as int8 codes with one float32 absmax per output row (bitsandbytes' Linear8bitLt with
has_fp16_weights=False; transformers' `load_in_8bit=True`), and multiplies it with the input's own
row-wise int8 codes, the input's outlier columns in 16 bits:

    y = int8_matmul(x, CB, SCB, threshold) (+ b)   in `compute_dtype`, returned in x's dtype
    dL/dx = dL/dy @ dequant(W0)                   the int8 rounding of x passes the gradient as
                                                  is (straight through); no gradient for W0

Storage per weight: 8 bits of code + 32 bits of SCB per row of `in_features` weights, i.e.
8 + 32 / in_features bits (8.008 for a 4096-wide layer). Everything lives in buffers (CB, SCB,
bias), so `state_dict()`, `load_state_dict()` and `.to(device)` work as for any module; do not
cast a quantized model with `.to(dtype)`: SCB would lose its float32 (the forward pass then
raises).

`threshold` is LLM.int8's outlier threshold (transformers' `llm_int8_threshold`, default 6.0):
input columns holding any |x| >= threshold are multiplied in 16 bits. 0 turns the decomposition
off (Linear8bitLt's own default), and every column goes through int8.

The numerics are in minillm.kernels.int8 (the format, bit for bit as bitsandbytes) and int8_matmul
(the GEMM with int32 accumulation and its dequantizing epilogue).
"""

from typing import Optional

import torch
from torch import nn

from minillm.kernels.int8 import dequantize_int8, quantize_int8
from minillm.kernels.int8_matmul import int8_matmul, int8_matmul_backward_input


class Int8MatmulFn(torch.autograd.Function):
    """y = int8_matmul(x, W); backward returns grad_x = grad_y @ dequant(W) and nothing for the
    weight. The eager path (the least Python time per call, as NF4MatmulFn)."""

    @staticmethod
    def forward(ctx, x, CB, SCB, threshold, bias):
        ctx.save_for_backward(CB, SCB)
        return int8_matmul(x, CB, SCB, threshold, bias)

    @staticmethod
    def backward(ctx, grad_y):
        CB, SCB = ctx.saved_tensors
        grad_x = int8_matmul_backward_input(grad_y, CB, SCB) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None, None


# Under torch.compile the same maths runs as a PyTorch custom op, one opaque call for the compiler
# (nf4_linear.py says why): the outlier columns' count is data dependent, which a traced graph could
# not follow, but an opaque op can.


@torch.library.custom_op("minillm::int8_matmul", mutates_args=())
def int8_linear_op(x: torch.Tensor, CB: torch.Tensor, SCB: torch.Tensor, threshold: float,
                   bias: Optional[torch.Tensor]) -> torch.Tensor:  # noqa: UP045 (the schema)
    """y = int8_matmul(x, CB, SCB, threshold, bias): (..., in) -> (..., out), in x's dtype."""
    return int8_matmul(x, CB, SCB, threshold, bias)


@int8_linear_op.register_fake
def _(x, CB, SCB, threshold, bias):
    return x.new_empty(*x.shape[:-1], CB.shape[0])


@torch.library.custom_op("minillm::int8_matmul_grad_x", mutates_args=())
def int8_grad_x_op(grad_y: torch.Tensor, CB: torch.Tensor, SCB: torch.Tensor) -> torch.Tensor:
    """grad_x = grad_y @ dequant(W): (..., out) -> (..., in), in grad_y's dtype."""
    return int8_matmul_backward_input(grad_y.contiguous(), CB, SCB)


@int8_grad_x_op.register_fake
def _(grad_y, CB, SCB):
    return grad_y.new_empty(*grad_y.shape[:-1], CB.shape[1])


def _save_for_backward(ctx, inputs, output):
    _x, CB, SCB, _threshold, _bias = inputs
    ctx.save_for_backward(CB, SCB)


def _backward(ctx, grad_y):
    CB, SCB = ctx.saved_tensors
    grad_x = int8_grad_x_op(grad_y, CB, SCB) if ctx.needs_input_grad[0] else None
    return grad_x, None, None, None, None


int8_linear_op.register_autograd(_backward, setup_context=_save_for_backward)


class Int8Linear(nn.Module):
    """A frozen linear layer whose (out_features, in_features) weight is stored as LLM.int8.

    Build it with `Int8Linear.from_linear(linear)` or `Int8Linear.from_weight(w)`; the plain
    constructor allocates zero buffers of the right sizes, to be filled by `load_state_dict`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 threshold: float = 6.0, compute_dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__()
        if not threshold >= 0:
            raise ValueError(f"Int8Linear: threshold must be >= 0 (0: no outlier columns), "
                             f"got {threshold}")
        self.in_features = in_features
        self.out_features = out_features
        self.threshold = float(threshold)
        self.compute_dtype = compute_dtype
        self.register_buffer("CB", torch.zeros(out_features, in_features, dtype=torch.int8,
                                               device=device))
        self.register_buffer("SCB", torch.zeros(out_features, dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32,
                                                     device=device))
        else:
            self.bias = None

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    threshold: float = 6.0,
                    compute_dtype: torch.dtype = torch.bfloat16) -> "Int8Linear":
        """Quantize an (out_features, in_features) weight, as stored (fp32/fp16/bf16, on any
        device; the result lives on the weight's device). NaN or inf weights are an error."""
        if weight.dim() != 2:
            raise ValueError(f"Int8Linear.from_weight wants a 2-D (out, in) weight, "
                             f"got {tuple(weight.shape)}")
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, bias=bias is not None, threshold=threshold,
                    compute_dtype=compute_dtype, device=weight.device)
        CB, SCB = quantize_int8(weight.detach())
        layer.CB.copy_(CB)
        layer.SCB.copy_(SCB)
        if bias is not None:
            layer.bias.copy_(bias.detach().float())
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: float = 6.0,
                    compute_dtype: torch.dtype = torch.bfloat16) -> "Int8Linear":
        """Swap target for a (frozen) nn.Linear: same in/out features and bias, weight in int8."""
        return cls.from_weight(linear.weight, linear.bias, threshold, compute_dtype)

    def _scales(self) -> torch.Tensor:
        if self.SCB.dtype != torch.float32:
            raise TypeError(f"Int8Linear SCB is {self.SCB.dtype}, not float32: was the model cast "
                            "with .to(dtype) after quantization? Quantize after casting, and use "
                            "compute_dtype for the matmul precision.")
        return self.SCB

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense (out_features, in_features) weight in `dtype` (default: compute_dtype)."""
        return dequantize_int8(self.CB, self._scales(), dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        args = (x.to(self.compute_dtype), self.CB, self._scales(), self.threshold, self.bias)
        matmul = int8_linear_op if torch.compiler.is_compiling() else Int8MatmulFn.apply
        return matmul(*args).to(x.dtype)  # (..., in) -> (..., out)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, threshold={self.threshold}, "
                f"compute_dtype={self.compute_dtype}")


def int8_hook(threshold: float = 6.0, compute_dtype=torch.bfloat16, device="cpu"):
    """A linear_hook (formats/load.py's load_pretrained) that stores every projection inside the
    blocks as an Int8Linear as it streams in, quantized from the weight as the checkpoint stores
    it, so peak memory never holds the full-precision model. Embeddings, norms and lm_head stay in
    `dtype`, as transformers' load_in_8bit leaves lm_head."""
    def hook(model: nn.Module, key: str, t: torch.Tensor) -> bool:
        if not (key.startswith("layers.") and key.endswith("_proj.weight")):
            return False
        layer = Int8Linear.from_weight(t.to(device=device), threshold=threshold,
                                       compute_dtype=compute_dtype)
        model.set_submodule(key.removesuffix(".weight"), layer)
        return True

    return hook
