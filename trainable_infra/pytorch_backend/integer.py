"""A layer as an integer kernel computes it: the int32 bias and the exact accumulator (`common.integer`).

A convolution or linear layer whose input comes from an activation quantizer and whose weight is quantized
runs, in onnxruntime (QLinearConv / QGemm), TensorRT and TFLite, as acc = Σ x_int·w_int + b_int in int32 and
then acc·s with s = Δ_in·Δ_w. Written in float, the same layer sums its products in whatever order the
float kernel picks and rounds each partial sum, so values near a rounding boundary of the next quantizer
land on either side. In eval mode the layers here compute acc exactly (integer-valued operands, in float32
while no sum can reach 2^24, else in float64) and then float32(acc)·s, as the integer kernel does.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from mct_quantizers import PytorchQuantizationWrapper
from torch import nn

from trainable_infra.common.integer import INT32_MAX, INT32_MIN
from trainable_infra.pytorch_backend.quantizers import triton_kernels
from trainable_infra.pytorch_backend.quantizers.fake_quant import divide

# Below 2^24 every integer is a float32 and so is every partial sum of integer products, in any order.
_FLOAT32_EXACT = 2**24


class _QuantizeBias(torch.autograd.Function):
    """round(b / s)·s with s = Δ_in·Δ_w forward, the identity backward (to the bias only, never to the steps)."""

    @staticmethod
    def forward(ctx: Any, bias: torch.Tensor, x_step: torch.Tensor, w_step: torch.Tensor) -> torch.Tensor:
        if (triton_kernels.applies(bias) and bias.dtype == x_step.dtype == w_step.dtype == torch.float32
                and x_step.numel() == 1 and w_step.numel() in (1, bias.numel())):
            return triton_kernels.quantize_bias(bias.detach(), x_step, w_step)  # one kernel for the five below
        scale = x_step * w_step
        quotient = divide(bias.detach().float(), scale)
        return torch.round(quotient).clamp_(INT32_MIN, INT32_MAX).mul_(scale).to(bias.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad, None, None


def quantize_bias(bias: torch.Tensor, x_step: torch.Tensor, w_step: torch.Tensor) -> torch.Tensor:
    """round(bias / s)·s with s = Δ_in·Δ_w (ties to even, saturated at the int32 range), with a straight-through
    gradient.

    `x_step` is the input's step (one value), `w_step` the weight's, a float32 vector with one value per output
    channel (or one value); s is their float32 product.
    """
    # One autograd node rather than q + (b - b): fewer small kernels per layer and step, the same values.
    return _QuantizeBias.apply(bias, x_step.detach(), w_step.detach())


def integer_bias(bias: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """round(bias / scale) as float64 integers (exact), saturated at the int32 range."""
    # Clamped in float64: INT32_MAX is not a float32 (it rounds to 2^31, which an int32 cast wraps to -2^31).
    return torch.round(bias.detach().float() / scale).double().clamp_(INT32_MIN, INT32_MAX)


def accumulator_dtype(module: nn.Module, x_abs_max: int, w_abs_max: int) -> torch.dtype:
    """float32 where no sum of x_int·w_int of `module` can reach 2^24 (then it is exact in any order), else float64."""
    weight = module.weight
    # Products summed per output: every weight element of one output channel (conv: in/groups x kernel window).
    terms = math.prod(weight.shape[1:])
    return torch.float32 if terms * x_abs_max * w_abs_max < _FLOAT32_EXACT else torch.float64


def integer_forward(
    module: nn.Module,
    x: torch.Tensor,
    x_step: torch.Tensor,
    w_quantized: torch.Tensor,
    w_step: torch.Tensor,
    b_int: torch.Tensor | None,
    scale: torch.Tensor,
    acc_dtype: torch.dtype,
    output_grid: tuple[torch.Tensor, ...] | None = None,
    output_clip: float | None = None,
) -> torch.Tensor:
    """`module` (a Conv1d/2d/3d or Linear) on `x` as the integer kernel computes it: float32(acc + b_int)·s.

    `x` and `w_quantized` lie on their grids (steps `x_step`, per-tensor, and `w_step`, per output channel or
    one value); their integers relative to the zero point are round(x / Δ). With `output_grid` = (Δ_y, z_y,
    q_min, q_max), the grid of the quantizer the output goes to, the result is requantized onto it as
    onnxruntime's QLinearConv / QGemm do (MLAS's requantization): q = clip(round(float32(acc)·M) + z_y), M the
    float32 (Δ_in·Δ_w)/Δ_y, ties to even; then (q - z_y)·Δ_y, which that quantizer leaves unchanged. With
    `output_clip` (a ReLU6 between the layer and that quantizer) the requantization applies only where the grid's
    uint8 range (255 - z_y)·Δ_y lies within it, else the result is float32(acc)·s.
    """
    x_int = torch.round(x / x_step).to(acc_dtype)
    w_int = torch.round(w_quantized / w_step.reshape((-1,) + (1,) * (w_quantized.dim() - 1))).to(acc_dtype)
    if isinstance(module, nn.Linear):
        acc = torch.nn.functional.linear(x_int, w_int)
        channel_view = (-1,)
    else:
        acc = module._conv_forward(x_int, w_int, None)
        channel_view = (-1,) + (1,) * (acc.dim() - 2)
    if b_int is not None:
        # The sum is exact in float64 (|acc + b| < 2^53) and rounded to float32 once, as float(int32) is.
        acc = acc.double() + b_int.reshape(channel_view)
    if output_grid is None:
        return acc.float() * scale.reshape(channel_view)
    y_step, y_zero, q_min, q_max = output_grid
    multiplier = (scale / y_step).reshape(channel_view)
    q = torch.clamp(torch.round(acc.float() * multiplier) + y_zero, q_min, q_max)
    requantized = (q - y_zero) * y_step
    if output_clip is None:
        return requantized
    # Selected on the device, not in Python: no host sync, and torch.compile keeps one graph.
    folded = (255 - y_zero) * y_step <= output_clip
    return torch.where(folded, requantized, acc.float() * scale.reshape(channel_view))


def is_integer_layer(module: nn.Module) -> bool:
    """Whether `module` is a layer `integer_forward` computes: a stock Conv1d/2d/3d or Linear."""
    forward = type(module).forward
    return forward in (nn.Linear.forward, nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward)


def holder_grid(holder: nn.Module) -> tuple[torch.Tensor, ...]:
    """(Δ, z, q_min, q_max) of a trainable activation holder's grid, as float32 scalars."""
    quantizer = holder.activation_holder_quantizer
    step, zero = quantizer.grid()
    return (step.detach().float().reshape(()), zero.float().reshape(()),
            torch.tensor(float(quantizer.q_min), device=step.device),
            torch.tensor(float(quantizer.q_max), device=step.device))


