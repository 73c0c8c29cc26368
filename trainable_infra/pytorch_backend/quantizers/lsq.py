"""Learned-step-size quantizers (Esser et al., 2019): the threshold or the range is trained.

Forward is torch's fused fake-quant kernel, bit-exact with the inferable quantizer. Backward is written out
(DESIGN.md §4, `common.numerics.lsq_grads_*`): the straight-through input gradient on the unrounded range, and
the LSQ parameter gradients scaled by g = 1/sqrt(N·q_max).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from trainable_infra.common.enums import TrainingMethod
from trainable_infra.common.mct import QuantizationMethod, QuantizationTarget, mark_quantizer
from trainable_infra.common.numerics import lsq_grad_scale
from trainable_infra.pytorch_backend.base_quantizer import (
    BasePytorchActivationTrainableQuantizer,
    BasePytorchWeightTrainableQuantizer,
)
from trainable_infra.pytorch_backend.quantizers.fake_quant import ste_input_grad
from trainable_infra.pytorch_backend.quantizers.grid import SymmetricGrid, UniformGrid

_SYMMETRIC_METHODS = [QuantizationMethod.SYMMETRIC, QuantizationMethod.POWER_OF_TWO]


def _reduce(grad: torch.Tensor, dims: tuple[int, ...] | None, like: torch.Tensor) -> torch.Tensor:
    """Sum a per-element parameter gradient to the parameter's C-length shape and dtype."""
    total = grad.sum() if dims is None else grad.sum(dim=dims)
    return total.reshape(like.shape).to(like.dtype)


class _LSQSymmetricFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, threshold: torch.Tensor, q: SymmetricGrid, grad_scale: float):
        delta, zero_point = q.grid()
        ctx.save_for_backward(x, threshold, delta, zero_point)
        ctx.q, ctx.grad_scale = q, grad_scale
        return q.fake_quantize(x, delta, zero_point)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):
        x, threshold, delta, zero_point = ctx.saved_tensors
        q = ctx.q
        # Recomputed rather than saved: one cheap kernel instead of holding a second activation-sized tensor.
        y = q.fake_quantize(x, delta, zero_point)
        low, high = q.bounds(delta, zero_point)
        below, above = x < low, x > high
        grad_x = ste_input_grad(grad_output, x, low, high) if ctx.needs_input_grad[0] else None
        grad_threshold = None
        if ctx.needs_input_grad[1]:
            d_delta = torch.where(below, q.q_min, torch.where(above, q.q_max, (y - x) / delta.view(q.view)))
            grad = _reduce(grad_output * d_delta, q.reduce_dims, threshold) * (ctx.grad_scale / q.steps)
            # max(threshold, min_threshold) passes the gradient only where it is not clamped; the
            # power-of-two rounding passes it straight through.
            grad_threshold = grad * (threshold >= q.params.min_threshold)
        return grad_x, grad_threshold, None, None


class _LSQUniformFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, range_min: torch.Tensor, range_max: torch.Tensor, q: UniformGrid,
                grad_scale: float):
        delta, zero_point = q.grid()
        ctx.save_for_backward(x, range_min, range_max, delta, zero_point)
        ctx.q, ctx.grad_scale = q, grad_scale
        return q.fake_quantize(x, delta, zero_point)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):
        x, range_min, range_max, delta, zero_point = ctx.saved_tensors
        q = ctx.q
        y = q.fake_quantize(x, delta, zero_point)
        low, high = q.bounds(delta, zero_point)
        below, above = x < low, x > high
        inside = ~(below | above)
        grad_x = ste_input_grad(grad_output, x, low, high) if ctx.needs_input_grad[0] else None
        grad_min = grad_max = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            levels = q.q_max
            # Inside the range the rounding error (r - u) moves the ends apart or together; clipped values
            # pull the end they were clipped to.
            error = torch.where(inside, (y - x) / delta.view(q.view), 0.0) / levels
            scale = ctx.grad_scale
            grad_min = _reduce(grad_output * (below.to(x.dtype) - error), q.reduce_dims, range_min) * scale
            grad_max = _reduce(grad_output * (above.to(x.dtype) + error), q.reduce_dims, range_max) * scale
            grad_min = grad_min * (range_min <= 0)
            grad_max = grad_max * (range_max >= 0)
        return grad_x, grad_min, grad_max, None, None


class _LSQ:
    learnable_params = True

    def _grad_scale(self, inputs: torch.Tensor) -> float:
        if self.quantization_target is QuantizationTarget.Weights:
            return self.grad_scale
        # Activations: N is the number of features of one sample (the paper's N_F), read off the static shape.
        return lsq_grad_scale(max(math.prod(inputs.shape[1:]), 1), self.q_max)


class _LSQSymmetric(_LSQ, SymmetricGrid):
    def __call__(self, inputs: torch.Tensor, training: bool) -> torch.Tensor:
        """Fake-quantize `inputs`; in training the threshold receives the LSQ gradient."""
        if training:
            return _LSQSymmetricFunction.apply(inputs, self.threshold, self, self._grad_scale(inputs))
        delta, zero_point = self.grid()
        return self.fake_quantize(inputs, delta, zero_point)


class _LSQUniform(_LSQ, UniformGrid):
    def __call__(self, inputs: torch.Tensor, training: bool) -> torch.Tensor:
        """Fake-quantize `inputs`; in training the range ends receive the LSQ gradient."""
        if training:
            return _LSQUniformFunction.apply(
                inputs, self.range_min, self.range_max, self, self._grad_scale(inputs)
            )
        delta, zero_point = self.grid()
        return self.fake_quantize(inputs, delta, zero_point)


@mark_quantizer(QuantizationTarget.Weights, _SYMMETRIC_METHODS, TrainingMethod.LSQ)
class LSQSymmetricWeightQuantizer(_LSQSymmetric, BasePytorchWeightTrainableQuantizer):
    """Symmetric / power-of-two weight quantizer with a learned threshold (per-channel or per-tensor)."""


@mark_quantizer(QuantizationTarget.Weights, [QuantizationMethod.UNIFORM], TrainingMethod.LSQ)
class LSQUniformWeightQuantizer(_LSQUniform, BasePytorchWeightTrainableQuantizer):
    """Uniform weight quantizer with a learned range (per-channel or per-tensor)."""


@mark_quantizer(QuantizationTarget.Activation, _SYMMETRIC_METHODS, TrainingMethod.LSQ)
class LSQSymmetricActivationQuantizer(_LSQSymmetric, BasePytorchActivationTrainableQuantizer):
    """Symmetric / power-of-two activation quantizer (signed or unsigned) with a learned threshold."""


@mark_quantizer(QuantizationTarget.Activation, [QuantizationMethod.UNIFORM], TrainingMethod.LSQ)
class LSQUniformActivationQuantizer(_LSQUniform, BasePytorchActivationTrainableQuantizer):
    """Uniform activation quantizer with a learned range."""
