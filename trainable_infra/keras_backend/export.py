"""Full-integer TFLite export of a converted Keras model, checked in the TFLite interpreter before it is put in place.

The converted model is rewritten for `tf.lite.TFLiteConverter` with `Optimize.DEFAULT`, the flow of TF-MOT's
quantization-aware training: every quantizer becomes TensorFlow's 8-bit fake-quant op, which the converter turns
into int8 tensors, so the interpreter runs int8 CONV_2D / DEPTHWISE_CONV_2D / ADD / CONCATENATION / MEAN kernels
with int8 weights and int32 biases. A grid of n < 8 bits goes into an int8 container: an 8-bit fake-quant with the
same step and zero point (an n-bit weight is on it already, so it is left as it is) followed, for activations, by
a clip to the n-bit range, which TFLite runs on int8 as MINIMUM / MAXIMUM. Weights get the int8 zero point 0 that
TFLite's kernels require. A Dense layer is written as a 1x1 CONV_2D: TFLiteConverter cannot carry per-channel
weight scales through the transposed kernel of FULLY_CONNECTED.

The check runs the LiteRT interpreter (`ai-edge-litert`) when it is installed, else `tf.lite.Interpreter`, with
its default delegate (XNNPACK), as users run it; its arithmetic is the reference the Keras model follows: the
model's input quantizer is written out in float operations before the QUANTIZE op (ties round up, as in
TensorFlow's fake-quant op), and a quantized Conv2D / DepthwiseConv2D / Dense layer between two holders computes
in inference as XNNPACK's int8 kernel does (`integer.integer_forward`). TFLite's reference kernels (the
interpreter without its delegate) requantize in fixed point and round otherwise.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import re
import tempfile
import warnings
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from trainable_infra.common.einsum import parse_equation
from trainable_infra.common.errors import ExportValidationError, QuantizationConfigError
from trainable_infra.common.export import (
    ExportReport,
    atomic_output,
    check_agreement,
    check_output_path,
    check_require_identical,
)
from trainable_infra.keras_backend.attention import (
    KerasInferableMultiHeadAttention,
    QuantizedAttentionBase,
    copy_attention_weights,
    float_attention_config,
)
from trainable_infra.keras_backend.calibrate import all_layers
from trainable_infra.keras_backend.inferable_wrappers import (
    KerasInferableActivationQuantizationHolder,
    KerasInferableQuantizationWrapper,
)
from trainable_infra.keras_backend.quantize import copy_layer
from trainable_infra.keras_backend.wrappers import call_with_weights


def _quantizers(model: keras.Model) -> list[Any]:
    found = []
    for layer in all_layers(model):
        if isinstance(layer, KerasInferableQuantizationWrapper):
            found.extend(layer.weights_quantizers.values())
        elif isinstance(layer, KerasInferableActivationQuantizationHolder):
            found.append(layer.activation_holder_quantizer)
    return found


# --- grids in int8 containers ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Int8Grid:
    """The grid of an inferable quantizer as TensorFlow's fake-quant op nudges it, and its int8 container.

    Attributes:
        n_bits: the bits of the grid.
        step: Δ, float32 (per channel, or a scalar).
        low, high: the grid's lowest and highest values, Δ·(0 - z) and Δ·(2^n - 1 - z) (what the op clips to).
        low8, high8: the range of the 8-bit fake-quant with the same step whose grid holds the n-bit one, with
            the int8 zero point 0 for weights (TFLite's kernels need it) and the n-bit range centred otherwise.
    """

    n_bits: int
    step: np.ndarray
    low: np.ndarray
    high: np.ndarray
    low8: np.ndarray
    high8: np.ndarray


def int8_grid(quantizer: Any, weights: bool, owner: str) -> Int8Grid:
    """The `Int8Grid` of an mct-quantizers Keras inferable quantizer (symmetric, power-of-two or uniform).

    Raises `QuantizationConfigError` where TFLite's int8 kernels cannot hold the grid: more than 8 bits, a
    lookup-table quantizer, or 8-bit weights whose zero point is not in the middle (uniform weights).
    """
    low_range = getattr(quantizer, "min_range_np", getattr(quantizer, "min_range", None))
    high_range = getattr(quantizer, "max_range_np", getattr(quantizer, "max_range", None))
    n_bits = getattr(quantizer, "num_bits", None)
    if low_range is None or high_range is None or not isinstance(n_bits, int):
        raise QuantizationConfigError(
            f"{owner}: {type(quantizer).__name__} has no (min, max) range; export_tflite writes uniform grids "
            "(symmetric, power-of-two or uniform quantizers), not lookup tables"
        )
    if n_bits > 8:
        raise QuantizationConfigError(
            f"{owner}: {n_bits}-bit quantizer; TFLite's int8 kernels hold grids of 2 to 8 bits"
        )
    low_range = np.asarray(low_range, np.float32).reshape(-1)
    high_range = np.asarray(high_range, np.float32).reshape(-1)
    levels = np.float32(2**n_bits - 1)
    # TensorFlow's Nudge (fake_quant_ops_functor.h), in float32.
    step = ((high_range - low_range) / levels).astype(np.float32)
    zero = np.clip(np.round(-low_range / step), 0, levels)  # ties of the zero point do not occur on these grids
    if weights:
        container_zero = np.full_like(zero, 128.0)
        if np.any(zero > 128) or np.any(levels - zero > 127):
            raise QuantizationConfigError(
                f"{owner}: {n_bits}-bit weights with zero points {sorted(set(zero.astype(int).tolist()))[:4]}: "
                "TFLite's int8 weights have the zero point 0 and hold integers in -128..127; use symmetric or "
                "power-of-two weights at 8 bits (uniform weights fit at up to 7 bits)"
            )
    else:
        middle = zero + (128 - 2 ** (n_bits - 1))
        container_zero = np.where(zero == 0, 0.0, np.where(zero == levels, 255.0, middle))
    low = (-zero * step).astype(np.float32)
    high = ((levels - zero) * step).astype(np.float32)
    low8 = (-container_zero * step).astype(np.float32)
    high8 = ((255.0 - container_zero) * step).astype(np.float32)
    if not getattr(quantizer, "per_channel", False):
        step, low, high, low8, high8 = (np.float32(a[0]) for a in (step, low, high, low8, high8))
    return Int8Grid(n_bits, step, low, high, low8, high8)


def _tf_fake_quant_float(x: tf.Tensor, quantizer: Any) -> tf.Tensor:
    """TensorFlow's per-tensor fake-quant op of `quantizer`'s range written out in float32 operations, expression
    for expression (`FakeQuantWithMinMaxArgsFunctor`, fake_quant_ops_functor.h): the value lands on the grid as in
    the Keras model, ties rounded up, and the QUANTIZE op after it only stores it. TFLite's QUANTIZE would round
    ties away from zero (XNNPACK: to even)."""
    n_bits = quantizer.num_bits
    low = np.float32(np.asarray(quantizer.min_range, np.float32).reshape(-1)[0])
    high = np.float32(np.asarray(quantizer.max_range, np.float32).reshape(-1)[0])
    levels = np.float32(2**n_bits - 1)
    scale = (high - low) / levels
    inv_scale = levels / (high - low)
    zero_from_min = np.float32(0) - low / scale
    zero = 0.0 if zero_from_min < 0 else levels if zero_from_min > levels else np.round(zero_from_min)
    nudged_min, nudged_max = np.float32(-zero) * scale, (levels - np.float32(zero)) * scale
    quant_zero = np.floor(-nudged_min * inv_scale + np.float32(0.5))
    shifted = tf.minimum(tf.maximum(x, nudged_min), nudged_max) - nudged_min
    return tf.floor(shifted * inv_scale - quant_zero + np.float32(0.5)) * scale


def _fake_quant8(x: tf.Tensor, grid: Int8Grid) -> tf.Tensor:
    if np.ndim(grid.low8):
        return tf.quantization.fake_quant_with_min_max_vars_per_channel(x, grid.low8, grid.high8, num_bits=8)
    return tf.quantization.fake_quant_with_min_max_vars(x, float(grid.low8), float(grid.high8), num_bits=8)


class _Int8Activation(keras.layers.Layer):
    """An activation quantizer as the converter reads it: the 8-bit fake-quant of the container, and below 8
    bits a clip to the n-bit range between two of them (so that the clip runs on int8, MINIMUM / MAXIMUM)."""

    def __init__(self, grid: Int8Grid, float_quantizer: Any = None, **kwargs: Any):
        super().__init__(autocast=False, **kwargs)
        self.grid = grid
        self.float_quantizer = float_quantizer  # on a model input: quantize in float first (see _tf_fake_quant_float)

    def call(self, inputs: Any) -> Any:
        x = tf.cast(inputs, tf.float32)
        if self.float_quantizer is not None:
            x = _tf_fake_quant_float(x, self.float_quantizer)
        x = _fake_quant8(x, self.grid)
        if self.grid.n_bits < 8:
            x = _fake_quant8(tf.clip_by_value(x, self.grid.low, self.grid.high), self.grid)
        return x

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape


def matmul_form(layer: keras.layers.Layer) -> tuple[int, int] | None:
    """(contracted axes, produced axes) of a layer that is a matrix product of its input's trailing axes with its
    kernel's leading ones, producing the kernel's trailing axes last: (1, 1) for Dense, e.g. (1, 2) for the
    "abc,cde->abde" EinsumDense of an attention projection; None for any other layer or equation."""
    if isinstance(layer, keras.layers.Dense):
        return 1, 1
    if not isinstance(layer, keras.layers.EinsumDense):
        return None
    (inputs, kernel), output = parse_equation(layer.equation, operands=2)
    contracted = "".join(letter for letter in kernel if letter not in output)
    produced = kernel[len(contracted):]
    if not contracted or not produced or "..." in kernel or kernel != contracted + produced:
        return None
    free = inputs[:len(inputs) - len(contracted)]
    if inputs[len(free):] != contracted or output != free + produced:
        return None
    return len(contracted), len(produced)


def _bias_on_produced_axes(layer: keras.layers.Layer, produced: int) -> bool:
    """Whether the bias of a layer in `matmul_form` lies along the kernel's produced axes (the output's last
    `produced` ones) only: Dense's always does, an EinsumDense's where its bias axes are among them."""
    if not isinstance(layer, keras.layers.EinsumDense):
        return True
    _, output = parse_equation(layer.equation, operands=2)
    return all(letter in output[len(output) - produced:] for letter in layer.bias_axes or "")


def _tiled(grid: Int8Grid, repeats: int) -> Int8Grid:
    """`grid` with its per-channel arrays repeated `repeats` times (a kernel's leading output axes flattened in
    front of its channel axis); a per-tensor grid as it is."""
    if repeats == 1 or not np.ndim(grid.step):
        return grid
    fields = ("step", "low", "high", "low8", "high8")
    return dataclasses.replace(grid, **{f: np.tile(getattr(grid, f), repeats) for f in fields})


class _Int8Weights(keras.layers.Layer):
    """A layer whose quantized kernels pass through the 8-bit fake-quant of their container (channels last, as
    TensorFlow's per-channel op needs). A Dense layer, and an EinsumDense that is a matrix product (`matmul_form`),
    runs as a 1x1 convolution on its flattened kernel: TFLiteConverter cannot carry per-channel scales through the
    kernel of FULLY_CONNECTED, or through the reshapes it writes for an einsum."""

    def __init__(
        self,
        layer: keras.layers.Layer,
        grids: dict[str, tuple[Int8Grid, list[int] | None]],
        matmul: tuple[int, int] | None = None,
        **kwargs: Any,
    ):
        super().__init__(autocast=False, **kwargs)
        self.layer = layer  # its kernels hold the quantized values already (`tflite_graph`)
        self.grids = grids
        self.matmul = matmul  # `matmul_form(layer)` where it runs as a 1x1 convolution

    def build(self, input_shape: Any) -> None:
        if not self.layer.built:
            self.layer.build(input_shape)

    def _kernel(self, name: str) -> tf.Tensor:
        grid, perm = self.grids[name]
        kernel = tf.convert_to_tensor(getattr(self.layer, name))
        if self.matmul is not None:
            # (1, 1, contracted, produced): the channel axis (the kernel's last, or moved last by `perm`) stays last,
            # its steps repeated over the produced axes flattened in front of it.
            kernel = tf.reshape(kernel, (1, 1, int(np.prod(kernel.shape[:self.matmul[0]])), -1))
            grid = _tiled(grid, kernel.shape[-1] // int(np.size(grid.step)))
        if perm is not None:
            kernel = tf.transpose(kernel, perm)
        kernel = _fake_quant8(kernel, grid)
        return tf.transpose(kernel, perm) if perm is not None else kernel

    def call(self, inputs: Any) -> Any:
        layer = self.layer
        if self.matmul is not None:
            contracted, produced = self.matmul
            kernel_shape = tuple(layer.kernel.shape)
            depth = int(np.prod(kernel_shape[:contracted]))
            produced_shape = kernel_shape[contracted:]
            outputs = tf.nn.conv2d(tf.reshape(inputs, (-1, 1, 1, depth)), self._kernel("kernel"), 1, "VALID")
            bias = getattr(layer, "bias", None) if getattr(layer, "use_bias", True) else None
            # The bias is added to the convolution's own output, flattened as its channels, so that the converter
            # fuses it into the int8 CONV_2D; a bias along the input's free axes is added after the reshape.
            fused = bias is not None and _bias_on_produced_axes(layer, produced)
            if fused:
                outputs = tf.nn.bias_add(outputs, tf.reshape(tf.broadcast_to(bias, produced_shape), [-1]))
            free = inputs.shape[1:len(inputs.shape) - contracted]
            outputs = tf.reshape(outputs, (-1, *free, *produced_shape))
            if bias is not None and not fused:
                outputs = outputs + tf.convert_to_tensor(bias)
            return layer.activation(outputs) if layer.activation is not None else outputs
        substitutes = [(getattr(layer, name), self._kernel(name)) for name in self.grids]
        outputs, _ = call_with_weights(layer, substitutes, (inputs,), {})
        return outputs

    def compute_output_spec(self, inputs: Any) -> Any:
        return self.layer.compute_output_spec(inputs)


def _channels_last_perm(quantizer: Any, rank: int, leading: int) -> list[int] | None:
    """The transposition that moves the quantizer's channel axis of a rank-`rank` kernel last, after `leading`
    axes of size 1 are put in front of the kernel (a Dense kernel as a 1x1 convolution's); None if it is last."""
    axis = getattr(quantizer, "channel_axis", None)
    if not getattr(quantizer, "per_channel", False) or axis is None or axis % rank == rank - 1:
        return None
    perm = list(range(rank + leading))
    axis = axis % rank + leading
    perm[axis], perm[-1] = perm[-1], perm[axis]
    return perm


def _reads_model_input(layer: keras.layers.Layer) -> bool:
    nodes = layer._inbound_nodes
    if len(nodes) != 1 or len(nodes[0].input_tensors) != 1:
        return False
    history = getattr(nodes[0].input_tensors[0], "_keras_history", None)
    return history is not None and isinstance(history.operation, keras.layers.InputLayer)


def _int8_weights(layer: keras.layers.Layer, quantizers: dict[str, Any], name: str) -> _Int8Weights:
    """The export form of a float `layer` whose kernels the inferable `quantizers` quantize. Kernels TFLite's int8
    kernels cannot take (an EinsumDense that is no matrix product, `matmul_form`, or is quantized along another
    axis than its last) stay float: their values are on the quantizer's grid already (`tflite_graph` stores them
    so), the interpreter runs that layer in float."""
    grids = {}
    matmul = matmul_form(layer)
    for attribute, quantizer in quantizers.items():
        rank = len(getattr(layer, attribute).shape)
        perm = _channels_last_perm(quantizer, rank, 2 if isinstance(layer, keras.layers.Dense) else 0)
        if isinstance(layer, keras.layers.EinsumDense) and (matmul is None or perm is not None):
            continue
        grids[attribute] = (int8_grid(quantizer, True, f"layer {name!r}, {attribute!r}"), perm)
    return _Int8Weights(copy_layer(layer), grids, matmul if "kernel" in grids else None, name=name)


def _store_quantized_kernels(source: keras.layers.Layer, quantizers: dict[str, Any], target: _Int8Weights) -> None:
    """Copy `source`'s weights into the export layer, its kernels on their n-bit grids, as constants: an n-bit
    fake-quant op in the graph would make the converter write INT4 / INT2 tensors. The 8-bit fake-quant of the
    container leaves them as they are."""
    target.layer.set_weights(source.get_weights())
    for name, quantizer in quantizers.items():
        getattr(target.layer, name).assign(quantizer(tf.convert_to_tensor(getattr(source, name))))


class _Int8Attention(QuantizedAttentionBase):
    """A converted attention layer as the converter reads it: `_Int8Weights` projections and `_Int8Activation`
    points (export only, never saved)."""

    def _make_holder(self, point: str, quantizer: Any) -> keras.layers.Layer:
        name = self.holder_name(point)
        return _Int8Activation(int8_grid(quantizer, False, f"layer {name!r}"), name=name)

    def _wrap_projection(self, name: str, dense: keras.layers.EinsumDense, quantizer: Any) -> keras.layers.Layer:
        return _int8_weights(dense, {"kernel": quantizer}, f"{self.name}_{name}")


def _int8_attention(layer: KerasInferableMultiHeadAttention) -> _Int8Attention:
    return _Int8Attention(
        **float_attention_config(layer), weights_quantizers=layer.weights_quantizers,
        activation_quantizers={point: h.activation_holder_quantizer for point, h in layer.activation_holders().items()},
    )


def tflite_graph(model: keras.Model) -> keras.Model:
    """The model `export_tflite` hands to TFLiteConverter: `model` (a converted model) with each quantizer written
    as the 8-bit fake-quant of its int8 container (`Int8Grid`), and each Dense layer (and EinsumDense matrix
    product) as a 1x1 convolution.

    Raises `QuantizationConfigError` for a quantizer TFLite's int8 kernels cannot hold (see `int8_grid`).
    """
    pairs: list[tuple[keras.layers.Layer, keras.layers.Layer]] = []

    def clone_function(layer: keras.Operation) -> keras.Operation:
        if not isinstance(layer, keras.layers.Layer):
            return copy_layer(layer)  # a stateless keras.ops operation (`x + 3.0`): no weights to copy
        if isinstance(layer, KerasInferableActivationQuantizationHolder):
            quantizer = layer.activation_holder_quantizer
            new = _Int8Activation(int8_grid(quantizer, False, f"layer {layer.name!r}"),
                                  quantizer if _reads_model_input(layer) else None, name=layer.name)
        elif isinstance(layer, KerasInferableQuantizationWrapper):
            new = _int8_weights(layer.layer, layer.weights_quantizers, layer.name)
        elif isinstance(layer, KerasInferableMultiHeadAttention):
            new = _int8_attention(layer)
        else:
            new = copy_layer(layer)
        pairs.append((layer, new))
        return new

    graph = keras.models.clone_model(model, clone_function=clone_function)
    for old, new in pairs:
        if isinstance(old, KerasInferableQuantizationWrapper):
            _store_quantized_kernels(old.layer, old.weights_quantizers, new)
        elif isinstance(old, KerasInferableMultiHeadAttention):
            copy_attention_weights(old, new)
            for name, quantizer in old.weights_quantizers.items():
                projection = old.projection(name)
                _store_quantized_kernels(projection.layer, {"kernel": quantizer}, new.projection(name))
        elif not isinstance(old, KerasInferableActivationQuantizationHolder):
            new.set_weights(old.get_weights())
    return graph


def tflite_kernels(path: str | os.PathLike) -> list[tuple[str, str]]:
    """(operator, dtype of its first input) of each operator of a `.tflite` file, in the interpreter's order,
    without delegates (XNNPACK would replace them by DELEGATE nodes), e.g. [("QUANTIZE", "float32"),
    ("CONV_2D", "int8"), ...]."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated", category=UserWarning)
        interpreter = tf.lite.Interpreter(
            model_path=os.fspath(path),
            experimental_op_resolver_type=tf.lite.experimental.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        )
    tensors = {detail["index"]: detail for detail in interpreter.get_tensor_details()}
    kernels = []
    for op in interpreter._get_ops_details():  # the only API listing the operators of a loaded file
        first = next((i for i in op["inputs"] if i >= 0), None)
        dtype = np.dtype(tensors[first]["dtype"]).name if first is not None else ""
        kernels.append((op["op_name"], dtype))
    return kernels


def _check_inputs(model: keras.Model, representative_inputs: Any) -> list[np.ndarray]:
    given = list(representative_inputs) if isinstance(representative_inputs, (list, tuple)) else [representative_inputs]
    if len(given) != len(model.inputs):
        raise QuantizationConfigError(
            f"representative_inputs must hold one array per model input ({len(model.inputs)}), got {len(given)}"
        )
    arrays = []
    for value, spec in zip(given, model.inputs, strict=True):
        try:
            array = value if isinstance(value, np.ndarray) else keras.ops.convert_to_numpy(value)
        except (TypeError, ValueError) as exc:
            raise QuantizationConfigError(
                f"representative_inputs must be arrays or tensors, got {type(value).__name__}"
            ) from exc
        if array.dtype.kind not in "fiu" or array.ndim != len(spec.shape) or array.shape[0] == 0:
            raise QuantizationConfigError(
                f"representative_inputs must be non-empty numeric arrays shaped like the model input {spec.shape} "
                f"(batch first), got {array.dtype} of shape {array.shape}"
            )
        arrays.append(array.astype(np.float32))  # the inferable quantizers run on float32
    return arrays


def _interpreter() -> tuple[type, str]:
    """The TFLite interpreter class to check with, and its name and version."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        return tf.lite.Interpreter, f"tf.lite.Interpreter (TensorFlow {tf.__version__})"
    return Interpreter, f"ai-edge-litert {importlib.metadata.version('ai-edge-litert')}"


def tflite_interpreter(path: str | os.PathLike, num_threads: int | None = None) -> Any:
    """The interpreter `export_tflite` checks with (LiteRT's `ai-edge-litert` when installed, else
    `tf.lite.Interpreter`), with its default delegate, on the file at `path`."""
    interpreter_class, _ = _interpreter()
    with warnings.catch_warnings():
        # tf.lite.Interpreter announces its move to ai-edge-litert; it is the fallback when that is not installed.
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated", category=UserWarning)
        return interpreter_class(model_path=os.fspath(path), num_threads=num_threads)


def _run_tflite(path: str, model: keras.Model, inputs: list[np.ndarray]) -> tuple[list[np.ndarray], str]:
    _, runtime = _interpreter()
    runner = tflite_interpreter(path).get_signature_runner()
    names = list(runner.get_input_details())
    if len(names) == 1:
        feeds = {names[0]: inputs[0]}
    else:
        keras_names = [spec.name for spec in model.inputs]
        if sorted(keras_names) != sorted(names):
            raise ExportValidationError(f"the TFLite inputs {names} do not match the model's {keras_names}")
        feeds = dict(zip(keras_names, inputs, strict=True))
    results = runner(**feeds)
    # The serving signature names its outputs output_0, output_1, ... in the model's order.
    order = sorted(results, key=lambda name: int(re.sub(r"\D", "", name) or 0))
    return [results[name] for name in order], runtime


def _outputs(value: Any) -> list[np.ndarray]:
    return [keras.ops.convert_to_numpy(t) for t in keras.tree.flatten(value)]


def export_tflite(
    model: keras.Model,
    path: str | os.PathLike,
    representative_inputs: Any,
    atol: float | None = None,
    require_identical: float | None = None,
) -> ExportReport:
    """Convert a model made by `convert_to_inferable` to TFLite and check the file in the TFLite interpreter.

    The file is a full-integer model: int8 activations, int8 weights (per output channel) and int32 biases, so
    the interpreter runs int8 CONV_2D / DEPTHWISE_CONV_2D / ADD / CONCATENATION / MEAN kernels, and quantizers of
    2 to 8 bits are stored in int8 containers (see the module's note). The input is quantized by a QUANTIZE op
    and the output dequantized, so the file takes and gives float32 as the model does. The file is run on
    `representative_inputs` and compared with `model` before it replaces `path`; if anything fails, `path` is
    left as it was. `model` is not changed.

    The converted model computes its convolutions and dense layers between holders as the interpreter's int8
    kernels do (`integer.integer_forward`); additions, concatenations (layers, or `a + b` and `keras.ops.concatenate`
    between holders' outputs, which the converter writes as the same int8 ADD / CONCATENATION) and poolings stay
    float operations in Keras, and a separable convolution that a `skip` override keeps whole stays a float kernel
    in TFLite (`quantize_model` splits the others into int8 depthwise and 1x1 convolutions), so the outputs can
    differ by a step where a value falls near a rounding boundary: `report.identical` and `report.argmax_identical`
    say how much (benchmarks/fidelity.py --backend keras measures it).

    Args:
        model: a converted Keras model (its quantizers are mct-quantizers Keras inferable quantizers).
        path: where to write the `.tflite` file.
        representative_inputs: an array (or one per model input) to check the file with, batch first.
        atol: if given, the largest absolute difference from the model's outputs that the check accepts.
        require_identical: if given, the smallest fraction of output values the interpreter must reproduce bit
            for bit (e.g. 1.0 or 0.999).

    Returns:
        An `ExportReport` (path-like: it stands for the path written) with the largest absolute difference
        between the interpreter's outputs and the model's, the fraction of identical output values and of rows
        with the same argmax.

    Raises:
        QuantizationConfigError: bad arguments, or a quantizer TFLite's int8 kernels cannot hold (more than 8
            bits, a lookup table, 8-bit uniform weights).
        ExportValidationError: the conversion failed, the interpreter could not run the file, the outputs
            differ by more than `atol` or fewer than `require_identical` of them are identical.
    """
    if not isinstance(model, keras.Model):
        raise QuantizationConfigError(f"model must be a Keras 3 model, got {type(model).__name__}")
    if not _quantizers(model):
        raise QuantizationConfigError(
            "model holds no mct-quantizers inferable quantizer; pass the model returned by convert_to_inferable"
        )
    inputs = _check_inputs(model, representative_inputs)
    if atol is not None and (isinstance(atol, bool) or not isinstance(atol, (int, float)) or not atol >= 0):
        raise QuantizationConfigError(f"atol must be None or a number >= 0, got {atol!r}")
    require_identical = check_require_identical(require_identical)
    target = check_output_path(path)
    graph = tflite_graph(model)
    expected = _outputs(model(inputs if len(inputs) > 1 else inputs[0], training=False))
    with tempfile.TemporaryDirectory() as saved_model:
        try:
            graph.export(saved_model, format="tf_saved_model", verbose=False)
            converter = tf.lite.TFLiteConverter.from_saved_model(saved_model)
            # With the fake-quant ops in the graph, DEFAULT makes the full-integer model they describe.
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            content = converter.convert()
        except Exception as exc:
            raise ExportValidationError(f"TFLiteConverter could not convert the model: {exc}") from exc
    with atomic_output(target) as temporary:
        with open(temporary, "wb") as file:
            file.write(content)
        try:
            outputs, runtime = _run_tflite(temporary, model, inputs)
        except ExportValidationError:
            raise
        except Exception as exc:
            raise ExportValidationError(f"the TFLite interpreter could not run the exported file: {exc}") from exc
        difference, identical, argmax_identical = check_agreement(expected, outputs, atol, require_identical)
    return ExportReport(path=os.fspath(path), format="tflite", max_abs_diff=difference, runtime=runtime,
                        identical=identical, argmax_identical=argmax_identical)
