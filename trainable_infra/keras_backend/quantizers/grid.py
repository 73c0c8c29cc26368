"""The quantization grids in Keras: their variables, the fused fake-quant call and the inferable quantizer.

`SymmetricGrid` (symmetric and power-of-two) and `UniformGrid` are mixins shared by the STE and LSQ quantizers,
as in the PyTorch backend: they keep the threshold or the range in float32 layer weights (trainable for LSQ,
non-trainable for STE, saved in `.keras` either way, so `calibrate` can set them and a reloaded model has them),
compute the fused op's (min, max) from them with a few ops on C-length vectors each call, and build the
mct-quantizers inferable quantizer from their current values. The maths is DESIGN.md §4.
"""

from __future__ import annotations

from typing import Any, ClassVar

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

from trainable_infra.common.config import RANGE_MAX, RANGE_MIN, THRESHOLD
from trainable_infra.common.enums import VariableGroup
from trainable_infra.common.errors import NonFiniteError
from trainable_infra.common.mct import QuantizationTarget
from trainable_infra.common.quant_params import (
    SymmetricParams,
    UniformParams,
    activation_quant_params,
    weight_quant_params,
)
from trainable_infra.keras_backend.fake_quant import (
    effective_range,
    effective_threshold,
    fake_quant,
    op_step,
    symmetric_range,
    uniform_range,
)


class _Grid:
    """What both grids share: reading the config and creating the parameter variables."""

    # Whether the quantization parameters are trained (LSQ) or fixed (STE).
    learnable_params: ClassVar[bool]
    quantization_target: QuantizationTarget
    freeze_quant_params: bool
    axis: int | None = None
    input_rank: int | None = None

    def _read(self, tensor_shape: Any) -> SymmetricParams | UniformParams:
        if self.quantization_target is QuantizationTarget.Weights:
            shape = tuple(int(d) for d in tensor_shape)
            params = weight_quant_params(self.quantization_config, shape)
            self.axis, self.input_rank = params.channel_axis, len(shape)
            return params
        # Activation parameters need no tensor shape; they were read (and validated) in __init__.
        return self.params

    def check_exportable(self) -> None:
        """Raise `NonFiniteError` if a parameter is NaN or ±Inf: no inferable quantizer has such a grid."""
        for key, entry in self.registered_variables().items():
            value = np.asarray(entry.variable.numpy())
            if not np.all(np.isfinite(value)):
                raise NonFiniteError(
                    f"{type(self).__name__} cannot be converted to an inferable quantizer: its {key} is not finite "
                    f"({value.tolist()})"
                )

    def _variable(self, layer: keras.layers.Layer, name: str, key: str, value: np.ndarray) -> keras.Variable:
        # Per-tensor parameters are scalars; per-channel ones C-length vectors, as the fused op takes them.
        value = np.asarray(value, dtype=np.float32)
        if self.axis is None:
            value = value.reshape(())
        return self.add_quantizer_weight(
            layer, f"{name}_{key}", value, VariableGroup.QPARAMS,
            trainable=self.learnable_params and not self.freeze_quant_params,
        )