class IntegerQuantizationWrapper(PytorchQuantizationWrapper):
    """An mct-quantizers `PytorchQuantizationWrapper` of a Conv1d/2d/3d or Linear that computes as the integer
    kernel does: its bias lies on the int32 grid s = Δ_in·Δ_w, and in eval mode its products are accumulated
    exactly and scaled once (`integer_forward`), as the trained model's eval computes them.

    Args:
        module: the layer, its bias already on the grid (`bias = b_int·s`).
        weights_quantizers: {"weight": the mct-quantizers inferable weight quantizer}.
        input_quantizer: the mct-quantizers inferable activation quantizer whose output is the layer's input.
        input_step: Δ_in, a float32 tensor of one value.
        weight_step: Δ_w, float32, one value per output channel (or one value).
        integer_bias: b_int (float64 integers, per output channel), or None for a layer without bias.
        acc_dtype: the dtype that holds the accumulator exactly (`accumulator_dtype`).
    """

    def __init__(
        self,
        module: nn.Module,
        weights_quantizers: dict,
        input_quantizer: Any,
        input_step: torch.Tensor,
        weight_step: torch.Tensor,
        integer_bias: torch.Tensor | None,
        acc_dtype: torch.dtype,
    ):
        super().__init__(module, weights_quantizers)
        self.input_quantizer = input_quantizer
        self.register_buffer("input_step", input_step.detach().float().clone())
        self.register_buffer("weight_step", weight_step.detach().float().clone())
        self.register_buffer("bias_scale", self.input_step * self.weight_step)
        self.register_buffer("integer_bias", None if integer_bias is None else integer_bias.detach().double().clone())
        self.acc_dtype = acc_dtype
        # (Δ_y, z_y, q_min, q_max) of the quantizer right after the layer, when its requantization is the kernel's.
        self.register_buffer("output_grid", None)
        self.output_clip: float | None = None  # 6.0 when a ReLU6 stands between the layer and that quantizer
        # Export traces the float form (dequantize -> Conv / Gemm), which the runtime turns into its integer kernel.
        self.integer_arithmetic = True

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The layer on its quantized input, accumulated exactly in eval mode."""
        if self.training or not self.integer_arithmetic or len(args) != 1 or kwargs or args[0].dtype != torch.float32:
            return super().forward(*args, **kwargs)
        ((_, weight, quantizer),) = self.get_weights_vars()
        output_grid = None if self.output_grid is None else tuple(self.output_grid)
        return integer_forward(self.layer, args[0], self.input_step, quantizer(weight), self.weight_step,
                               self.integer_bias, self.bias_scale, self.acc_dtype, output_grid, self.output_clip)


_ADAPTIVE_AVERAGE_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)


def is_global_average_pool(pool: Any) -> bool:
    """Whether `pool` is an adaptive average pooling module to one position per channel (global pooling)."""
    if not isinstance(pool, _ADAPTIVE_AVERAGE_POOLS):
        return False
    size = pool.output_size
    return all(s == 1 for s in (size if isinstance(size, (tuple, list)) else (size,)))


class IntegerGlobalAveragePool(nn.Module):
    """Global average pooling followed by an activation quantizer, computed in eval mode as onnxruntime's
    QLinearGlobalAveragePool does: the integers of the input summed exactly over the positions, then one
    rounding, q_y = round(Σ x_int · Δ_x / (Δ_y · K)) + z_y. The output lies on the following quantizer's grid,
    which then leaves it unchanged.

    A float mean rounds each partial sum; where the pooled value is a rounding tie of the next quantizer (K a power
    of two, Δ_y a power-of-two multiple of Δ_x), the float sum decides by the sign of its rounding error.

    Args:
        pool: the AdaptiveAvgPool1d/2d/3d(1) module; training and non-float32 inputs run it as it is.
    """

    def __init__(self, pool: nn.Module):
        super().__init__()
        self.pool = pool
        self.__dict__["_holders"] = None
        self.register_buffer("grid", None)  # frozen (Δ_x, Δ_y, z_y, q_min, q_max) of a converted model
        self.integer_arithmetic = True

    def link(self, input_holder: nn.Module, output_holder: nn.Module) -> None:
        """Take the grids from the trainable holders before and after the pooling, as they are at each call."""
        self.__dict__["_holders"] = (input_holder, output_holder)

    def freeze(self) -> None:
        """Keep the grids as they are now (for the converted model) and forget the holders."""
        self.grid = torch.stack([t.detach().float().reshape(()) for t in self._grids()])
        self.__dict__["_holders"] = None

    def _grids(self) -> tuple[torch.Tensor, ...]:
        if self.grid is not None:
            return tuple(self.grid)
        input_holder, output_holder = self._holders
        x_step = input_holder.activation_holder_quantizer.grid()[0]
        quantizer = output_holder.activation_holder_quantizer
        y_step, y_zero = quantizer.grid()
        return (x_step.reshape(()), y_step.reshape(()), y_zero.float().reshape(()),
                torch.tensor(float(quantizer.q_min)), torch.tensor(float(quantizer.q_max)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The pooling; in eval mode on its output grid, as the integer kernel computes it."""
        linked = self.grid is not None or self._holders is not None
        if self.training or not self.integer_arithmetic or not linked or x.dtype != torch.float32:
            return self.pool(x)
        x_step, y_step, y_zero, q_min, q_max = self._grids()
        dims = tuple(range(2, x.dim()))
        total = torch.round(x / x_step).double().sum(dim=dims, keepdim=True).float()
        positions = math.prod(x.shape[2:])
        scale = x_step / (y_step * positions)
        q = torch.clamp(torch.round(total * scale) + y_zero, q_min, q_max)
        return (q - y_zero) * y_step


