"""Learned-step-size quantizers (Esser et al., 2019): the threshold or the range is trained.

Forward is torch's fused fake-quant kernel, bit-exact with the inferable quantizer. Backward is written out
(DESIGN.md §4, `common.numerics.lsq_grads_*`): the straight-through input gradient on the unrounded range, and
the LSQ parameter gradients scaled by g = 1/sqrt(N·q_max). Eagerly on CUDA with triton, the Triton kernels
compute the grid from the parameters themselves: the forward is one kernel, the backward one pass over x for the
input gradient and per-block sums and one small kernel for the parameter gradients (`triton_kernels`); the sums
then differ from the torch path's by float32 summation order only. Each call keeps the step it quantized with
(`keep_step`), which the layer its output goes to reads back for its bias grid.
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
from trainable_infra.pytorch_backend.quantizers import triton_kernels
from trainable_infra.pytorch_backend.quantizers.fake_quant import eager, reciprocal, ste_input_grad
from trainable_infra.pytorch_backend.quantizers.grid import SymmetricGrid, UniformGrid

_SYMMETRIC_METHODS = [QuantizationMethod.SYMMETRIC, QuantizationMethod.POWER_OF_TWO]


def _sum(a: torch.Tensor, b: torch.Tensor, dims: tuple[int, ...] | None, eager: bool) -> torch.Tensor:
    """Σ a·b over everything (per-tensor) or over `dims` (per-channel); `eager` is what `eager()` said."""
    if dims is None and eager:
        # Eagerly a dot product saves the temporary a·b. Compiled, `reshape(-1)` would pin the reduction to the
        # logical (NCHW) order, which inductor walks element by element on a channels-last activation; eagerly
        # it would copy such a tensor into that order first, so the dot product runs over memory order.
        if a.dim() == 4 and not a.is_contiguous() and a.is_contiguous(memory_format=torch.channels_last):
            a, b = a.permute(0, 2, 3, 1), b.permute(0, 2, 3, 1)
        return torch.dot(a.reshape(-1), b.reshape(-1))
    return (a * b).sum() if dims is None else (a * b).sum(dim=dims)


def _steps(x: torch.Tensor, delta: torch.Tensor, zero_point: torch.Tensor, q: Any) -> tuple[torch.Tensor, ...]:
    """c = clip(x/Δ + z, q_min, q_max) and e = round(c) - c.

    For x inside the range e is the rounding error r - u of LSQ's ∂Q/∂Δ; outside it is 0 and c is the clipping
    level. Every per-element term of the LSQ gradients is a product of these with the upstream gradient, so
    the backward pass is a few float kernels and dot products, no masks.
    """
    c = (x * reciprocal(delta.view(q.view))).add_(zero_point.view(q.view)).clamp_(q.q_min, q.q_max)
    return c, torch.round(c).sub_(c)


def _use_triton(x: torch.Tensor, q: Any) -> bool:
    return triton_kernels.applies(x) and triton_kernels.supported(x, q.axis)


class _LSQSymmetricFunction(torch.autograd.Function):
    """(fake-quantized x, Δ): the LSQ threshold gradient backward; Δ (not differentiable) is the step used."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, threshold: torch.Tensor, q: SymmetricGrid, grad_scale: float):
        ctx.q, ctx.grad_scale, ctx.eager, ctx.triton = q, grad_scale, eager(), _use_triton(x, q)
        # Δ never receives a gradient: no zero tensor is made for it.
        ctx.set_materialize_grads(False)
        if ctx.triton:
            # The kernels compute the grid from the threshold themselves, forward and backward.
            ctx.save_for_backward(x, threshold)
            out, _, delta = triton_kernels.fake_quantize(x, q.kernel_grid(threshold), q.axis, q.q_min, q.q_max,
                                                         with_step=True)
        else:
            delta, zero_point = q.grid()
            ctx.save_for_backward(x, threshold, delta, zero_point)
            out = q.fake_quantize(x, delta, zero_point)
        ctx.mark_non_differentiable(delta)
        return out, delta

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor | None, _: Any):
        if grad_output is None:
            return None, None, None, None
        q = ctx.q
        needs_threshold = ctx.needs_input_grad[1]
        grad_threshold = None
        if ctx.triton:
            x, threshold = ctx.saved_tensors
            grid = q.kernel_grid(threshold)
            grad_x, partials = triton_kernels.lsq_backward(x, grad_output, grid, q.axis, q.q_min, q.q_max,
                                                           needs_threshold)
            if needs_threshold:
                grad, _ = triton_kernels.lsq_parameter_grads(partials, (threshold,), q.params.min_threshold,
                                                             ctx.grad_scale / q.steps, q.steps)
                grad_threshold = grad.to(threshold.dtype)
            return grad_x if ctx.needs_input_grad[0] else None, grad_threshold, None, None
        x, threshold, delta, zero_point = ctx.saved_tensors
        low, high = q.bounds(delta, zero_point)
        grad_x = ste_input_grad(grad_output, x, low, high, ctx.eager)
        if needs_threshold:
            c, error = _steps(x.float(), delta, zero_point, q)
            g = grad_output.float()
            # ∂Q/∂Δ = e inside and the clipping level c outside, where the straight-through gradient is 0.
            d_delta = _sum(g, error, q.reduce_dims, ctx.eager) + _sum(g - grad_x.float(), c, q.reduce_dims, ctx.eager)
            grad = d_delta.reshape(threshold.shape).to(threshold.dtype) * (ctx.grad_scale / q.steps)
            # max(threshold, min_threshold) passes the gradient only where it is not clamped; the
            # power-of-two rounding passes it straight through.
            grad_threshold = grad * (threshold >= q.params.min_threshold)
        return grad_x if ctx.needs_input_grad[0] else None, grad_threshold, None, None


