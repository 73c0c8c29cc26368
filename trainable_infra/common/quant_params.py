"""Read a quantizer config into the plain parameters a backend builds its variables from.

Both backends call these in `initialize_quantization`, so a missing key, a channel axis outside the tensor
or a per-channel array of the wrong length fails the same way, once, before training starts.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from trainable_infra.common.config import (
    IS_SIGNED,
    RANGE_MAX,
    RANGE_MIN,
    THRESHOLD,
    TrainableQuantizerActivationConfig,
    TrainableQuantizerWeightsConfig,
)
from trainable_infra.common.errors import QuantizationConfigError
from trainable_infra.common.mct import QuantizationMethod
from trainable_infra.common.numerics import channel_vector, normalize_axis


@dataclasses.dataclass(frozen=True)
class SymmetricParams:
    """Symmetric / power-of-two parameters; `threshold` is 1-D (length C per-channel, length 1 per-tensor)."""

    threshold: np.ndarray
    n_bits: int
    signed: bool
    power_of_two: bool
    min_threshold: float
    channel_axis: int | None  # non-negative; None for per-tensor

    @property
    def int_range(self) -> tuple[int, int]:
        """(q_min, q_max) of the integer grid."""
        s = int(self.signed)
        return -s * 2 ** (self.n_bits - s), 2 ** (self.n_bits - s) - 1


@dataclasses.dataclass(frozen=True)
class UniformParams:
    """Uniform parameters; ranges are 1-D (length C per-channel, length 1 per-tensor), not yet adjusted."""

    range_min: np.ndarray
    range_max: np.ndarray
    n_bits: int
    channel_axis: int | None  # non-negative; None for per-tensor
    min_threshold: float  # the narrowest range the grid spans (a collapsed range is held at this width)


QuantParams = SymmetricParams | UniformParams


def _require(params: dict, key: str, where: str, method: QuantizationMethod) -> object:
    if key not in params:
        raise QuantizationConfigError(
            f"{where} must contain {key!r} for {method.name} quantization, got keys {sorted(params)}"
        )
    return params[key]


def _vector(value: object, shape: tuple[int, ...] | None, axis: int | None, name: str) -> np.ndarray:
    if axis is None or shape is None:
        return np.asarray(value, dtype=np.float64).reshape(1)
    return channel_vector(value, shape, axis, name)


def _read(
    method: QuantizationMethod,
    params: dict,
    where: str,
    n_bits: int,
    min_threshold: float,
    signed: bool | None,
    shape: tuple[int, ...] | None,
    axis: int | None,
) -> QuantParams:
    if method in (QuantizationMethod.SYMMETRIC, QuantizationMethod.POWER_OF_TWO):
        threshold = _require(params, THRESHOLD, where, method)
        if signed is None:
            signed = bool(_require(params, IS_SIGNED, where, method))
        return SymmetricParams(
            threshold=_vector(threshold, shape, axis, f"{where}[{THRESHOLD!r}]"),
            n_bits=n_bits,
            signed=signed,
            power_of_two=method is QuantizationMethod.POWER_OF_TWO,
            min_threshold=min_threshold,
            channel_axis=axis,
        )
    if method is QuantizationMethod.UNIFORM:
        low = _vector(_require(params, RANGE_MIN, where, method), shape, axis, f"{where}[{RANGE_MIN!r}]")
        high = _vector(_require(params, RANGE_MAX, where, method), shape, axis, f"{where}[{RANGE_MAX!r}]")
        return UniformParams(
            range_min=low, range_max=high, n_bits=n_bits, channel_axis=axis, min_threshold=min_threshold
        )
    raise QuantizationConfigError(
        f"{where}: quantization method {method.name} has no uniform-grid parameters; use SYMMETRIC, "
        "POWER_OF_TWO or UNIFORM"
    )


def weight_quant_params(config: TrainableQuantizerWeightsConfig, tensor_shape: tuple[int, ...]) -> QuantParams:
    """The parameters of a weight quantizer for a tensor of `tensor_shape` (weights are always signed)."""
    shape = tuple(int(d) for d in tensor_shape)
    axis = None
    if config.weights_per_channel_threshold:
        axis = normalize_axis(config.weights_channels_axis, len(shape), "weights_channels_axis")
    return _read(
        config.weights_quantization_method,
        config.weights_quantization_params,
        "weights_quantization_params",
        config.weights_n_bits,
        config.min_threshold,
        True,
        shape,
        axis,
    )


def activation_quant_params(config: TrainableQuantizerActivationConfig) -> QuantParams:
    """The (per-tensor) parameters of an activation quantizer."""
    return _read(
        config.activation_quantization_method,
        config.activation_quantization_params,
        "activation_quantization_params",
        config.activation_n_bits,
        config.min_threshold,
        None,
        None,
        None,
    )
