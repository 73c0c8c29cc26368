"""Straight-through-estimator (STE) quantizers: fixed quantization parameters, clipped identity gradient.

The parameters come from the quantization config and do not train, so the op's (min, max) are computed once,
in float64 exactly as mct-quantizers computes them, and `__call__` is the single fused TensorFlow op. Its
gradient is TensorFlow's: the incoming gradient where min <= x <= max on the op's nudged range, else 0.
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
from trainable_infra.common.enums import TrainingMethod
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
from trainable_infra.keras_backend.fake_quant import fake_quant, symmetric_inferable_range, uniform_inferable_range

_SYMMETRIC_METHODS = [QuantizationMethod.SYMMETRIC, QuantizationMethod.POWER_OF_TWO]


def _constant_threshold(params: SymmetricParams) -> np.ndarray:
    return numerics.effective_threshold(params.threshold, params.min_threshold, params.power_of_two)


@keras.saving.register_keras_serializable(package="trainable_infra")
@mark_quantizer(
    quantization_target=QuantizationTarget.Weights,
    quantization_method=_SYMMETRIC_METHODS,
    identifier=TrainingMethod.STE,
)
class STESymmetricWeightQuantizer(BaseKerasWeightTrainableQuantizer):
    """Symmetric or power-of-two weight quantizer with a fixed threshold, per-channel or per-tensor."""

    def initialize_quantization(self, tensor_shape: Any, name: str, layer: keras.layers.Layer) -> None:
        """Read the threshold for a weight of `tensor_shape` and precompute the op's range."""
        self.params = weight_quant_params(self.quantization_config, tensor_shape)
        self.input_rank = len(tensor_shape)
        self.threshold = _constant_threshold(self.params)
        self.min_range, self.max_range = symmetric_inferable_range(self.threshold, self.params.n_bits, True)

    def __call__(self, inputs: tf.Tensor, training: bool = False) -> tf.Tensor:
        return fake_quant(inputs, self.min_range, self.max_range, self.params.n_bits, self.params.channel_axis)

    def convert2inferable(self) -> WeightsSymmetricInferableQuantizer:
        """The mct-quantizers Keras weights quantizer (symmetric or power-of-two) with this threshold."""
        cls = WeightsPOTInferableQuantizer if self.params.power_of_two else WeightsSymmetricInferableQuantizer
        return cls(
            num_bits=self.params.n_bits,
            threshold=self.threshold.tolist(),
            per_channel=self.params.channel_axis is not None,
            channel_axis=self.params.channel_axis,
            input_rank=self.input_rank,
        )


@keras.saving.register_keras_serializable(package="trainable_infra")
@mark_quantizer(
    quantization_target=QuantizationTarget.Weights,
    quantization_method=[QuantizationMethod.UNIFORM],
    identifier=TrainingMethod.STE,
)
class STEUniformWeightQuantizer(BaseKerasWeightTrainableQuantizer):
    """Uniform (affine) weight quantizer with a fixed range, per-channel or per-tensor."""

    def initialize_quantization(self, tensor_shape: Any, name: str, layer: keras.layers.Layer) -> None:
        """Read the range for a weight of `tensor_shape` and precompute the op's (zero-adjusted) range."""
        self.params: UniformParams = weight_quant_params(self.quantization_config, tensor_shape)
        self.input_rank = len(tensor_shape)
        self.min_range, self.max_range = uniform_inferable_range(
            self.params.range_min, self.params.range_max, self.params.n_bits
        )

    def __call__(self, inputs: tf.Tensor, training: bool = False) -> tf.Tensor:
        return fake_quant(inputs, self.min_range, self.max_range, self.params.n_bits, self.params.channel_axis)

    def convert2inferable(self) -> WeightsUniformInferableQuantizer:
        """The mct-quantizers Keras uniform weights quantizer with this range."""
        return WeightsUniformInferableQuantizer(
            num_bits=self.params.n_bits,
            min_range=self.params.range_min.tolist(),
            max_range=self.params.range_max.tolist(),
            per_channel=self.params.channel_axis is not None,
            channel_axis=self.params.channel_axis,
            input_rank=self.input_rank,
        )


@keras.saving.register_keras_serializable(package="trainable_infra")
@mark_quantizer(
    quantization_target=QuantizationTarget.Activation,
    quantization_method=_SYMMETRIC_METHODS,
    identifier=TrainingMethod.STE,
)
class STESymmetricActivationQuantizer(BaseKerasActivationTrainableQuantizer):
    """Symmetric or power-of-two activation quantizer with a fixed threshold, signed or unsigned."""

    def __init__(self, quantization_config: Any, freeze_quant_params: bool = False):
        super().__init__(quantization_config, freeze_quant_params)
        # Activation parameters need no tensor shape: read (and validate) them now.
        self.params: SymmetricParams = activation_quant_params(quantization_config)
        self.threshold = _constant_threshold(self.params)
        self.min_range, self.max_range = symmetric_inferable_range(
            self.threshold, self.params.n_bits, self.params.signed
        )

    def initialize_quantization(self, tensor_shape: Any, name: str, layer: keras.layers.Layer) -> None:
        """Nothing to create: the range is fixed by the config."""

    def __call__(self, inputs: tf.Tensor, training: bool = False) -> tf.Tensor:
        return fake_quant(inputs, self.min_range, self.max_range, self.params.n_bits, None)

    def convert2inferable(self) -> ActivationSymmetricInferableQuantizer:
        """The mct-quantizers Keras activation quantizer (symmetric or power-of-two) with this threshold."""
        cls = ActivationPOTInferableQuantizer if self.params.power_of_two else ActivationSymmetricInferableQuantizer
        return cls(num_bits=self.params.n_bits, threshold=self.threshold.tolist(), signed=self.params.signed)


@keras.saving.register_keras_serializable(package="trainable_infra")
@mark_quantizer(
    quantization_target=QuantizationTarget.Activation,
    quantization_method=[QuantizationMethod.UNIFORM],
    identifier=TrainingMethod.STE,
)
class STEUniformActivationQuantizer(BaseKerasActivationTrainableQuantizer):
    """Uniform (affine) activation quantizer with a fixed range."""

    def __init__(self, quantization_config: Any, freeze_quant_params: bool = False):
        super().__init__(quantization_config, freeze_quant_params)
        self.params: UniformParams = activation_quant_params(quantization_config)
        self.min_range, self.max_range = uniform_inferable_range(
            self.params.range_min, self.params.range_max, self.params.n_bits
        )

    def initialize_quantization(self, tensor_shape: Any, name: str, layer: keras.layers.Layer) -> None:
        """Nothing to create: the range is fixed by the config."""

    def __call__(self, inputs: tf.Tensor, training: bool = False) -> tf.Tensor:
        return fake_quant(inputs, self.min_range, self.max_range, self.params.n_bits, None)

    def convert2inferable(self) -> ActivationUniformInferableQuantizer:
        """The mct-quantizers Keras uniform activation quantizer with this range."""
        return ActivationUniformInferableQuantizer(
            num_bits=self.params.n_bits,
            min_range=self.params.range_min.tolist(),
            max_range=self.params.range_max.tolist(),
        )