class _LSQUniformFunction(torch.autograd.Function):
    """(fake-quantized x, Δ): the LSQ range gradients backward; Δ (not differentiable) is the step used."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, range_min: torch.Tensor, range_max: torch.Tensor, q: UniformGrid,
                grad_scale: float):
        ctx.q, ctx.grad_scale, ctx.eager, ctx.triton = q, grad_scale, eager(), _use_triton(x, q)
        ctx.set_materialize_grads(False)
        if ctx.triton:
            ctx.save_for_backward(x, range_min, range_max)
            out, _, delta = triton_kernels.fake_quantize(x, q.kernel_grid(range_min, range_max), q.axis, q.q_min,
                                                         q.q_max, with_step=True)
        else:
            delta, zero_point = q.grid()
            ctx.save_for_backward(x, range_min, range_max, delta, zero_point)
            out = q.fake_quantize(x, delta, zero_point)
        ctx.mark_non_differentiable(delta)
        return out, delta

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor | None, _: Any):
        if grad_output is None:
            return None, None, None, None, None
        q = ctx.q
        needs_range = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        grad_min = grad_max = None
        if ctx.triton:
            x, range_min, range_max = ctx.saved_tensors
            grid = q.kernel_grid(range_min, range_max)
            grad_x, partials = triton_kernels.lsq_backward(x, grad_output, grid, q.axis, q.q_min, q.q_max,
                                                           needs_range)
            if needs_range:
                grad_min, grad_max = triton_kernels.lsq_parameter_grads(
                    partials, (range_min, range_max), q.params.min_threshold, ctx.grad_scale, q.q_max)
                grad_min, grad_max = grad_min.to(range_min.dtype), grad_max.to(range_max.dtype)
            return grad_x if ctx.needs_input_grad[0] else None, grad_min, grad_max, None, None
        x, range_min, range_max, delta, zero_point = ctx.saved_tensors
        low, high = q.bounds(delta, zero_point)
        grad_x = ste_input_grad(grad_output, x, low, high, ctx.eager)
        if needs_range:
            levels = q.q_max
            c, error = _steps(x.float(), delta, zero_point, q)
            g = grad_output.float()
            outside = g - grad_x.float()  # the upstream gradient where x was clipped
            # Clipped values sit at c = 0 (below) or c = K (above): Σ_above g = Σ outside·c / K.
            above = _sum(outside, c, q.reduce_dims, ctx.eager) / levels
            below = (outside.sum() if q.reduce_dims is None else outside.sum(dim=q.reduce_dims)) - above
            # Inside, the rounding error moves the ends apart or together.
            rounding = _sum(g, error, q.reduce_dims, ctx.eager) / levels
            scale = ctx.grad_scale
            grad_min = ((below - rounding) * scale).reshape(range_min.shape).to(range_min.dtype)
            grad_max = ((above + rounding) * scale).reshape(range_max.shape).to(range_max.dtype)
            # A range held at its narrowest width (UniformGrid.effective_range) follows neither end.
            wide = range_max.clamp_min(0.0) >= range_min.clamp_max(0.0) + q.params.min_threshold
            grad_min = grad_min * ((range_min <= 0) & wide)
            grad_max = grad_max * ((range_max >= 0) & wide)
        return grad_x if ctx.needs_input_grad[0] else None, grad_min, grad_max, None, None


class _LSQ:
    learnable_params = True

    def _grad_scale(self, inputs: torch.Tensor) -> float:
        if self.quantization_target is QuantizationTarget.Weights:
            return self.grad_scale
        # Activations: N is the number of features of one sample (the paper's N_F), read off the static shape.
        return lsq_grad_scale(max(math.prod(inputs.shape[1:]), 1), self.q_max)

    def _train(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def __call__(self, inputs: torch.Tensor, training: bool) -> torch.Tensor:
        """Fake-quantize `inputs`; in training the parameters receive the LSQ gradients."""
        if training:
            out, delta = self._train(inputs)
        else:
            delta, zero_point = self.grid()
            out = self.fake_quantize(inputs, delta, zero_point)
        # The layer `out` goes to reads its step back (`step_for`) instead of computing the grid again.
        self.keep_step(out, delta)
        return out


class _LSQSymmetric(_LSQ, SymmetricGrid):
    def _train(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _LSQSymmetricFunction.apply(inputs, self.threshold, self, self._grad_scale(inputs))


class _LSQUniform(_LSQ, UniformGrid):
    def _train(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _LSQUniformFunction.apply(inputs, self.range_min, self.range_max, self, self._grad_scale(inputs))


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
