"""Integer eval computation of a quantized layer between two activation quantizers, as TFLite computes it.

The reference is the TFLite interpreter with its default delegate (XNNPACK, TensorFlow 2.21), which runs the int8
CONV_2D / DEPTHWISE_CONV_2D kernels of `export_tflite`'s files: the int32 accumulator Σ x_int·w_int + b_int
(exact), converted to float32, multiplied by the float32 scale M = float32(Δ_in·Δ_w) / Δ_out, rounded half to
even, clamped to the output grid (and at 0 by a fused ReLU). A float convolution sums its products in an order of
its own and TensorFlow's fake-quant op rounds ties up, so values near a rounding boundary of the next quantizer
would land on either side of it. The trained wrapper (in inference) and the converted one run this computation,
so both still agree bit for bit.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from trainable_infra.keras_backend.fake_quant import op_step

# Layers whose integer kernel is reproduced here (TFLite's CONV_2D, DEPTHWISE_CONV_2D, and FULLY_CONNECTED /
# the 1x1 CONV_2D export_tflite writes for Dense).
INTEGER_LAYERS = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)


@dataclasses.dataclass(frozen=True)
class Grid:
    """A quantizer's grid as TensorFlow's fake-quant op nudges it: values k·step for integers k in [k_min, k_max]
    (k = q - zero point); step is float32, a scalar or per channel."""

    step: tf.Tensor
    k_min: tf.Tensor
    k_max: tf.Tensor


def grid_of_range(low: Any, high: Any, n_bits: int) -> Grid:
    """The `Grid` of the fused op on [low, high] (float32 tensors or arrays), as TensorFlow's `Nudge` computes it."""
    low, high = tf.cast(low, tf.float32), tf.cast(high, tf.float32)
    levels = np.float32(2**n_bits - 1)
    step = op_step(low, high, n_bits)
    zero = tf.clip_by_value(tf.floor(tf.math.divide_no_nan(-low, step) + np.float32(0.5)), 0.0, levels)
    return Grid(step, -zero, levels - zero)


def inferable_grid(quantizer: Any) -> Grid | None:
    """The `Grid` of an mct-quantizers Keras inferable quantizer with a (min, max) range, or None (lookup tables)."""
    low = getattr(quantizer, "min_range_np", getattr(quantizer, "min_range", None))
    high = getattr(quantizer, "max_range_np", getattr(quantizer, "max_range", None))
    if low is None or high is None or not isinstance(getattr(quantizer, "num_bits", None), int):
        return None
    low, high = np.asarray(low, np.float32).reshape(-1), np.asarray(high, np.float32).reshape(-1)
    if not getattr(quantizer, "per_channel", False):
        low, high = low[0], high[0]
    return grid_of_range(low, high, quantizer.num_bits)


def trainable_grid(quantizer: Any) -> Grid | None:
    """The `Grid` of a trainable quantizer that states its fused op's range (`op_range()`), or None."""
    op_range = getattr(quantizer, "op_range", None)
    if op_range is None:
        return None
    low, high = op_range()
    return grid_of_range(low, high, quantizer.params.n_bits)


def _activation_clip(activation: Any) -> float | None:
    """The upper clip of a layer's own activation: inf for relu, 6 for relu6, 0 for linear (no clip at all),
    None for any other activation."""
    name = getattr(activation, "__name__", None)
    return {"relu": float("inf"), "relu6": 6.0, "linear": 0.0}.get(name)


def integer_kernel_applies(layer: keras.layers.Layer) -> bool:
    """Whether `integer_forward` reproduces `layer`: a channels-last Conv2D (one group), DepthwiseConv2D or Dense
    with no activation, a ReLU or a ReLU6, computing in float32 (under a mixed-precision policy the float layer
    runs)."""
    if not isinstance(layer, INTEGER_LAYERS) or _activation_clip(layer.activation) is None:
        return False
    if layer.compute_dtype != "float32":
        return False
    if isinstance(layer, keras.layers.Dense):
        return True
    return layer.data_format == "channels_last" and getattr(layer, "groups", 1) == 1


def integer_forward(
    layer: keras.layers.Layer, inputs: Any, kernel: tf.Tensor, bias: tf.Tensor | None,
    input_grid: Grid, kernel_grid: Grid, output_grid: Grid, relu_clip: float | None = None,
) -> tf.Tensor:
    """The layer's output on `output_grid` (float32), computed as TFLite's int8 kernel does.

    `inputs` are on `input_grid` (a holder's output), `kernel` is the quantized kernel on `kernel_grid` (per output
    channel, or per input channel for a depthwise kernel), `bias` is on the grid Δ_in·Δ_w (`integer_bias`) or None.
    `relu_clip` is the upper clip of a ReLU layer between the layer and its output holder (inf: a plain ReLU, 6:
    ReLU6), which TFLite fuses into the kernel as the layer's own activation.
    """
    in_step = input_grid.step
    x = tf.cast(tf.round(tf.math.divide_no_nan(tf.cast(inputs, tf.float32), in_step)), tf.float64)
    w_step = kernel_grid.step
    depthwise = isinstance(layer, keras.layers.DepthwiseConv2D)
    # Steps broadcast on the last axis; depthwise kernels are (h, w, in, multiplier), quantized per input channel.
    kernel_steps = w_step[:, None] if depthwise and w_step.shape.rank == 1 else w_step
    w = tf.cast(tf.round(tf.math.divide_no_nan(kernel, kernel_steps)), tf.float64)
    if isinstance(layer, keras.layers.Dense):
        acc = tf.tensordot(x, w, [[x.shape.rank - 1], [0]])
    elif depthwise:
        strides = (1, *layer.strides, 1)
        acc = tf.nn.depthwise_conv2d(x, w, strides, layer.padding.upper(), dilations=layer.dilation_rate)
    else:
        acc = tf.nn.convolution(x, w, layer.strides, layer.padding.upper(), dilations=layer.dilation_rate)
    # float32(Δ_in·Δ_w), per output channel (a depthwise channel's steps repeat over its multiplier)
    product = in_step * w_step
    if depthwise and product.shape.rank == 1 and layer.depth_multiplier > 1:
        product = tf.repeat(product, layer.depth_multiplier)
    if bias is not None:
        acc += tf.cast(tf.round(tf.math.divide_no_nan(tf.cast(bias, tf.float32), product)), tf.float64)
    scale = tf.math.divide_no_nan(product, output_grid.step)
    k = tf.round(tf.cast(acc, tf.float32) * scale)  # half to even, as XNNPACK's requantization
    clips = [c for c in (_activation_clip(layer.activation), relu_clip) if c]
    low = tf.maximum(output_grid.k_min, 0.0) if clips else output_grid.k_min
    high = output_grid.k_max
    if min(clips, default=float("inf")) < float("inf"):
        # The clip on the output grid, rounded as XNNPACK quantizes its output bound (half to even).
        high = tf.minimum(high, tf.round(tf.math.divide_no_nan(np.float32(min(clips)), output_grid.step)))
    k = tf.clip_by_value(k, low, high)
    return k * output_grid.step
