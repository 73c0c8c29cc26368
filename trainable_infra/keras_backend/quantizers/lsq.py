"""Learned Step Size Quantization (LSQ, Esser et al. 2019): the threshold or the range is trained.

The forward pass is the same fused TensorFlow op as at inference, fed with a range computed from the
variables in the step; in training it is wrapped in `tf.custom_gradient` to give the paper's gradients
(`trainable_infra.common.numerics.lsq_grads_*`, with TensorFlow's half-up rounding) without touching the
forward bits.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf
from mct_quantizers.keras.quantizers import (
    ActivationPOTInferableQuantizer,
    ActivationSymmetricInferableQuantizer,
    ActivationUniformInferableQuantizer,
    WeightsPOTInferableQuantizer,
    WeightsSymmetricInferableQuantizer,
    WeightsUniformInferableQuantizer,
)

from trainable_infra.common import numerics
from trainable_infra.common.config import RANGE_MAX, RANGE_MIN, THRESHOLD
from trainable_infra.common.enums import TrainingMethod, VariableGroup
from trainable_infra.common.errors import TrainableInfraError
from trainable_infra.common.mct import QuantizationMethod, QuantizationTarget, mark_quantizer
from trainable_infra.common.quant_params import (
    SymmetricParams,
    UniformParams,
    activation_quant_params,
    weight_quant_params,
)
from trainable_infra.keras_backend.base_quantizer import (
    BaseKerasActivationTrainableQuantizer,
    BaseKerasWeightTrainableQuantizer,
)
from trainable_infra.keras_backend.fake_quant import (
    effective_threshold,
    fake_quant,
    lsq_symmetric,
    lsq_uniform,
    symmetric_range,
    uniform_range,
)

_SYMMETRIC_METHODS = [QuantizationMethod.SYMMETRIC, QuantizationMethod.POWER_OF_TWO]


def _layout(shape: tuple[int, ...], axis: int | None) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """(param_shape, reduce_axes): how a parameter broadcasts against a tensor and how its gradient sums back."""
    if axis is None:
        return (), None
    return numerics.broadcast_shape(len(shape), axis), tuple(i for i in range(len(shape)) if i != axis)


def _activation_grad_scale(tensor_shape: Any, q_max: int) -> float | None:
    """g for an activation of `tensor_shape` (batch first), or None when a feature dimension is unknown."""
    shape = tuple(tensor_shape) if tensor_shape is not None else ()
    if len(shape) > 1 and any(d is None for d in shape[1:]):
        return None
    return numerics.lsq_grad_scale(numerics.lsq_num_elements_activations(shape), q_max)


class _LSQSymmetric:
    """Shared by the symmetric LSQ quantizers: the threshold variable, eval and training paths, conversion."""

    params: SymmetricParams
    axis: int | None = None

    def _create_threshold(self, layer: keras.layers.Layer, name: str, value: np.ndarray) -> None:
        self.threshold = self.add_quantizer_weight(layer, f"{name}_{THRESHOLD}", value, VariableGroup.QPARAMS)

    def _build_training_fn(self, param_shape, reduce_axes, grad_scale) -> None:
        p = self.params
        self._lsq = lsq_symmetric(
            n_bits=p.n_bits, signed=p.signed, min_threshold=p.min_threshold, power_of_two=p.power_of_two,
            axis=self.axis, param_shape=param_shape, reduce_axes=reduce_axes, grad_scale=grad_scale,
        )

    def __call__(self, inputs: tf.Tensor, training: bool = False) -> tf.Tensor:
        threshold = tf.convert_to_tensor(self.threshold)
        if training:
            return self._lsq(inputs, threshold)
        p = self.params
        low, high = symmetric_range(effective_threshold(threshold, p.min_threshold, p.power_of_two), p.n_bits, p.signed)
        return fake_quant(inputs, low, high, p.n_bits, self.axis)

    def current_threshold(self) -> list[float]:
        """The threshold the grid uses now (clamped, power-of-two rounded), as the inferable quantizer takes it."""
        p = self.params
        t = effective_threshold(tf.reshape(tf.convert_to_tensor(self.threshold), [-1]), p.min_threshold, p.power_of_two)
        return [float(v) for v in t.numpy()]


class _LSQUniform:
    """Shared by the uniform LSQ quantizers: the range variables, eval and training paths, conversion."""

    params: UniformParams
    axis: int | None = None

    def _create_range(self, layer: keras.layers.Layer, name: str, low: np.ndarray, high: np.ndarray) -> None:
        self.range_min = self.add_quantizer_weight(layer, f"{name}_{RANGE_MIN}", low, VariableGroup.QPARAMS)
        self.range_max = self.add_quantizer_weight(layer, f"{name}_{RANGE_MAX}", high, VariableGroup.QPARAMS)

    def _build_training_fn(self, param_shape, reduce_axes, grad_scale) -> None:
        self._lsq = lsq_uniform(
            n_bits=self.params.n_bits, axis=self.axis, param_shape=param_shape, reduce_axes=reduce_axes,
            grad_scale=grad_scale,
        )

    def __call__(self, inputs: tf.Tensor, training: bool = False) -> tf.Tensor:
        range_min, range_max = tf.convert_to_tensor(self.range_min), tf.convert_to_tensor(self.range_max)
        if training:
            return self._lsq(inputs, range_min, range_max)
        low, high = uniform_range(range_min, range_max, self.params.n_bits)
        return fake_quant(inputs, low, high, self.params.n_bits, self.axis)

    def current_range(self) -> tuple[list[float], list[float]]:
        """The learned (range_min, range_max) as lists, checked to be ordered as the inferable quantizer needs."""
        low = [float(v) for v in np.reshape(self.range_min.numpy(), -1)]
        high = [float(v) for v in np.reshape(self.range_max.numpy(), -1)]
        if not all(a < b for a, b in zip(low, high, strict=True)):
            raise TrainableInfraError(
                f"{type(self).__name__}: the learned range has range_min >= range_max (range_min={low}, "
                f"range_max={high}); an inferable quantizer needs range_min < range_max in every channel"
            )
        return low, high


@keras.saving.register_keras_serializable(package="trainable_infra")
@mark_quantizer(
    quantization_target=QuantizationTarget.Weights,
    quantization_method=_SYMMETRIC_METHODS,
    identifier=TrainingMethod.LSQ,
)
class LSQSymmetricWeightQuantizer(_LSQSymmetric, BaseKerasWeightTrainableQuantizer):
    """Symmetric or power-of-two weight quantizer with a learned threshold, per-channel or per-tensor."""

    def initialize_quantization(self, tensor_shape: Any, name: str, layer: keras.layers.Layer) -> None:
        """Create the threshold variable (initialised from the config) for a weight of `tensor_shape`."""
        shape = tuple(int(d) for d in tensor_shape)
        self.params = weight_quant_params(self.quantization_config, shape)
        self.axis, self.input_rank = self.params.channel_axis, len(shape)
        threshold = self.params.threshold if self.axis is not None else self.params.threshold[0]
        self._create_threshold(layer, name, threshold)
        q_max = numerics.symmetric_int_range(self.params.n_bits, True)[1]
        grad_scale = numerics.lsq_grad_scale(numerics.lsq_num_elements_weights(shape, self.axis), q_max)
        self._build_training_fn(*_layout(shape, self.axis), grad_scale)

    def convert2inferable(self) -> WeightsSymmetricInferableQuantizer:
        """The mct-quantizers Keras weights quantizer with the learned threshold."""
        cls = WeightsPOTInferableQuantizer if self.params.power_of_two else WeightsSymmetricInferableQuantizer
        return cls(
            num_bits=self.params.n_bits,
            threshold=self.current_threshold(),
            per_channel=self.axis is not None,
            channel_axis=self.axis,
            input_rank=self.input_rank,
        )


@keras.saving.register_keras_serializable(package="trainable_infra")
@mark_quantizer(
    quantization_target=QuantizationTarget.Weights,
    quantization_method=[QuantizationMethod.UNIFORM],
    identifier=TrainingMethod.LSQ,
)
class LSQUniformWeightQuantizer(_LSQUniform, BaseKerasWeightTrainableQuantizer):
    """Uniform (affine) weight quantizer with a learned range, per-channel or per-tensor."""

    def initialize_quantization(self, tensor_shape: Any, name: str, layer: keras.layers.Layer) -> None:
        """Create the range variables (initialised from the config) for a weight of `tensor_shape`."""
        shape = tuple(int(d) for d in tensor_shape)
        self.params = weight_quant_params(self.quantization_config, shape)
        self.axis, self.input_rank = self.params.channel_axis, len(shape)
        low, high = self.params.range_min, self.params.range_max
        if self.axis is None:
            low, high = low[0], high[0]
        self._create_range(layer, name, low, high)
        grad_scale = numerics.lsq_grad_scale(
            numerics.lsq_num_elements_weights(shape, self.axis), 2**self.params.n_bits - 1
        )
        self._build_training_fn(*_layout(shape, self.axis), grad_scale)

    def convert2inferable(self) -> WeightsUniformInferableQuantizer:
        """The mct-quantizers Keras uniform weights quantizer with the learned range."""
        low, high = self.current_range()
        return WeightsUniformInferableQuantizer(
            num_bits=self.params.n_bits,
            min_range=low,
            max_range=high,
            per_channel=self.axis is not None,
            channel_axis=self.axis,
            input_rank=self.input_rank,
        )


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
        # Activation parameters need no tensor shape: read (and validate) them now.
        self.params = activation_quant_params(quantization_config)

    def initialize_quantization(self, tensor_shape: Any, name: str, layer: keras.layers.Layer) -> None:
        """Create the threshold variable; `tensor_shape` (batch first) gives LSQ's N, the features per sample."""
        self._create_threshold(layer, name, self.params.threshold[0])
        q_max = numerics.symmetric_int_range(self.params.n_bits, self.params.signed)[1]
        self._build_training_fn((), None, _activation_grad_scale(tensor_shape, q_max))

    def convert2inferable(self) -> ActivationSymmetricInferableQuantizer:
        """The mct-quantizers Keras activation quantizer with the learned threshold."""
        cls = ActivationPOTInferableQuantizer if self.params.power_of_two else ActivationSymmetricInferableQuantizer
        return cls(num_bits=self.params.n_bits, threshold=self.current_threshold(), signed=self.params.signed)


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
        self.params = activation_quant_params(quantization_config)

    def initialize_quantization(self, tensor_shape: Any, name: str, layer: keras.layers.Layer) -> None:
        """Create the range variables; `tensor_shape` (batch first) gives LSQ's N, the features per sample."""
        self._create_range(layer, name, self.params.range_min[0], self.params.range_max[0])
        self._build_training_fn((), None, _activation_grad_scale(tensor_shape, 2**self.params.n_bits - 1))

    def convert2inferable(self) -> ActivationUniformInferableQuantizer:
        """The mct-quantizers Keras uniform activation quantizer with the learned range."""
        low, high = self.current_range()
        return ActivationUniformInferableQuantizer(num_bits=self.params.n_bits, min_range=low, max_range=high)