def _storage_offset(q_min: torch.Tensor) -> float:
    """The zero-point shift of a grid's uint8 storage in the exported file: 128 for a signed grid (see qcdq)."""
    return 128.0 if float(q_min) < 0 else 0.0


def _fma(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """x·y + z in float32 with one rounding (the product of two float32 values is exact in float64)."""
    return (x.double() * y.double() + z.double()).float()


class IntegerMerge(nn.Module):
    """An addition or concatenation of quantized tensors followed by an activation quantizer, computed in eval
    mode as onnxruntime's QLinearAdd / QLinearConcat kernels do on x86; the output lies on the following
    quantizer's grid, which then leaves it unchanged.

    - Addition (MLAS's float path): with a, b the stored integers (uint8), r_a = Δ_a/Δ_c and r_b = Δ_b/Δ_c in
      float32, K = z_c - (r_a·z_a + r_b·z_b) and c = round(a·r_a + (b·r_b + K)), each a·r + t a fused multiply-add.
    - Concatenation: each input requantized by division, round(x / Δ_c) + z_c (QuantizeLinear), not by the
      reciprocal as torch's fake-quant does; an input on the output's grid is copied.

    Inputs of other shapes (broadcasting), training and non-float32 inputs take the float operation.

    Args:
        kind: "add" or "cat".
        dim: the concatenation axis.
    """

    def __init__(self, kind: str, dim: int = 0):
        super().__init__()
        self.kind, self.dim = kind, dim
        self.__dict__["_holders"] = None
        self.register_buffer("grids", None)  # frozen (inputs + 1) x (Δ, z, q_min, q_max) of a converted model
        self.integer_arithmetic = True

    def link(self, input_holders: list[nn.Module], output_holder: nn.Module) -> None:
        """Take the grids from the trainable holders of the inputs and of the output, as they are at each call."""
        self.__dict__["_holders"] = (list(input_holders), output_holder)

    def freeze(self) -> None:
        """Keep the grids as they are now (for the converted model) and forget the holders."""
        self.grids = torch.stack([torch.stack(grid) for grid in self._grids()])
        self.__dict__["_holders"] = None

    def _grids(self) -> list[tuple[torch.Tensor, ...]]:
        if self.grids is not None:
            return [tuple(row) for row in self.grids]
        inputs, output = self._holders
        return [holder_grid(h) for h in (*inputs, output)]

    def extra_repr(self) -> str:
        return self.kind if self.kind == "add" else f"cat, dim={self.dim}"

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The float operation; in eval mode on the output's grid, as the integer kernel computes it."""
        linked = self.grids is not None or self._holders is not None
        exact = (
            not self.training and self.integer_arithmetic and linked
            and all(x.dtype == torch.float32 for x in inputs)
            and (self.kind == "cat" or inputs[0].shape == inputs[1].shape)
        )
        if not exact:
            return inputs[0] + inputs[1] if self.kind == "add" else torch.cat(inputs, self.dim)
        *input_grids, (c_step, c_zero, c_min, c_max) = self._grids()
        c_offset = _storage_offset(c_min)
        c_store = c_zero + c_offset
        if self.kind == "add":
            (a_step, a_zero, a_min, _), (b_step, b_zero, b_min, _) = input_grids
            a_store, b_store = a_zero + _storage_offset(a_min), b_zero + _storage_offset(b_min)
            a = torch.round(inputs[0] / a_step) + a_store
            b = torch.round(inputs[1] / b_step) + b_store
            ratio_a, ratio_b = a_step / c_step, b_step / c_step
            constant = c_store - _fma(ratio_a, a_store, ratio_b * b_store)
            stored = torch.round(_fma(a, ratio_a, _fma(b, ratio_b, constant)))
        else:
            parts = []
            for x, (step, zero, q_min, _) in zip(inputs, input_grids, strict=True):
                if bool(step == c_step) and bool(zero + _storage_offset(q_min) == c_store):
                    parts.append(torch.round(x / step) + c_store)
                else:
                    parts.append(torch.clamp(torch.round(x / c_step) + c_store, 0, 255))
            stored = torch.cat(parts, self.dim)
        stored = torch.clamp(stored, c_min + c_offset, c_max + c_offset)
        return (stored - c_store) * c_step


@contextlib.contextmanager
def float_arithmetic(model: nn.Module) -> Iterator[None]:
    """Within the block, `model`'s integer layers, poolings and merges compute in float in eval mode too (their
    output then reaches the next quantizer unquantized, e.g. to measure that quantizer's noise)."""
    switched = [m for m in model.modules() if getattr(m, "integer_arithmetic", False)]
    for module in switched:
        module.integer_arithmetic = False
    try:
        yield
    finally:
        for module in switched:
            module.integer_arithmetic = True
