"""Straight-through-estimator quantizers: fixed quantization parameters, clipped identity gradient."""

from __future__ import annotations

import torch

from trainable_infra.common.enums import TrainingMethod
from trainable_infra.common.mct import QuantizationMethod, QuantizationTarget, mark_quantizer
from trainable_infra.pytorch_backend.base_quantizer import (
    BasePytorchActivationTrainableQuantizer,
    BasePytorchWeightTrainableQuantizer,
)
from trainable_infra.pytorch_backend.quantizers.fake_quant import STEFakeQuantize
from trainable_infra.pytorch_backend.quantizers.grid import SymmetricGrid, UniformGrid

_SYMMETRIC_METHODS = [QuantizationMethod.SYMMETRIC, QuantizationMethod.POWER_OF_TWO]


class _STE:
    """Fixed quantization parameters; the input gradient is the clipped straight-through estimator."""

    learnable_params = False

    def __call__(self, inputs: torch.Tensor, training: bool) -> torch.Tensor:
        """Fake-quantize `inputs`; in training the gradient passes where the input lies in the range."""
        if not training:
            delta, zero_point = self.grid()
            return self.fake_quantize(inputs, delta, zero_point)
        delta, zero_point, low, high = self.grid_and_bounds()
        return STEFakeQuantize.apply(
            inputs, delta, zero_point, low, high, self.axis, self.view, self.q_min, self.q_max
        )


@mark_quantizer(QuantizationTarget.Weights, _SYMMETRIC_METHODS, TrainingMethod.STE)
class STESymmetricWeightQuantizer(_STE, SymmetricGrid, BasePytorchWeightTrainableQuantizer):
    """Symmetric / power-of-two weight quantizer with a fixed threshold (per-channel or per-tensor)."""


@mark_quantizer(QuantizationTarget.Weights, [QuantizationMethod.UNIFORM], TrainingMethod.STE)
class STEUniformWeightQuantizer(_STE, UniformGrid, BasePytorchWeightTrainableQuantizer):
    """Uniform weight quantizer with a fixed range (per-channel or per-tensor)."""


@mark_quantizer(QuantizationTarget.Activation, _SYMMETRIC_METHODS, TrainingMethod.STE)
class STESymmetricActivationQuantizer(_STE, SymmetricGrid, BasePytorchActivationTrainableQuantizer):
    """Symmetric / power-of-two activation quantizer (signed or unsigned) with a fixed threshold."""


@mark_quantizer(QuantizationTarget.Activation, [QuantizationMethod.UNIFORM], TrainingMethod.STE)
class STEUniformActivationQuantizer(_STE, UniformGrid, BasePytorchActivationTrainableQuantizer):
    """Uniform activation quantizer with a fixed range."""
