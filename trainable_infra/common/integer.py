"""What integer runtimes do to a layer that both backends reproduce: BatchNorm folding and the int32 bias.

- Folding: a BatchNorm y = γ·(x - μ)/sqrt(σ² + ε) + β after a layer z = W·x + b is the layer
  W' = W·γ/sqrt(σ² + ε) (per output channel), b' = β + (b - μ)·γ/sqrt(σ² + ε). Computed in float64 and
  rounded once to float32, so both backends fold a model to the same bits.
- Integer bias: onnxruntime (QLinearConv / QGemm), TensorRT and TFLite add the bias to the int32 accumulator
  of x_int·w_int, so it is stored as round(b / s) on the grid s = Δ_in·Δ_w (a float32 product, per output
  channel). The layer then computes with b_q = round(b / s)·s.
"""

from __future__ import annotations

import numpy as np

from trainable_infra.common.errors import QuantizationConfigError
from trainable_infra.common.numerics import broadcast_shape, normalize_axis

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def fold_batch_norm(
    weight: np.ndarray,
    bias: np.ndarray | None,
    mean: np.ndarray,
    variance: np.ndarray,
    epsilon: float,
    gamma: np.ndarray | None = None,
    beta: np.ndarray | None = None,
    channel_axis: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """The float32 (weight, bias) of a layer with the BatchNorm that follows it folded in.

    `channel_axis` is the output-channel axis of `weight`; `bias` None is a zero bias, `gamma` None a scale of
    one and `beta` None a shift of zero (BatchNorms without `affine` / `scale` / `center`).
    """
    weight = np.asarray(weight, dtype=np.float64)
    axis = normalize_axis(channel_axis, weight.ndim)
    channels = weight.shape[axis]
    vectors = {"mean": mean, "variance": variance, "gamma": gamma, "beta": beta, "bias": bias}
    for name, value in vectors.items():
        if value is not None and np.shape(value) != (channels,):
            raise QuantizationConfigError(
                f"fold_batch_norm: {name} must have shape ({channels},) to match the weight's {channels} output "
                f"channels (axis {channel_axis} of shape {weight.shape}), got shape {np.shape(value)}"
            )
    factor = 1.0 / np.sqrt(np.asarray(variance, dtype=np.float64) + float(epsilon))
    if gamma is not None:
        factor = factor * np.asarray(gamma, dtype=np.float64)
    shift = np.zeros(channels) if beta is None else np.asarray(beta, dtype=np.float64)
    old_bias = np.zeros(channels) if bias is None else np.asarray(bias, dtype=np.float64)
    folded_weight = weight * factor.reshape(broadcast_shape(weight.ndim, axis))
    folded_bias = shift + (old_bias - np.asarray(mean, dtype=np.float64)) * factor
    return folded_weight.astype(np.float32), folded_bias.astype(np.float32)


def bias_scale(input_step: float | np.ndarray, weight_step: np.ndarray) -> np.ndarray:
    """s = Δ_in·Δ_w per output channel, the float32 product the runtimes use for the int32 bias."""
    return np.float32(input_step) * np.asarray(weight_step, dtype=np.float32)


def integer_bias(bias: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """round(bias / scale), ties to even, as int32 (saturated at the int32 range, as the runtimes store it)."""
    bias, scale = np.asarray(bias, dtype=np.float32), np.asarray(scale, dtype=np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        quotient = np.rint(bias / scale)
    # Clipped in float64: INT32_MAX is not a float32.
    return np.clip(np.nan_to_num(quotient.astype(np.float64), nan=0.0), INT32_MIN, INT32_MAX).astype(np.int32)


def quantize_bias(bias: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The bias the integer kernel adds, in float32: round(bias / scale)·scale."""
    return integer_bias(bias, scale).astype(np.float32) * np.asarray(scale, dtype=np.float32)
