"""NF4Linear: a frozen nn.Linear stored in 4-bit NormalFloat, the base layer of QLoRA.

QLoRA (https://arxiv.org/abs/2305.14314) keeps the pretrained weight W0 frozen in NF4 and trains
only small adapters on top. This module is the frozen part, a module swap over `nn.Linear`:

    y = x @ dequant(W0)^T (+ b)      computed in `compute_dtype` (bf16), returned in x's dtype
    dL/dx = dL/dy @ dequant(W0)      no gradient for W0 (it is a buffer, not a parameter)

Storage per weight: 4 bits of code + 32/64 bits of absmax = 4.5 bits, or 4.127 bits with double
quantization (absmax itself in 8 bits; see minillm/finetune/double_quant.py). Everything lives in
buffers, so `state_dict()`, `load_state_dict()` and `.to(device)` work as for any module. Do not
cast a quantized model with `.to(dtype)` / `.half()`: PyTorch would round the float32 scales (the
uint8 codes are left alone); the forward pass then raises. Cast before quantizing, and choose the
matmul precision with `compute_dtype`.

The numerics are in minillm.kernels.nf4 (format, bit for bit as bitsandbytes) and nf4_matmul (the
fused GEMV for decode and dequantize + cuBLAS for batches).
"""

import torch
from torch import nn

from minillm.finetune.double_quant import DQ_BLOCKSIZE, double_dequantize, double_quantize
from minillm.kernels.nf4 import dequantize_nf4, quantize_nf4
from minillm.kernels.nf4_matmul import nf4_matmul, nf4_matmul_backward_input


class NF4MatmulFn(torch.autograd.Function):
    """y = x @ W^T with W in NF4; backward returns grad_x = grad_y @ W and nothing for the weight.
    The eager path: an autograd.Function costs the least Python time per call (a 7B model makes 224
    of these calls per token)."""

    @staticmethod
    def forward(ctx, x, packed, absmax, out_features, in_features, blocksize):
        ctx.save_for_backward(packed, absmax)
        ctx.shape = (out_features, in_features, blocksize)
        return nf4_matmul(x, packed, absmax, out_features, in_features, blocksize)

    @staticmethod
    def backward(ctx, grad_y):
        packed, absmax = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = nf4_matmul_backward_input(grad_y.contiguous(), packed, absmax, *ctx.shape)
        return grad_x, None, None, None, None, None


# Under torch.compile the same maths runs as a PyTorch custom op instead: the compiler treats it as
# one opaque call, so `torch.compile(decode_one_token, fullgraph=True)` and CUDA graphs (generate.py
# --compile) capture the model around it whatever happens inside (backend choice, a Triton launch,
# the interpreter). The fake ("meta") functions give the compiler the output shapes without running
# it. (In eager mode a custom op costs ~40 us more per call than NF4MatmulFn, hence the two doors.)


@torch.library.custom_op("minillm::nf4_matmul", mutates_args=())
def nf4_linear_op(
    x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, out_features: int,
    in_features: int, blocksize: int
) -> torch.Tensor:
    """y = x @ W^T with W (out_features, in_features) in NF4: (..., in) -> (..., out), in x's
    dtype."""
    return nf4_matmul(x, packed, absmax, out_features, in_features, blocksize)


@nf4_linear_op.register_fake
def _(x, packed, absmax, out_features, in_features, blocksize):
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.custom_op("minillm::nf4_matmul_grad_x", mutates_args=())
def nf4_grad_x_op(
    grad_y: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, out_features: int,
    in_features: int, blocksize: int,
) -> torch.Tensor:
    """grad_x = grad_y @ W: (..., out) -> (..., in), in grad_y's dtype."""
    return nf4_matmul_backward_input(grad_y.contiguous(), packed, absmax, out_features, in_features,
                                     blocksize)


@nf4_grad_x_op.register_fake
def _(grad_y, packed, absmax, out_features, in_features, blocksize):
    return grad_y.new_empty(*grad_y.shape[:-1], in_features)


def _save_for_backward(ctx, inputs, output):
    _x, packed, absmax, out_features, in_features, blocksize = inputs
    ctx.save_for_backward(packed, absmax)
    ctx.shape = (out_features, in_features, blocksize)


def _backward(ctx, grad_y):
    """grad_x only, as NF4MatmulFn.backward: the frozen NF4 weight gets no gradient."""
    packed, absmax = ctx.saved_tensors
    grad_x = nf4_grad_x_op(grad_y, packed, absmax, *ctx.shape) if ctx.needs_input_grad[0] else None
    return grad_x, None, None, None, None, None


nf4_linear_op.register_autograd(_backward, setup_context=_save_for_backward)


