"""DQA quantizers (DNN Quantization with Attention): a learned mixture of b, 2b and 4b-bit quantizations in
training, annealed to b bits (`trainable_infra.common.dqa`).

Each candidate is TensorFlow's fused fake-quant op at its own bit width on the range mct-quantizers would derive
from the same fixed threshold or range (the STE quantizers' forward and gradient); eval mode and
`convert2inferable()` are the grid's b-bit quantizer. The temperature is computed in the step from a step counter
variable, so a traced `fit` step follows the schedule and a reloaded `.keras` model resumes on it.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf

from trainable_infra.common.dqa import DQAQuantizer
from trainable_infra.common.enums import TrainingMethod, VariableGroup
from trainable_infra.common.mct import QuantizationMethod, QuantizationTarget, mark_quantizer
from trainable_infra.common.schedules import LinearAnnealing
from trainable_infra.keras_backend.base_quantizer import (
    BaseKerasActivationTrainableQuantizer,
    BaseKerasWeightTrainableQuantizer,
)
from trainable_infra.keras_backend.fake_quant import effective_threshold, fake_quant, symmetric_range, uniform_range
from trainable_infra.keras_backend.quantizers.grid import SymmetricGrid, UniformGrid, read_activation_params

_SYMMETRIC_METHODS = [QuantizationMethod.SYMMETRIC, QuantizationMethod.POWER_OF_TWO]


class _DQA(DQAQuantizer):
    """The mixture in training; the grid's b-bit quantizer in eval mode."""

    def __init__(self, quantization_config: Any, freeze_quant_params: bool = False,
                 temperature_schedule: LinearAnnealing | dict | None = None):
        super().__init__(quantization_config, freeze_quant_params)
        if self.quantization_target is QuantizationTarget.Activation:
            read_activation_params(self)
        self.init_dqa(temperature_schedule)

    def initialize_quantization(self, tensor_shape: Any, name: str, layer: keras.layers.Layer) -> None:
        """Create the grid's variables, the logits `<name>_attention` and the step counter `<name>_step`."""
        super().initialize_quantization(tensor_shape, name, layer)
        self.attention_logits = self.add_quantizer_weight(
            layer, f"{name}_attention", np.zeros(3, np.float32), VariableGroup.WEIGHTS, trainable=True
        )
        # Not registered as a quantizer variable: it is state, not something to train. Under a distribution
        # strategy each replica runs the same steps, so the first replica's count is the count.
        self.step = layer.add_weight(
            name=f"{name}_step", shape=(), initializer="zeros", dtype="int64", trainable=False,
            aggregation="only_first_replica",
        )
        self._penalties = tf.constant(self.penalties, tf.float64)

    def current_step(self) -> int:
        return int(self.step.numpy())

    def current_logits(self) -> np.ndarray:
        return np.asarray(self.attention_logits.numpy(), np.float64)

    def _attention(self) -> tf.Tensor:
        """α = softmax(ℓ - r/T) at the counter's step."""
        temperature = self.temperature_schedule(tf.cast(tf.convert_to_tensor(self.step), tf.float64),
                                                tf.clip_by_value)
        # r = 0 (the b-bit candidate) gets no penalty, also at T = 0 where r/T would be 0/0; the wider candidates
        # get -inf there, and softmax gives exactly (1, 0, 0).
        penalty = tf.where(self._penalties > 0, self._penalties / temperature, tf.zeros_like(self._penalties))
        return tf.nn.softmax(tf.convert_to_tensor(self.attention_logits) - tf.cast(penalty, tf.float32))

    def __call__(self, inputs: tf.Tensor, training: bool = False) -> tf.Tensor:
        """Fake-quantize `inputs`: the attention-weighted candidates in training, b bits in eval mode."""
        if not training:
            return self.quantize(inputs)
        alpha = self._attention()
        # Counted after reading (automatic control dependencies keep that order in a traced step): the first
        # training step runs at t = 0.
        self.step.assign_add(1)
        # The fused op computes in float32; the mixture too, cast back to the input's dtype at the end.
        x = tf.cast(tf.convert_to_tensor(inputs), tf.float32)
        output = None
        for index, (bits, (low, high)) in enumerate(zip(self.candidate_bits, self.candidate_ranges(), strict=True)):
            term = alpha[index] * fake_quant(x, low, high, bits, self.axis)
            # Summed from the b-bit term: starting from 0 would turn its -0.0 into +0.0.
            output = term if output is None else output + term
        return tf.cast(output, inputs.dtype)


class _DQASymmetric(_DQA, SymmetricGrid):
    def candidate_ranges(self) -> list[tuple[tf.Tensor, tf.Tensor]]:
        """The fused op's (min, max) for each candidate, on the same threshold."""
        p = self.params
        t = effective_threshold(tf.convert_to_tensor(self.threshold), p.min_threshold, p.power_of_two)
        return [symmetric_range(t, bits, p.signed) for bits in self.candidate_bits]


class _DQAUniform(_DQA, UniformGrid):
    def candidate_ranges(self) -> list[tuple[tf.Tensor, tf.Tensor]]:
        """The fused op's (min, max) for each candidate: the range adjusted to include zero at its bit width."""
        low, high = self._effective_range()
        return [uniform_range(low, high, bits) for bits in self.candidate_bits]


@keras.saving.register_keras_serializable(package="trainable_infra")
@mark_quantizer(
    quantization_target=QuantizationTarget.Weights,
    quantization_method=_SYMMETRIC_METHODS,
    identifier=TrainingMethod.DQA,
)
class DQASymmetricWeightQuantizer(_DQASymmetric, BaseKerasWeightTrainableQuantizer):
    """Symmetric or power-of-two weight quantizer trained by DQA on a fixed threshold, per-channel or per-tensor.

    Args:
        quantization_config: a `TrainableQuantizerWeightsConfig` with weights_n_bits in 2..8.
        freeze_quant_params: accepted for a uniform signature; the threshold is fixed anyway.
        temperature_schedule: a `LinearAnnealing` of the temperature over training steps, ending at 0
            (default: 1 to 0 over steps 0..10000).
    """


@keras.saving.register_keras_serializable(package="trainable_infra")
@mark_quantizer(
    quantization_target=QuantizationTarget.Weights,
    quantization_method=[QuantizationMethod.UNIFORM],
    identifier=TrainingMethod.DQA,
)
class DQAUniformWeightQuantizer(_DQAUniform, BaseKerasWeightTrainableQuantizer):
    """Uniform weight quantizer trained by DQA on a fixed range (arguments as `DQASymmetricWeightQuantizer`)."""


@keras.saving.register_keras_serializable(package="trainable_infra")
@mark_quantizer(
    quantization_target=QuantizationTarget.Activation,
    quantization_method=_SYMMETRIC_METHODS,
    identifier=TrainingMethod.DQA,
)
class DQASymmetricActivationQuantizer(_DQASymmetric, BaseKerasActivationTrainableQuantizer):
    """Symmetric or power-of-two activation quantizer (signed or unsigned) trained by DQA on a fixed threshold."""


@keras.saving.register_keras_serializable(package="trainable_infra")
@mark_quantizer(
    quantization_target=QuantizationTarget.Activation,
    quantization_method=[QuantizationMethod.UNIFORM],
    identifier=TrainingMethod.DQA,
)
class DQAUniformActivationQuantizer(_DQAUniform, BaseKerasActivationTrainableQuantizer):
    """Uniform activation quantizer trained by DQA on a fixed range."""