class SymmetricGrid(_Grid):
    """Symmetric and power-of-two grids: the op runs on [-t, t - Δ] (signed) or [0, t - Δ], Δ = t / 2^(n-s)."""

    params: SymmetricParams

    def initialize_quantization(self, tensor_shape: Any, name: str, layer: keras.layers.Layer) -> None:
        """Create the threshold variable `<name>_threshold` on `layer`."""
        self.params = self._read(tensor_shape)
        self.threshold = self._variable(layer, name, THRESHOLD, self.params.threshold)

    def quantize(self, inputs: tf.Tensor) -> tf.Tensor:
        """Fake-quantize `inputs` on the grid of the current threshold (TensorFlow's gradient: clipped identity)."""
        p = self.params
        t = effective_threshold(tf.convert_to_tensor(self.threshold), p.min_threshold, p.power_of_two)
        low, high = symmetric_range(t, p.n_bits, p.signed)
        return fake_quant(inputs, low, high, p.n_bits, self.axis)

    def grid_step(self) -> tf.Tensor:
        """The grid step Δ the fused op uses now: a float32 scalar, or a C-length vector per channel."""
        return op_step(*self.op_range(), self.params.n_bits)

    def op_range(self) -> tuple[tf.Tensor, tf.Tensor]:
        """The (min, max) the fused op runs on now (float32, per channel or scalar)."""
        p = self.params
        t = effective_threshold(tf.convert_to_tensor(self.threshold), p.min_threshold, p.power_of_two)
        return symmetric_range(t, p.n_bits, p.signed)

    def current_threshold(self) -> list[float]:
        """The threshold the grid uses now (clamped, power-of-two rounded), as the inferable quantizer takes it."""
        p = self.params
        t = effective_threshold(tf.reshape(tf.convert_to_tensor(self.threshold), [-1]), p.min_threshold, p.power_of_two)
        return [float(v) for v in t.numpy()]

    def convert2inferable(self) -> Any:
        """The mct-quantizers Keras quantizer (symmetric or power-of-two) with the current threshold."""
        self.check_exportable()
        p = self.params
        if self.quantization_target is QuantizationTarget.Weights:
            cls = WeightsPOTInferableQuantizer if p.power_of_two else WeightsSymmetricInferableQuantizer
            return cls(
                num_bits=p.n_bits,
                threshold=self.current_threshold(),
                per_channel=self.axis is not None,
                channel_axis=self.axis,
                input_rank=self.input_rank,
            )
        cls = ActivationPOTInferableQuantizer if p.power_of_two else ActivationSymmetricInferableQuantizer
        return cls(num_bits=p.n_bits, threshold=self.current_threshold(), signed=p.signed)


class UniformGrid(_Grid):
    """Uniform (affine) grids: the op runs on the range adjusted to include zero, as mct-quantizers does."""

    params: UniformParams

    def initialize_quantization(self, tensor_shape: Any, name: str, layer: keras.layers.Layer) -> None:
        """Create the range variables `<name>_range_min` and `<name>_range_max` on `layer`."""
        self.params = self._read(tensor_shape)
        self.range_min = self._variable(layer, name, RANGE_MIN, self.params.range_min)
        self.range_max = self._variable(layer, name, RANGE_MAX, self.params.range_max)

    def _effective_range(self) -> tuple[tf.Tensor, tf.Tensor]:
        return effective_range(
            tf.convert_to_tensor(self.range_min), tf.convert_to_tensor(self.range_max), self.params.min_threshold
        )

    def quantize(self, inputs: tf.Tensor) -> tf.Tensor:
        """Fake-quantize `inputs` on the grid of the current range (TensorFlow's gradient: clipped identity)."""
        low, high = uniform_range(*self._effective_range(), self.params.n_bits)
        return fake_quant(inputs, low, high, self.params.n_bits, self.axis)

    def grid_step(self) -> tf.Tensor:
        """The grid step Δ the fused op uses now: a float32 scalar, or a C-length vector per channel."""
        return op_step(*self.op_range(), self.params.n_bits)

    def op_range(self) -> tuple[tf.Tensor, tf.Tensor]:
        """The (min, max) the fused op runs on now (float32, per channel or scalar)."""
        return uniform_range(*self._effective_range(), self.params.n_bits)

    def current_range(self) -> tuple[list[float], list[float]]:
        """The range the grid is built from now (a collapsed one held at min_threshold wide), as lists with
        range_min < range_max in every channel, as the inferable quantizer takes it."""
        low, high = self._effective_range()
        return [float(v) for v in np.reshape(low, -1)], [float(v) for v in np.reshape(high, -1)]

    def convert2inferable(self) -> Any:
        """The mct-quantizers Keras uniform quantizer with the current range."""
        self.check_exportable()
        low, high = self.current_range()
        if self.quantization_target is QuantizationTarget.Weights:
            return WeightsUniformInferableQuantizer(
                num_bits=self.params.n_bits,
                min_range=low,
                max_range=high,
                per_channel=self.axis is not None,
                channel_axis=self.axis,
                input_rank=self.input_rank,
            )
        return ActivationUniformInferableQuantizer(num_bits=self.params.n_bits, min_range=low, max_range=high)


def read_activation_params(quantizer: Any) -> None:
    """Read (and validate) an activation quantizer's parameters at construction: they need no tensor shape."""
    quantizer.params = activation_quant_params(quantizer.quantization_config)