class NF4Linear(nn.Module):
    """A frozen linear layer whose (out_features, in_features) weight is stored in NF4.

    Build it with `NF4Linear.from_linear(linear)` or `NF4Linear.from_weight(w)`; the plain
    constructor allocates empty buffers of the right sizes, to be filled by `load_state_dict`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        blocksize: int = 64,
        double_quant: bool = False,
        compute_dtype: torch.dtype = torch.bfloat16,
        device=None,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.blocksize = blocksize
        self.double_quant = double_quant
        self.compute_dtype = compute_dtype
        n = in_features * out_features
        n_blocks = -(-n // blocksize)
        self.register_buffer("packed", torch.zeros((n + 1) // 2, dtype=torch.uint8, device=device))
        if double_quant:
            self.register_buffer("qabsmax", torch.zeros(n_blocks, dtype=torch.uint8, device=device))
            n_scales = -(-n_blocks // DQ_BLOCKSIZE)
            self.register_buffer("absmax_scales",
                                 torch.zeros(n_scales, dtype=torch.float32, device=device))
            self.register_buffer("absmax_offset",
                                 torch.zeros((), dtype=torch.float32, device=device))
        else:
            self.register_buffer("absmax",
                                 torch.zeros(n_blocks, dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias",
                                 torch.zeros(out_features, dtype=torch.float32, device=device))
        else:
            self.bias = None

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        blocksize: int = 64,
        double_quant: bool = False,
        compute_dtype: torch.dtype = torch.bfloat16,
    ) -> "NF4Linear":
        """Quantize an (out_features, in_features) weight (any float dtype, on any device; the
        result lives on the weight's device). The caller may drop `weight` afterwards."""
        if weight.dim() != 2:
            raise ValueError(f"NF4Linear.from_weight wants a 2-D (out, in) weight, "
                             f"got {tuple(weight.shape)}")
        out_features, in_features = weight.shape
        layer = cls(
            in_features, out_features, bias=bias is not None, blocksize=blocksize,
            double_quant=double_quant, compute_dtype=compute_dtype, device=weight.device,
        )  # fmt: skip
        packed, absmax = quantize_nf4(weight.detach(), blocksize)
        layer.packed.copy_(packed)
        if double_quant:
            qabsmax, scales, offset = double_quantize(absmax)
            layer.qabsmax.copy_(qabsmax)
            layer.absmax_scales.copy_(scales)
            layer.absmax_offset.copy_(offset)
        else:
            layer.absmax.copy_(absmax)
        if bias is not None:
            layer.bias.copy_(bias.detach().float())
        return layer

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        blocksize: int = 64,
        double_quant: bool = False,
        compute_dtype: torch.dtype = torch.bfloat16,
    ) -> "NF4Linear":
        """Swap target for a (frozen) nn.Linear: same in/out features and bias, weight in NF4."""
        return cls.from_weight(linear.weight, linear.bias, blocksize, double_quant, compute_dtype)

    def absmax_f32(self) -> torch.Tensor:
        """The per-block scales in float32 (undoing the double quantization if there is one)."""
        scales = self.absmax_scales if self.double_quant else self.absmax
        if scales.dtype != torch.float32:
            raise TypeError(
                f"NF4Linear scales are {scales.dtype}, not float32: was the model cast with "
                ".to(dtype) after quantization? Cast before quantize_model_ and use compute_dtype "
                "for the matmul precision."
            )
        if self.double_quant:
            return double_dequantize(self.qabsmax, self.absmax_scales, self.absmax_offset)
        return self.absmax

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense (out_features, in_features) weight in `dtype` (default: compute_dtype)."""
        shape = (self.out_features, self.in_features)
        dtype = dtype or self.compute_dtype
        return dequantize_nf4(self.packed, self.absmax_f32(), shape, self.blocksize, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        args = (x.to(self.compute_dtype), self.packed, self.absmax_f32(), self.out_features,
                self.in_features, self.blocksize)  # fmt: skip
        matmul = nf4_linear_op if torch.compiler.is_compiling() else NF4MatmulFn.apply
        y = matmul(*args)  # (..., in) -> (..., out)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, blocksize={self.blocksize}, "
            f"double_quant={self.double_quant}, compute_dtype={self.compute_dtype}"
        )


def quantize_model_(model: nn.Module, skip=("lm_head",), **kwargs) -> int:
    """Replace, in place, every nn.Linear of `model` whose qualified name does not end with a name
    in `skip` (matched on whole dotted components: "lm_head" skips "lm_head" and "x.lm_head", not
    "my_lm_head") by an NF4Linear; kwargs go to `NF4Linear.from_linear`. Each dense weight is
    dropped as soon as its layer is swapped, so peak memory grows by one layer, not by a model.
    `model` itself is never swapped (it has no parent to hold the new module). Returns the number of
    layers swapped.
    """
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if name
        and isinstance(module, nn.Linear)
        and not any(name == s or name.endswith("." + s) for s in skip)
    ]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, NF4Linear.from_linear(linear, **kwargs))
        # Free the dense weight now, even if something else still holds the old module.
        linear.weight = None
        linear.bias = None
    return len(targets)


def nf4_hook(blocksize: int = 64, double_quant: bool = False, compute_dtype=torch.bfloat16,
             device="cpu"):
    """A linear_hook that quantizes every projection inside the blocks to NF4 as it streams in, so
    peak memory never holds the full-precision model. Embeddings, norms and lm_head stay in
    `dtype`."""
    def hook(model: nn.Module, key: str, t: torch.Tensor) -> bool:
        if not (key.startswith("layers.") and key.endswith("_proj.weight")):
            return False
        module_path = key.removesuffix(".weight")
        parent_path, _, child = module_path.rpartition(".")
        layer = NF4Linear.from_weight(
            t.to(device=device, dtype=torch.float32), blocksize=blocksize,
            double_quant=double_quant, compute_dtype=compute_dtype,
        )
        setattr(model.get_submodule(parent_path), child, layer)
        return True

    return hook
