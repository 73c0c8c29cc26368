"""Straight-through-estimator (STE) quantizers: fixed quantization parameters, clipped identity gradient.

The threshold or range sits in a non-trainable float32 layer weight (`SymmetricGrid` / `UniformGrid`), so
training leaves it alone while `calibrate` can set it and `.keras` files keep it. `__call__` turns it into the
fused TensorFlow op's (min, max) with a few ops on C-length vectors and runs that op; its gradient is
TensorFlow's: the incoming gradient where min <= x <= max on the op's nudged range, else 0.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from trainable_infra.common.enums import TrainingMethod
from trainable_infra.common.mct import QuantizationMethod, QuantizationTarget, mark_quantizer
from trainable_infra.keras_backend.base_quantizer import (
    BaseKerasActivationTrainableQuantizer,
    BaseKerasWeightTrainableQuantizer,
)
from trainable_infra.keras_backend.quantizers.grid import SymmetricGrid, UniformGrid, read_activation_params

_SYMMETRIC_METHODS = [QuantizationMethod.SYMMETRIC, QuantizationMethod.POWER_OF_TWO]


class _STE:
    """Fixed quantization parameters: the same fused op in training and in inference."""

    learnable_params = False

    def __call__(self, inputs: tf.Tensor, training: bool = False) -> tf.Tensor:
        """Fake-quantize `inputs`; in training the gradient passes where the input lies in the range."""
        return self.quantize(inputs)


@keras.saving.register_keras_serializable(package="trainable_infra")
@mark_quantizer(
    quantization_target=QuantizationTarget.Weights,
    quantization_method=_SYMMETRIC_METHODS,
    identifier=TrainingMethod.STE,
)
class STESymmetricWeightQuantizer(_STE, SymmetricGrid, BaseKerasWeightTrainableQuantizer):
    """Symmetric or power-of-two weight quantizer with a fixed threshold, per-channel or per-tensor."""


@keras.saving.register_keras_serializable(package="trainable_infra")
@mark_quantizer(
    quantization_target=QuantizationTarget.Weights,
    quantization_method=[QuantizationMethod.UNIFORM],
    identifier=TrainingMethod.STE,
)
class STEUniformWeightQuantizer(_STE, UniformGrid, BaseKerasWeightTrainableQuantizer):
    """Uniform (affine) weight quantizer with a fixed range, per-channel or per-tensor."""


@keras.saving.register_keras_serializable(package="trainable_infra")
@mark_quantizer(
    quantization_target=QuantizationTarget.Activation,
    quantization_method=_SYMMETRIC_METHODS,
    identifier=TrainingMethod.STE,
)
class STESymmetricActivationQuantizer(_STE, SymmetricGrid, BaseKerasActivationTrainableQuantizer):
    """Symmetric or power-of-two activation quantizer with a fixed threshold, signed or unsigned."""

    def __init__(self, quantization_config: Any, freeze_quant_params: bool = False):
        super().__init__(quantization_config, freeze_quant_params)
        read_activation_params(self)


@keras.saving.register_keras_serializable(package="trainable_infra")
@mark_quantizer(
    quantization_target=QuantizationTarget.Activation,
    quantization_method=[QuantizationMethod.UNIFORM],
    identifier=TrainingMethod.STE,
)
class STEUniformActivationQuantizer(_STE, UniformGrid, BaseKerasActivationTrainableQuantizer):
    """Uniform (affine) activation quantizer with a fixed range."""

    def __init__(self, quantization_config: Any, freeze_quant_params: bool = False):
        super().__init__(quantization_config, freeze_quant_params)
        read_activation_params(self)
