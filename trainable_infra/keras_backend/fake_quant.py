"""TensorFlow maths of the built-in quantizers: grids from parameters, the fused fake-quant op, LSQ gradients.

The forward pass is always TensorFlow's fused `fake_quant_with_min_max_vars[_per_channel]` op (through
`keras.quantizers.fake_quant_with_min_max_vars`) fed with the `(min, max)` that mct-quantizers' Keras inferable
quantizers compute from the same parameters, so a trained quantizer's output is bit-identical to the inferable
quantizer it converts to. LSQ keeps that forward and replaces only the gradient (`tf.custom_gradient`): it
calls the same TensorFlow op directly, with the channels moved last as Keras does, so that the op's own gradient
op gives the input gradient and the clipped sums in one op. Per tensor, this package's own op (native.py) gives
those and LSQ's rounding-error sum in one pass where it could be built.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from trainable_infra.common import numerics
from trainable_infra.keras_backend import native

# Thresholds below this are scaled up before the exponent is read, so denormals round to the right power.
_SMALLEST_NORMAL = np.float32(2.0**-126)
_DENORMAL_SHIFT = np.float32(2.0**64)


def fake_quant(x: tf.Tensor, min_range, max_range, n_bits: int, axis: int | None) -> tf.Tensor:
    """TensorFlow's fused fake quantization on [min_range, max_range], per-tensor or per-channel along `axis`."""
    return keras.quantizers.fake_quant_with_min_max_vars(x, min_range, max_range, num_bits=n_bits, axis=axis)


def op_step(min_range: tf.Tensor, max_range: tf.Tensor, n_bits: int) -> tf.Tensor:
    """The step Δ of the fused op on [min_range, max_range]: (max - min) / (2^n - 1) in float32, the expression
    of TensorFlow's `Nudge` (fake_quant_ops_functor.h), which the mct-quantizers inferable quantizers run too."""
    # Not `/`: in a traced function Grappler turns a division by a constant into a multiplication by its
    # reciprocal, which rounds differently (about 70% of random steps moved by one ulp). DivNoNan is left alone
    # and is IEEE division for the nonzero divisor here.
    return tf.math.divide_no_nan(max_range - min_range, np.float32(2**n_bits - 1))


# int32 limits as float32 (2^31 - 1 rounds to 2^31): clipping here gives the float32 values of common.integer's
# clipping in float64 followed by the int32 -> float32 cast.
_INT32_LIMITS = (np.float32(-(2.0**31)), np.float32(2.0**31))


