"""Standard-ONNX quantizers: each mct-quantizers inferable quantizer as QuantizeLinear -> Clip -> DequantizeLinear.

ONNX's QuantizeLinear stores 8-bit integers only; a Clip in the integer domain between it and DequantizeLinear
narrows them to the quantizer's n-bit range, which any ONNX runtime executes. The scale and zero point are the
quantizer's own (the values its `torch.fake_quantize_per_*_affine` call uses), so the exported grid is exactly
the converted model's. Where the n-bit range is the whole int8 / uint8 range the Clip would do nothing and is
left out: 8-bit quantizers export as plain QuantizeLinear -> DequantizeLinear pairs.

One difference is inherent: torch's fake-quant multiplies by the reciprocal of the scale, QuantizeLinear
divides by it. For a scale that is not a power of two the two can round differently when x / scale is within
float rounding of a half-integer, so an input at a rounding tie may land one step apart; elsewhere the results
are identical.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from mct_quantizers import PytorchActivationQuantizationHolder, PytorchQuantizationWrapper
from mct_quantizers.pytorch.quantizers import (
    ActivationSymmetricInferableQuantizer,
    ActivationUniformInferableQuantizer,
    WeightsSymmetricInferableQuantizer,
    WeightsUniformInferableQuantizer,
)
from torch import fx, nn

from trainable_infra.common.errors import QuantizationConfigError
from trainable_infra.pytorch_backend.integer import IntegerGlobalAveragePool, IntegerMerge, IntegerQuantizationWrapper
from trainable_infra.pytorch_backend.quantize import _grid_source

QCDQ_MIN_OPSET = 13  # per-axis QuantizeLinear / DequantizeLinear

_STORAGE = {  # (q_min, q_max) the storage type holds, by whether the grid is signed
    True: (torch.int8, -128, 127),
    False: (torch.uint8, 0, 255),
}


@dataclasses.dataclass(frozen=True)
class QCDQGrid:
    """An inferable quantizer's integer grid as ONNX sees it.

    Attributes:
        scale: float32, 0-d per-tensor or 1-D per-channel.
        zero_point: int64 of the same shape as `scale`.
        axis: the channel axis, or None per-tensor.
        q_min, q_max: the integer range.
    """

    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None
    q_min: int
    q_max: int

    @property
    def storage(self) -> torch.dtype:
        """int8 for a signed grid, uint8 for an unsigned one."""
        return _STORAGE[self.q_min < 0][0]

    @property
    def needs_clip(self) -> bool:
        """Whether the n-bit range is narrower than the storage type's."""
        _, low, high = _STORAGE[self.q_min < 0]
        return (self.q_min, self.q_max) != (low, high)


def _numpy(value: Any, dtype: type) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value).astype(dtype)


def qcdq_grid(quantizer: Any, where: str, unsigned_storage: bool = False) -> QCDQGrid:
    """The grid of an mct-quantizers symmetric, power-of-two or uniform PyTorch inferable quantizer.

    `where` names the quantizer in error messages. With `unsigned_storage` a signed grid is stored as uint8 with
    its zero point moved by 128 (the same values): onnxruntime's integer kernels take uint8 activations, and
    converts int8 ones itself only where QuantizeLinear feeds DequantizeLinear directly (no Clip between).
    """
    if isinstance(quantizer, (WeightsSymmetricInferableQuantizer, WeightsUniformInferableQuantizer)):
        scale, zero_point = quantizer.scales, quantizer.zero_points
        axis = quantizer.channel_axis if quantizer.per_channel else None
    elif isinstance(quantizer, ActivationUniformInferableQuantizer):
        scale, zero_point, axis = quantizer.scale, quantizer.zero_point, None
    elif isinstance(quantizer, ActivationSymmetricInferableQuantizer):
        scale, zero_point, axis = quantizer.scales, quantizer.zero_points, None
    else:
        raise QuantizationConfigError(
            f"format='qcdq' exports symmetric, power-of-two and uniform quantizers; {where} is a "
            f"{type(quantizer).__name__}: export this model with format='custom_ops'"
        )
    # torch's fake-quant ops take the scale as float32 (a Python float is rounded to it): so does ONNX.
    scale, zero_point = _numpy(scale, np.float32).reshape(-1), _numpy(zero_point, np.int64).reshape(-1)
    if axis is None:
        scale, zero_point = scale.reshape(()), zero_point.reshape(())
    q_min, q_max = int(quantizer.min_quantized_domain), int(quantizer.max_quantized_domain)
    if unsigned_storage and q_min < 0 and q_min >= -128 and q_max <= 127:
        zero_point, q_min, q_max = np.asarray(zero_point + 128), q_min + 128, q_max + 128
    _, low, high = _STORAGE[q_min < 0]
    if q_min < low or q_max > high:
        raise QuantizationConfigError(
            f"format='qcdq' stores the integers as int8 / uint8, at most 8 bits; {where} has "
            f"{quantizer.num_bits} bits (integers {q_min}..{q_max}): export this model with format='custom_ops'"
        )
    return QCDQGrid(scale, zero_point, axis, q_min, q_max)


