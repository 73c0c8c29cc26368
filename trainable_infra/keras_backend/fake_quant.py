"""TensorFlow maths of the built-in quantizers: grids from parameters, the fused fake-quant op, LSQ gradients.

The forward pass is always TensorFlow's fused `fake_quant_with_min_max_vars[_per_channel]` op (through
`keras.quantizers.fake_quant_with_min_max_vars`) fed with the `(min, max)` that mct-quantizers' Keras inferable
quantizers compute from the same parameters, so a trained quantizer's output is bit-identical to the inferable
quantizer it converts to. LSQ keeps that forward and replaces only the gradient (`tf.custom_gradient`).
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from trainable_infra.common import numerics

# Thresholds below this are scaled up before the exponent is read, so denormals round to the right power.
_SMALLEST_NORMAL = np.float32(2.0**-126)
_DENORMAL_SHIFT = np.float32(2.0**64)


def fake_quant(x: tf.Tensor, min_range, max_range, n_bits: int, axis: int | None) -> tf.Tensor:
    """TensorFlow's fused fake quantization on [min_range, max_range], per-tensor or per-channel along `axis`."""
    return keras.quantizers.fake_quant_with_min_max_vars(x, min_range, max_range, num_bits=n_bits, axis=axis)


# ---------------------------------------------------------------------------------------------------------
# Ranges from variables (TensorFlow, traced into the step)
# ---------------------------------------------------------------------------------------------------------


def power_of_two_ceil(t: tf.Tensor) -> tf.Tensor:
    """The smallest power of two >= t (float32, t > 0), exactly: read from the exponent bits, no log."""
    small = t < _SMALLEST_NORMAL
    scaled = tf.where(small, t * _DENORMAL_SHIFT, t)
    bits = tf.bitcast(scaled, tf.int32)
    exponent = tf.bitwise.bitwise_and(bits, 0x7F800000)
    # NaN (all exponent bits and a mantissa) is kept: adding to its exponent would wrap it to -0.
    rounds_up = tf.logical_and(tf.bitwise.bitwise_and(bits, 0x007FFFFF) != 0, exponent != 0x7F800000)
    rounded = tf.bitcast(tf.where(rounds_up, exponent + 0x00800000, bits), tf.float32)
    return tf.where(small, rounded / _DENORMAL_SHIFT, rounded)


def effective_threshold(threshold: tf.Tensor, min_threshold: float, power_of_two: bool) -> tf.Tensor:
    """The threshold the grid uses: at least `min_threshold`, rounded up to 2^k for power-of-two."""
    t = tf.maximum(threshold, np.float32(min_threshold))
    return power_of_two_ceil(t) if power_of_two else t


def symmetric_range(t: tf.Tensor, n_bits: int, signed: bool) -> tuple[tf.Tensor, tf.Tensor]:
    """(min, max) of the op for an effective threshold `t`.

    Equal bit for bit to mct-quantizers' float64 computation: t·2^-(n-s) is exact and t − t·2^-(n-s) is one
    correctly rounded float32 subtraction of a value that float64 holds exactly; mct's zero adjustment is the
    identity on this range.
    """
    high = t - t * np.float32(2.0 ** -(n_bits - int(signed)))
    low = -t if signed else tf.zeros_like(t)
    return low, high


def effective_range(range_min: tf.Tensor, range_max: tf.Tensor, min_threshold: float) -> tuple[tf.Tensor, tf.Tensor]:
    """The range the grid is built from: (range_min, range_max) as given where range_min < range_max and the range
    widened to contain zero is at least `min_threshold` wide; elsewhere that widened range, held at `min_threshold`
    if narrower (training can push range_max to or below range_min, which would give a step of 0)."""
    low = tf.minimum(range_min, 0.0)
    high = tf.maximum(range_max, 0.0)
    narrowest = low + np.float32(min_threshold)
    # As given where possible: mct-quantizers widens it to contain zero itself, bit for bit as uniform_range does.
    as_given = tf.logical_and(range_min < range_max, high >= narrowest)
    return tf.where(as_given, range_min, low), tf.where(as_given, range_max, tf.maximum(high, narrowest))


def uniform_range(range_min: tf.Tensor, range_max: tf.Tensor, n_bits: int) -> tuple[tf.Tensor, tf.Tensor]:
    """(min, max) of the op for a uniform range: mct-quantizers' zero adjustment, replayed op for op in float64."""
    a = tf.cast(range_min, tf.float64)
    b = tf.cast(range_max, tf.float64)
    scale = (b - a) / np.float64(2**n_bits - 1)
    a_mid = scale * tf.round(a / scale)  # tf.round and np.round both round half to even
    b_mid = b - a + a_mid
    min_positive = tf.cast(a > 0, tf.float64)
    max_negative = tf.cast(b < 0, tf.float64)
    mid = (1.0 - min_positive) * (1.0 - max_negative)
    low = tf.minimum(a_mid * mid + max_negative * a, 0.0)
    high = tf.maximum(b_mid * mid + min_positive * b, 0.0)
    return tf.cast(low, tf.float32), tf.cast(high, tf.float32)


# ---------------------------------------------------------------------------------------------------------
# LSQ: the fused forward with the paper's gradients
# ---------------------------------------------------------------------------------------------------------


