"""Learned Step Size Quantization (LSQ, Esser et al. 2019): the threshold or the range is trained.

The forward pass is the same fused TensorFlow op as at inference, fed with a range computed from the
variables in the step; in training it is wrapped in `tf.custom_gradient` to give the paper's gradients
(`trainable_infra.common.numerics.lsq_grads_*`, with TensorFlow's half-up rounding) without touching the
forward bits.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from trainable_infra.common import numerics
from trainable_infra.common.enums import TrainingMethod
from trainable_infra.common.mct import QuantizationMethod, QuantizationTarget, mark_quantizer
from trainable_infra.keras_backend.base_quantizer import (
    BaseKerasActivationTrainableQuantizer,
    BaseKerasWeightTrainableQuantizer,
)
from trainable_infra.keras_backend.fake_quant import lsq_symmetric, lsq_uniform
from trainable_infra.keras_backend.quantizers.grid import SymmetricGrid, UniformGrid, read_activation_params

_SYMMETRIC_METHODS = [QuantizationMethod.SYMMETRIC, QuantizationMethod.POWER_OF_TWO]


def _grad_scale(quantizer: Any, tensor_shape: Any, q_max: int) -> float | None:
    """g = 1/sqrt(N·q_max); for an activation whose feature dimensions are unknown, None (computed per call)."""
    shape = tuple(tensor_shape) if tensor_shape is not None else ()
    if quantizer.quantization_target is QuantizationTarget.Weights:
        return numerics.lsq_grad_scale(numerics.lsq_num_elements_weights(shape, quantizer.axis), q_max)
    if len(shape) > 1 and any(d is None for d in shape[1:]):
        return None
    return numerics.lsq_grad_scale(numerics.lsq_num_elements_activations(shape), q_max)


class _LSQSymmetric(SymmetricGrid):
    """The symmetric grid with a learned threshold: LSQ's gradients in training."""

    learnable_params = True

    def initialize_quantization(self, tensor_shape: Any, name: str, layer: keras.layers.Layer) -> None:
        """Create the threshold variable and the training function for a tensor of `tensor_shape`."""
        super().initialize_quantization(tensor_shape, name, layer)
        p = self.params
        q_max = numerics.symmetric_int_range(p.n_bits, p.signed)[1]
        self._lsq = lsq_symmetric(
            n_bits=p.n_bits, signed=p.signed, min_threshold=p.min_threshold, power_of_two=p.power_of_two,
            axis=self.axis, grad_scale=_grad_scale(self, tensor_shape, q_max),
        )

    def __call__(self, inputs: tf.Tensor, training: bool = False) -> tf.Tensor:
        if training:
            return self._lsq(inputs, tf.convert_to_tensor(self.threshold))
        return self.quantize(inputs)


class _LSQUniform(UniformGrid):
    """The uniform grid with a learned range: LSQ's gradients in training."""

    learnable_params = True

    def initialize_quantization(self, tensor_shape: Any, name: str, layer: keras.layers.Layer) -> None:
        """Create the range variables and the training function for a tensor of `tensor_shape`."""
        super().initialize_quantization(tensor_shape, name, layer)
        self._lsq = lsq_uniform(
            n_bits=self.params.n_bits, min_threshold=self.params.min_threshold, axis=self.axis,
            grad_scale=_grad_scale(self, tensor_shape, 2**self.params.n_bits - 1),
        )

    def __call__(self, inputs: tf.Tensor, training: bool = False) -> tf.Tensor:
        if training:
            return self._lsq(inputs, tf.convert_to_tensor(self.range_min), tf.convert_to_tensor(self.range_max))
        return self.quantize(inputs)


@keras.saving.register_keras_serializable(package="trainable_infra")
@mark_quantizer(
    quantization_target=QuantizationTarget.Weights,
    quantization_method=_SYMMETRIC_METHODS,
    identifier=TrainingMethod.LSQ,
)
class LSQSymmetricWeightQuantizer(_LSQSymmetric, BaseKerasWeightTrainableQuantizer):
    """Symmetric or power-of-two weight quantizer with a learned threshold, per-channel or per-tensor."""


@keras.saving.register_keras_serializable(package="trainable_infra")
@mark_quantizer(
    quantization_target=QuantizationTarget.Weights,
    quantization_method=[QuantizationMethod.UNIFORM],
    identifier=TrainingMethod.LSQ,
)
class LSQUniformWeightQuantizer(_LSQUniform, BaseKerasWeightTrainableQuantizer):
    """Uniform (affine) weight quantizer with a learned range, per-channel or per-tensor."""


@keras.saving.register_keras_serializable(package="trainable_infra")
@mark_quantizer(
    quantization_target=QuantizationTarget.Activation,
    quantization_method=_SYMMETRIC_METHODS,
    identifier=TrainingMethod.LSQ,
)
class LSQSymmetricActivationQuantizer(_LSQSymmetric, BaseKerasActivationTrainableQuantizer):
    """Symmetric or power-of-two activation quantizer with a learned threshold, signed or unsigned."""

    def __init__(self, quantization_config: Any, freeze_quant_params: bool = False):
        super().__init__(quantization_config, freeze_quant_params)
        read_activation_params(self)


@keras.saving.register_keras_serializable(package="trainable_infra")
@mark_quantizer(
    quantization_target=QuantizationTarget.Activation,
    quantization_method=[QuantizationMethod.UNIFORM],
    identifier=TrainingMethod.LSQ,
)
class LSQUniformActivationQuantizer(_LSQUniform, BaseKerasActivationTrainableQuantizer):
    """Uniform (affine) activation quantizer with a learned range."""

    def __init__(self, quantization_config: Any, freeze_quant_params: bool = False):
        super().__init__(quantization_config, freeze_quant_params)
        read_activation_params(self)