@tf.custom_gradient
def integer_bias(bias: tf.Tensor, scale: tf.Tensor) -> tf.Tensor:
    """round(bias / scale)·scale in float32, ties to even (onnxruntime's and `common.integer.quantize_bias`'s
    rounding), saturated at the int32 range; the gradient passes straight through to `bias`, none to `scale`."""
    quotient = tf.clip_by_value(tf.round(bias / scale), *_INT32_LIMITS)  # tf.round rounds half to even
    quotient = tf.where(tf.math.is_nan(quotient), tf.zeros_like(quotient), quotient)

    def grad(dy: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return dy, tf.zeros_like(scale)

    return quotient * scale, grad


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


def _channels_last(x: tf.Tensor, axis: int | None) -> tf.Tensor:
    """x with `axis` swapped with the last axis (its own inverse), as the per-channel fused ops need."""
    rank = x.shape.rank
    if axis is None or axis % rank == rank - 1:
        return x
    perm = list(range(rank))
    perm[axis], perm[-1] = perm[-1], perm[axis]
    return tf.transpose(x, perm)


class _FusedLSQ:
    """The fused op and its gradient op on float32 input with the channels last, and the sums LSQ's parameter
    gradients are made of.

    The gradient op gives the input gradient (dy where x is inside the op's range, exactly the STE quantizers'
    input gradient) and the sums of dy below and above the range in one op; the rounding error round(u) − u
    inside is (Q(x) − x)/Δ, so LSQ needs one more product and sum instead of recomputing the grid per element.
    """

    def __init__(self, n_bits: int, axis: int | None):
        self.n_bits, self.axis = n_bits, axis
        per_channel = axis is not None
        self.forward_op = (
            tf.quantization.fake_quant_with_min_max_vars_per_channel
            if per_channel else tf.quantization.fake_quant_with_min_max_vars
        )
        self.gradient_op = (
            tf.quantization.fake_quant_with_min_max_vars_per_channel_gradient
            if per_channel else tf.quantization.fake_quant_with_min_max_vars_gradient
        )

    def forward(self, x: tf.Tensor, low: tf.Tensor, high: tf.Tensor) -> tuple[tf.Tensor, tuple]:
        """(Q(x) in x's dtype and layout, what `sums` needs of this call: x and Q(x) as float32 with the channels
        last, and whether the backward may run this package's op)."""
        xf = _channels_last(tf.cast(x, tf.float32), self.axis)
        yf = self.forward_op(xf, low, high, num_bits=self.n_bits)
        # Per tensor only; and decided with the forward pass too, since a forward compiled by XLA has its backward
        # compiled by XLA, even where the gradient is traced outside the compiled function.
        native_op = self.axis is None and not native.compiled_by_xla()
        return tf.cast(_channels_last(yf, self.axis), x.dtype), (xf, yf, native_op)

    def sums(
        self, dy: tf.Tensor, saved: tuple, low: tf.Tensor, high: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
        """(input gradient in dy's dtype and layout, Σ dy below the range, Σ dy above it, Σ dy·(Q(x) − x) inside),
        the sums per channel or per tensor; per tensor in one op of this package where it can run (native.py)."""
        xf, yf, native_op = saved
        dyf = _channels_last(tf.cast(dy, tf.float32), self.axis)
        fused = native.lsq_gradient(dyf, xf, yf, low, high, self.n_bits) if native_op else None
        if fused is not None:
            dx, below, above, rounding = fused
            return tf.cast(dx, dy.dtype), below, above, rounding
        dx, below, above = self.gradient_op(dyf, xf, low, high, num_bits=self.n_bits)
        # Over every axis but the channels (last here), or over all for per-tensor.
        sum_axes = None if self.axis is None else list(range(xf.shape.rank - 1))
        # An ±Inf input is clipped (dx = 0) and its error is infinite: multiply_no_nan makes its term 0, not
        # 0·Inf = NaN. A NaN input (dx = 0 too) must still make the sum NaN, as in the reference; a max over x,
        # which propagates NaN, finds it. (A `tf.cond` that recomputes the sum only for non-finite steps measured
        # about 0.5 ms slower per 64x32x32x32 activation on two cores than this unconditional max.)
        rounding = tf.reduce_sum(tf.math.multiply_no_nan(yf - xf, dx), axis=sum_axes)
        nan_input = tf.math.is_nan(tf.reduce_max(xf, axis=sum_axes))
        rounding = tf.where(nan_input, tf.constant(np.nan, tf.float32), rounding)
        return tf.cast(_channels_last(dx, self.axis), dy.dtype), below, above, rounding


def lsq_symmetric(
    *,
    n_bits: int,
    signed: bool,
    min_threshold: float,
    power_of_two: bool,
    axis: int | None,
    grad_scale: float | None,
) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """A function (x, threshold) -> Q(x) whose gradients are LSQ's (numerics.lsq_grads_symmetric, half up).

    x has its channels on `axis` (None: per-tensor); `grad_scale` is g = 1/sqrt(N·q_max) (None: computed from x
    as for activations).
    """
    fused = _FusedLSQ(n_bits, axis)
    step = np.float32(2.0 ** -(n_bits - int(signed)))
    q_min, q_max = numerics.symmetric_int_range(n_bits, signed)

    @tf.custom_gradient
    def quantize(x, threshold):
        t = effective_threshold(threshold, min_threshold, power_of_two)
        low, high = symmetric_range(t, n_bits, signed)
        y, saved = fused.forward(x, low, high)

        def grad(dy):
            dx, below, above, rounding = fused.sums(dy, saved, low, high)
            # ∂Q/∂Δ is q_min below the range, q_max above it and round(u) − u inside; Δ = t·step.
            d_delta = float(q_min) * below + float(q_max) * above + rounding / (t * step)
            g = _activation_grad_scale(x, q_max) if grad_scale is None else grad_scale
            d_threshold = d_delta * (g * step)
            # The min_threshold clamp passes the gradient only where it is inactive; 2^ceil(log2 t) passes it.
            d_threshold = d_threshold * tf.cast(threshold >= np.float32(min_threshold), tf.float32)
            return dx, tf.reshape(d_threshold, tf.shape(threshold))

        return y, grad

    return quantize


def lsq_uniform(
    *,
    n_bits: int,
    min_threshold: float,
    axis: int | None,
    grad_scale: float | None,
) -> Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tf.Tensor]:
    """A function (x, range_min, range_max) -> Q(x) with LSQ's range gradients (numerics.lsq_grads_uniform)."""
    fused = _FusedLSQ(n_bits, axis)
    levels = 2**n_bits - 1
    narrowest_width = np.float32(min_threshold)

    @tf.custom_gradient
    def quantize(x, range_min, range_max):
        low, high = uniform_range(*effective_range(range_min, range_max, min_threshold), n_bits)
        y, saved = fused.forward(x, low, high)

        def grad(dy):
            dx, below, above, rounding = fused.sums(dy, saved, low, high)
            # Σ dy·(round(u) − u)/levels inside: the range is levels·Δ wide.
            error = rounding / (high - low)
            g = _activation_grad_scale(x, levels) if grad_scale is None else grad_scale
            # A range held at its narrowest width (effective_range) follows neither end, and widening the range
            # to include zero passes the gradient only where it leaves the bound alone.
            wide = tf.maximum(range_max, 0.0) >= tf.minimum(range_min, 0.0) + narrowest_width
            d_min = (below - error) * g * tf.cast(tf.logical_and(range_min <= 0.0, wide), tf.float32)
            d_max = (above + error) * g * tf.cast(tf.logical_and(range_max >= 0.0, wide), tf.float32)
            return dx, tf.reshape(d_min, tf.shape(range_min)), tf.reshape(d_max, tf.shape(range_max))

        return y, grad

    return quantize