def _activation_grad_scale(x: tf.Tensor, q_max: int) -> tf.Tensor:
    """g = 1/sqrt(N·q_max) with N the features of one sample, for inputs whose shape was not known at build."""
    features = tf.size(x) // tf.maximum(tf.shape(x)[0], 1) if x.shape.rank > 1 else tf.constant(1)
    return tf.math.rsqrt(tf.cast(features * q_max, tf.float32))


def lsq_symmetric(
    *,
    n_bits: int,
    signed: bool,
    min_threshold: float,
    power_of_two: bool,
    axis: int | None,
    param_shape: tuple[int, ...],
    reduce_axes: tuple[int, ...] | None,
    grad_scale: float | None,
) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """A function (x, threshold) -> Q(x) whose gradients are LSQ's (numerics.lsq_grads_symmetric, half up).

    `param_shape` broadcasts the threshold against x, `reduce_axes` sums a per-element gradient back to the
    threshold's shape, `grad_scale` is g = 1/sqrt(N·q_max) (None: computed from x as for activations).
    """
    levels = 2 ** (n_bits - int(signed))
    q_min, q_max = numerics.symmetric_int_range(n_bits, signed)
    step = np.float32(1.0 / levels)

    @tf.custom_gradient
    def quantize(x, threshold):
        t = effective_threshold(threshold, min_threshold, power_of_two)
        low, high = symmetric_range(t, n_bits, signed)
        y = fake_quant(x, low, high, n_bits, axis)

        def grad(dy):
            xf, dyf = tf.cast(x, tf.float32), tf.cast(dy, tf.float32)
            delta = tf.reshape(t * step, param_shape)
            u = xf / delta
            below = xf < delta * q_min
            above = xf > delta * q_max
            d_delta = tf.where(below, float(q_min), tf.where(above, float(q_max), tf.floor(u + 0.5) - u))
            g = _activation_grad_scale(x, q_max) if grad_scale is None else grad_scale
            d_threshold = tf.reduce_sum(dyf * d_delta, axis=reduce_axes) * (g * step)
            # The min_threshold clamp passes the gradient only where it is inactive; 2^ceil(log2 t) passes it.
            d_threshold = d_threshold * tf.cast(threshold >= np.float32(min_threshold), tf.float32)
            # Compared directly (not "neither below nor above") so that NaN inputs get no gradient, as in STE.
            inside = tf.logical_and(xf >= delta * q_min, xf <= delta * q_max)
            return dy * tf.cast(inside, dy.dtype), tf.reshape(d_threshold, tf.shape(threshold))

        return y, grad

    return quantize


def lsq_uniform(
    *,
    n_bits: int,
    min_threshold: float,
    axis: int | None,
    param_shape: tuple[int, ...],
    reduce_axes: tuple[int, ...] | None,
    grad_scale: float | None,
) -> Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tf.Tensor]:
    """A function (x, range_min, range_max) -> Q(x) with LSQ's range gradients (numerics.lsq_grads_uniform)."""
    levels = 2**n_bits - 1
    inv_levels = np.float32(1.0 / levels)
    narrowest_width = np.float32(min_threshold)

    @tf.custom_gradient
    def quantize(x, range_min, range_max):
        low, high = uniform_range(*effective_range(range_min, range_max, min_threshold), n_bits)
        y = fake_quant(x, low, high, n_bits, axis)

        def grad(dy):
            xf, dyf = tf.cast(x, tf.float32), tf.cast(dy, tf.float32)
            a_c = tf.minimum(range_min, 0.0)
            b_c = tf.maximum(range_max, 0.0)
            # A range held at its narrowest width (effective_range) follows neither end.
            wide = b_c >= a_c + narrowest_width
            a = tf.reshape(a_c, param_shape)
            b = tf.reshape(tf.maximum(b_c, a_c + narrowest_width), param_shape)
            delta = (b - a) / np.float32(levels)
            zero_point = tf.clip_by_value(tf.floor(-a / delta + 0.5), 0.0, float(levels))
            u = xf / delta + zero_point
            below = xf < -zero_point * delta
            above = xf > (levels - zero_point) * delta
            # The input gradient compares with the range directly so that NaN inputs get none, as in STE; the
            # rounding error keeps "neither below nor above", so that a NaN input makes the range gradients NaN.
            inside = tf.logical_and(xf >= -zero_point * delta, xf <= (levels - zero_point) * delta)
            clipped = tf.logical_or(below, above)
            error = tf.where(clipped, 0.0, tf.floor(u + 0.5) - u) * inv_levels
            g = _activation_grad_scale(x, levels) if grad_scale is None else grad_scale
            d_min = tf.reduce_sum(dyf * (tf.cast(below, tf.float32) - error), axis=reduce_axes) * g
            d_max = tf.reduce_sum(dyf * (tf.cast(above, tf.float32) + error), axis=reduce_axes) * g
            # Widening the range to include zero passes the gradient only where it leaves the bound alone.
            d_min = d_min * tf.cast(tf.logical_and(range_min <= 0.0, wide), tf.float32)
            d_max = d_max * tf.cast(tf.logical_and(range_max >= 0.0, wide), tf.float32)
            return (
                dy * tf.cast(inside, dy.dtype),
                tf.reshape(d_min, tf.shape(range_min)),
                tf.reshape(d_max, tf.shape(range_max)),
            )

        return y, grad

    return quantize