class _QuantizeClipDequantize(torch.autograd.Function):
    """Runs the inferable quantizer; the ONNX exporter writes QuantizeLinear -> Clip -> DequantizeLinear."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, quantizer: Any, grid: QCDQGrid) -> torch.Tensor:
        return quantizer(x)

    @staticmethod
    def symbolic(g: Any, x: Any, quantizer: Any, grid: QCDQGrid) -> Any:
        scale = g.op("Constant", value_t=torch.from_numpy(grid.scale))
        zero_point = g.op("Constant", value_t=torch.from_numpy(grid.zero_point).to(grid.storage))
        axis = {} if grid.axis is None else {"axis_i": grid.axis}
        q = g.op("QuantizeLinear", x, scale, zero_point, **axis)
        if grid.needs_clip:
            low = g.op("Constant", value_t=torch.tensor(grid.q_min, dtype=grid.storage))
            high = g.op("Constant", value_t=torch.tensor(grid.q_max, dtype=grid.storage))
            q = g.op("Clip", q, low, high)
        return g.op("DequantizeLinear", q, scale, zero_point, **axis)


class _DequantizeConstant(torch.autograd.Function):
    """Returns the quantized tensor; the ONNX exporter writes its integers as an initializer -> DequantizeLinear."""

    @staticmethod
    def forward(ctx: Any, quantized: torch.Tensor, integers: torch.Tensor, scale: np.ndarray, zero_point: Any,
                axis: int | None) -> torch.Tensor:
        return quantized

    @staticmethod
    def symbolic(g: Any, quantized: Any, integers: Any, scale: np.ndarray, zero_point: Any, axis: int | None) -> Any:
        # `integers` and `zero_point` are tensors of the export copy: the exporter writes them as initializers.
        scale_node = g.op("Constant", value_t=torch.from_numpy(scale))
        return g.op("DequantizeLinear", integers, scale_node, zero_point, **({} if axis is None else {"axis_i": axis}))


class QCDQWeight:
    """Stands in for a weight quantizer while a model is exported: the weight's integers are stored in the file
    (int8 / uint8, as onnxruntime's `quantize_static` writes them) behind a DequantizeLinear."""

    def __init__(self, quantizer: Any, weight: torch.Tensor, where: str):
        self.grid = qcdq_grid(quantizer, where)
        with torch.no_grad():
            quantized = quantizer(weight.detach())
            scale = torch.from_numpy(self.grid.scale)
            zero_point = torch.from_numpy(self.grid.zero_point)
            if self.grid.axis is not None:
                view = [1] * quantized.dim()
                view[self.grid.axis] = -1
                scale, zero_point = scale.view(view), zero_point.view(view)
            integers = torch.round(quantized.float().cpu() / scale) + zero_point
        self.quantized = quantized
        self.integers = integers.to(self.grid.storage)
        self.zero_point = torch.from_numpy(self.grid.zero_point).to(self.grid.storage)

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        # The quantized weight is a constant of the export copy; its float form never reaches the file.
        return _DequantizeConstant.apply(self.quantized, self.integers, self.grid.scale, self.zero_point,
                                         self.grid.axis)


class QCDQBias:
    """Stands in for the int32 bias of an integer layer while it is exported: int32 initializer -> DequantizeLinear
    with scale Δ_in·Δ_w, the layout onnxruntime's QLinearConv / QGemm take their bias from."""

    def __init__(self, integers: torch.Tensor, scale: torch.Tensor):
        self.integers = integers.detach().cpu().to(torch.int32)
        scale = scale.detach().float().cpu().reshape(-1)
        self.scale = (scale.reshape(()) if scale.numel() == 1 else scale).numpy()
        self.axis = None if scale.numel() == 1 else 0
        self.zero_point = torch.zeros(self.scale.shape, dtype=torch.int32)

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        return _DequantizeConstant.apply(inputs, self.integers, self.scale, self.zero_point, self.axis)


class QCDQQuantizer:
    """Stands in for an inferable quantizer while a model is exported: same outputs, standard ONNX ops."""

    def __init__(self, quantizer: Any, where: str):
        self.quantizer = quantizer
        self.grid = qcdq_grid(quantizer, where, unsigned_storage=True)

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        return _QuantizeClipDequantize.apply(inputs, self.quantizer, self.grid)


# Operations that return several tensors (a holder's quantizer cannot follow them directly; it follows each item).
_MULTIPLE_OUTPUTS = {"chunk", "split", torch.chunk, torch.split}


def requantize_after_reshapes(model: nn.Module) -> None:
    """In a copy made for export: after each max pool or reshape of a holder's output, pass the result through that
    holder again (a no-op on values already on its grid).

    onnxruntime runs DequantizeLinear -> MaxPool / Reshape -> QuantizeLinear with one grid on the integers, and
    forms its integer kernels (QLinearConv, QGemm, QLinearAdd, QLinearConcat) only where each input is a
    DequantizeLinear: it does not move one across such an operation by itself.
    """
    if not isinstance(model, fx.GraphModule):
        return
    modules = dict(model.named_modules())
    changed = False
    for node in list(model.graph.nodes):
        if _grid_source(node, modules) is node or node.target in _MULTIPLE_OUTPUTS:
            continue
        source = _grid_source(node.args[0], modules)
        if not isinstance(source, fx.Node) or source.op != "call_module":
            continue
        if not isinstance(modules.get(source.target), PytorchActivationQuantizationHolder):
            continue
        with model.graph.inserting_after(node):
            again = model.graph.call_module(source.target, (node,))
        node.replace_all_uses_with(again, delete_user_cb=lambda user, again=again: user is not again)
        changed = True
    if changed:
        model.recompile()


def use_qcdq_quantizers(model: nn.Module) -> None:
    """Replace, in place, every quantizer of `model`'s mct-quantizers wrappers and holders by a `QCDQQuantizer`.

    Meant for a copy of the model made for export. Raises `QuantizationConfigError`, before changing anything,
    if a quantizer has no QCDQ form.
    """
    wrappers, holders = [], []
    for name, module in model.named_modules():
        if isinstance(module, PytorchQuantizationWrapper):
            variables = {key: weight for key, weight, _ in module.get_weights_vars()}
            quantizers = {
                key: QCDQWeight(quantizer, variables[key], f"the {key!r} quantizer of {name!r}")
                for key, quantizer in module.weights_quantizers.items()
            }
            if isinstance(module, IntegerQuantizationWrapper) and module.integer_bias is not None:
                quantizers["bias"] = QCDQBias(module.integer_bias, module.bias_scale)
            wrappers.append((module, quantizers))
        elif isinstance(module, PytorchActivationQuantizationHolder):
            where = f"the activation quantizer of {name!r}"
            holders.append((module, QCDQQuantizer(module.activation_holder_quantizer, where)))
    for module, quantizers in wrappers:
        module.weights_quantizers = quantizers
        # The wrapper's forward reads the quantizers from its (name, weight, quantizer) list, not from the dict.
        weights_vars = module.get_weights_vars()
        weights_vars[:] = [(key, weight, quantizers[key]) for key, weight, _ in weights_vars]
        if "bias" in quantizers:
            # As mct-quantizers does for the weight: the layer's bias parameter becomes a plain tensor attribute
            # that the wrapper sets to the quantizer's output before each call.
            bias = module.layer.bias.detach()
            del module.layer.bias
            module.layer.bias = bias
            weights_vars.append(("bias", bias, quantizers["bias"]))
        if isinstance(module, IntegerQuantizationWrapper):
            module.integer_arithmetic = False
    for module, quantizer in holders:
        module.activation_holder_quantizer = quantizer
    for module in model.modules():
        if isinstance(module, (IntegerGlobalAveragePool, IntegerMerge)):
            # The float operation between DequantizeLinear and QuantizeLinear: onnxruntime's integer kernel.
            module.integer_arithmetic = False
