"""The per-layer quantization report of a Keras QAT model, and the coverage of its multiply-accumulates."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

# The class of Functional models, and the operation `keras.ops.einsum` records in one.
from keras.src.models.functional import Functional
from keras.src.ops.numpy import Einsum

from trainable_infra.common.einsum import einsum_macs, einsum_output_shape, matmul_macs
from trainable_infra.common.errors import QuantizationConfigError
from trainable_infra.common.report import Coverage, MacRow, format_report, report_row, sqnr_db
from trainable_infra.keras_backend.attention import PROJECTIONS, QuantizedAttentionBase
from trainable_infra.keras_backend.calibrate import (
    all_layers,
    batches_of,
    check_data,
    check_model,
    holders_of,
    model_inputs,
    observed,
    run_batches,
)
from trainable_infra.keras_backend.inferable_wrappers import KerasInferableActivationQuantizationHolder
from trainable_infra.keras_backend.quantize import grid_source, input_name, model_graph, product_inputs
from trainable_infra.keras_backend.training import quantizers_of
from trainable_infra.keras_backend.wrappers import (
    KerasActivationQuantizationHolder,
    KerasTrainableQuantizationWrapper,
    WeightsWrapperBase,
)


def _params(quantizer: Any, tensor: str) -> dict[str, np.ndarray]:
    # Registered as "<tensor>_threshold" and the like: the report names the parameter only.
    return {
        name.removeprefix(f"{tensor}_"): np.asarray(tf.convert_to_tensor(entry.variable))
        for name, entry in quantizer.registered_variables().items()
    }


def _describe(quantizer: Any) -> tuple[int, Any, Any]:
    config = quantizer.quantization_config
    if hasattr(config, "weights_n_bits"):
        return config.weights_n_bits, config.weights_quantization_method, quantizer.identifier
    return config.activation_n_bits, config.activation_quantization_method, quantizer.identifier


def quantization_report(
    model: keras.Model, data: Any = None, num_batches: int = 1, *, print_table: bool = True
) -> list[dict]:
    """Rows (layer, kind, bits, method, training, parameters, sqnr_db) for every quantizer of a QAT model.

    Weight SQNR compares each kernel with its fake-quantized value; activation SQNR compares what reaches each
    holder with what leaves it, over `num_batches` batches of `data` (as `calibrate` takes it; None when no data
    is given). The table is printed unless `print_table` is False.
    """
    if not quantizers_of(model):
        raise QuantizationConfigError("model has no trainable quantizers; make it with quantize_model first")
    rows = []
    for layer in all_layers(model):
        if isinstance(layer, KerasTrainableQuantizationWrapper):
            for attribute, quantizer in layer.weights_quantizers.items():
                if not quantizer.weights_quantization():
                    continue
                kernel = tf.convert_to_tensor(getattr(layer.layer, attribute))
                quantized = quantizer.quantize_inputs(kernel, False)
                bits, method, training = _describe(quantizer)
                rows.append(report_row(
                    f"{layer.name}.{attribute}", "weights", bits, method, training, _params(quantizer, attribute),
                    sqnr_db(kernel.numpy(), keras.ops.convert_to_numpy(quantized)),
                ))
    holders = holders_of(model)
    signal = dict.fromkeys(holders, 0.0)
    noise = dict.fromkeys(holders, 0.0)
    if data is not None and holders:

        def measure(name: str, holder: Any) -> Any:
            def quantize(inputs: Any) -> Any:
                outputs = holder.activation_holder_quantizer.quantize_inputs(inputs, False)
                reference = keras.ops.convert_to_numpy(keras.ops.cast(inputs, "float32")).astype(np.float64)
                error = reference - keras.ops.convert_to_numpy(keras.ops.cast(outputs, "float32"))
                signal[name] += float(np.sum(reference**2))
                noise[name] += float(np.sum(error**2))
                return outputs
            return quantize

        with observed(holders, {name: measure(name, holder) for name, holder in holders.items()}):
            run_batches(model, data, num_batches, False, "report")
    for name, holder in holders.items():
        quantizer = holder.activation_holder_quantizer
        bits, method, training = _describe(quantizer)
        sqnr = None
        if data is not None:
            sqnr = float("inf") if noise[name] == 0 else 10 * np.log10(max(signal[name], 1e-300) / noise[name])
        rows.append(report_row(name, "activation", bits, method, training, _params(quantizer, "activation"), sqnr))
    if print_table:
        print(format_report(rows))
        if data is not None:
            print(quantization_coverage(model, data).format())
    return rows


# --- coverage ---------------------------------------------------------------------------------------------------

_CONVOLUTIONS = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
_DEPTHWISE = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)
_SEPARABLE = (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)
_TRANSPOSED = (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose, keras.layers.Conv3DTranspose)


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in keras.ops.shape(x))


def _size(shape: Any) -> int:
    return int(np.prod(shape, dtype=np.int64))


def _is_holder(layer: Any) -> bool:
    """Whether `layer` quantizes what flows through it (a trainable holder that is enabled, or an inferable one)."""
    if isinstance(layer, KerasActivationQuantizationHolder):
        return layer._enabled
    return isinstance(layer, KerasInferableActivationQuantizationHolder)


def _weights_quantized(wrapper: Any, attribute: str) -> bool:
    quantizer = wrapper.weights_quantizers.get(attribute) if isinstance(wrapper, WeightsWrapperBase) else None
    if quantizer is None:
        return False
    enabled = getattr(quantizer, "weights_quantization", None)
    return bool(enabled()) if callable(enabled) else True  # an inferable quantizer always quantizes


def layer_macs(layer: keras.layers.Layer, input_shape: tuple, output_shape: tuple) -> list[tuple[str, int, str]]:
    """(op, multiply-accumulates, kernel attribute) of each product of a layer with weights, from the shapes of one
    call; [] for a layer that multiplies no weights. A separable convolution makes two (depthwise, pointwise)."""
    name = type(layer).__name__
    if isinstance(layer, _SEPARABLE):
        positions = _size(output_shape) // layer.filters
        pointwise = _size(output_shape) * int(layer.pointwise_kernel.shape[-2])
        return [(f"{name} (depthwise)", positions * _size(layer.depthwise_kernel.shape), "depthwise_kernel"),
                (f"{name} (pointwise)", pointwise, "pointwise_kernel")]
    if not isinstance(layer, (*_CONVOLUTIONS, *_DEPTHWISE, *_TRANSPOSED, keras.layers.Dense, keras.layers.EinsumDense)):
        return []
    kernel = tuple(layer.kernel.shape)
    if isinstance(layer, _DEPTHWISE):
        macs = _size(output_shape) * _size(kernel[:-2])  # (*window, in, multiplier): one window per output value
    elif isinstance(layer, _TRANSPOSED):
        macs = _size(input_shape) * _size(kernel[:-1])  # (*window, out, in): each input value meets window x out
    elif isinstance(layer, _CONVOLUTIONS):
        macs = _size(output_shape) * _size(kernel[:-1])  # (*window, in / groups, out)
    elif isinstance(layer, keras.layers.Dense):
        macs = _size(output_shape) * kernel[0]
    else:
        macs = einsum_macs(layer.equation, input_shape, kernel)
    return [(name, macs, "kernel")]


def _product_macs(operation: Any, shapes: list[tuple], output_shape: tuple) -> int:
    """Multiply-accumulates of a product of two activations (`quantize.product_inputs`)."""
    if isinstance(operation, keras.layers.Dot):
        axes = operation.axes if isinstance(operation.axes, (list, tuple)) else (operation.axes, operation.axes)
        return _size(output_shape) * shapes[0][axes[0]]
    if isinstance(operation, Einsum):
        return einsum_macs(operation.subscripts, *shapes)
    return matmul_macs(shapes[0], output_shape)


class _CoverageWalk:
    """Runs one batch through a model call by call (inference mode) and records each multiply-accumulate."""

    def __init__(self) -> None:
        self.rows: list[MacRow] = []
        self.float_layers: dict[str, None] = {}  # an ordered set

    def run(self, model: keras.Model, inputs: list[Any], quantized: list[bool]) -> list[Any]:
        """Run `model` on `inputs` (whether each is on a holder's grid: `quantized`); returns its outputs."""
        graph = model_graph(model)
        producers = {key: call for call in graph.calls for key in call.outputs}
        tensors: dict[Any, Any] = {}
        held: dict[Any, bool] = {}  # model input key -> it is on a holder's grid (a nested model's input can be)
        for (key, spec), value, flag in zip(graph.inputs, inputs, quantized, strict=True):
            tensors[key] = keras.ops.convert_to_tensor(value, dtype=spec.dtype)
            held[key] = flag

        def on_grid(key: Any) -> bool:
            source = grid_source(key, producers)
            return held.get(source, False) or (source in producers and _is_holder(producers[source].layer))

        for call in graph.calls:
            layer = call.layer
            if isinstance(layer, keras.Model):
                outputs = self.run(layer, [tensors[k] for k in call.inputs], [on_grid(k) for k in call.inputs])
            else:
                outputs = keras.tree.flatten(call.replay(layer, tensors))
            for key, value in zip(call.outputs, outputs, strict=True):
                tensors[key] = value
            if not isinstance(layer, keras.Model):
                self._record(call, tensors, on_grid)
        if isinstance(model, keras.Sequential):
            return [tensors[len(graph.calls)]]
        return [tensors[id(t)] for t in model.outputs]

    def _record(self, call: Any, tensors: dict, on_grid: Callable[[Any], bool]) -> None:
        layer = call.layer
        if isinstance(layer, (KerasActivationQuantizationHolder, KerasInferableActivationQuantizationHolder)):
            return
        if isinstance(layer, keras.layers.MultiHeadAttention):
            self._attention(call, tensors, on_grid)
            return
        products = product_inputs(call)
        if products is not None:
            shapes = [_shape(tensors[k]) for k in products]
            macs = _product_macs(layer, shapes, _shape(tensors[call.outputs[0]]))
            self.rows.append(MacRow(layer.name, type(layer).__name__, macs, None, all(on_grid(k) for k in products)))
            return
        if not isinstance(layer, keras.layers.Layer) or not layer.weights:
            return  # a stateless operation, or a layer without weights
        inner = layer.layer if isinstance(layer, WeightsWrapperBase) else layer
        found = []
        if len(call.inputs) == 1 and len(call.outputs) == 1:
            key = call.inputs[0]
            found = layer_macs(inner, _shape(tensors[key]), _shape(tensors[call.outputs[0]]))
            for index, (op, macs, attribute) in enumerate(found):
                # A separable convolution's pointwise product reads the depthwise one's output, on no grid.
                self.rows.append(MacRow(layer.name, op, macs, _weights_quantized(layer, attribute),
                                        on_grid(key) and index == 0))
        if not any(_weights_quantized(layer, attribute) for _, _, attribute in found):
            self.float_layers[layer.name] = None

    def _attention(self, call: Any, tensors: dict, on_grid: Callable[[Any], bool]) -> None:
        """The products of an attention call: its projections (query, key, value, output, and a gate if it has
        one), the scores and the context."""
        layer = call.layer
        keys = {name: id(call.arguments[name]) for name in ("query", "value", "key")
                if isinstance(call.arguments.get(name), keras.KerasTensor)}
        keys.setdefault("key", keys["value"])
        quantized = isinstance(layer, QuantizedAttentionBase)
        points = layer.activation_holders() if quantized else {}
        if not quantized:
            self.float_layers[layer.name] = None

        def project(name: str, shape: tuple, input_quantized: bool) -> tuple:
            sub = getattr(layer, PROJECTIONS[name])
            dense = sub.layer if isinstance(sub, WeightsWrapperBase) else sub
            kernel = tuple(dense.kernel.shape)
            weights_quantized = _weights_quantized(sub, "kernel")
            self.rows.append(MacRow(f"{layer.name}.{name}", "EinsumDense", einsum_macs(dense.equation, shape, kernel),
                                    weights_quantized, input_quantized))
            if quantized and not weights_quantized:
                self.float_layers[f"{layer.name}.{name}"] = None
            return einsum_output_shape(dense.equation, shape, kernel)

        def held(*names: str) -> bool:
            return all(point in points and _is_holder(points[point]) for point in names)

        shapes = {name: _shape(tensors[key]) for name, key in keys.items()}
        if layer._use_gate:
            project("gate", shapes["query"], on_grid(keys["query"]))
        q = project("query", shapes["query"], on_grid(keys["query"]))
        k = project("key", shapes["key"], on_grid(keys["key"]))
        v = project("value", shapes["value"], on_grid(keys["value"]))
        scores = einsum_output_shape(layer._dot_product_equation, k, q)
        self.rows.append(MacRow(f"{layer.name}.scores", "einsum", einsum_macs(layer._dot_product_equation, k, q),
                                None, held("query", "key")))
        context = einsum_output_shape(layer._combine_equation, scores, v)
        self.rows.append(MacRow(f"{layer.name}.context", "einsum", einsum_macs(layer._combine_equation, scores, v),
                                None, held("probabilities", "value")))
        project("attention_output", context, held("context"))


def _batch_inputs(model: keras.Model, data: Any) -> list[Any]:
    """The model inputs of the first batch of `data`, one per model input."""
    batch = next(iter(batches_of(data)), None)
    if batch is None:
        raise QuantizationConfigError("data is empty: quantization_coverage needs one batch")
    inputs = model_inputs(batch)
    if isinstance(inputs, dict):
        names = [input_name(t) for t in model.inputs]
        missing = [n for n in names if n not in inputs]
        if missing:
            raise QuantizationConfigError(f"data batches are dicts without the model inputs {missing}")
        return [inputs[n] for n in names]
    inputs = keras.tree.flatten(inputs)
    if len(inputs) != len(model.inputs):
        raise QuantizationConfigError(
            f"a batch of data holds {len(inputs)} input array(s), model {model.name!r} takes {len(model.inputs)}"
        )
    return inputs


def quantization_coverage(model: keras.Model, data: Any) -> Coverage:
    """How much of a model's arithmetic runs on quantized operands, measured on one batch of `data`.

    One `MacRow` per multiply-accumulate operation the batch runs through: convolutions (two for a separable one),
    dense and einsum-dense layers, each attention layer's projections and its two products, and products of two
    activations (`Dot` layers, `keras.ops.matmul` / `@`, `keras.ops.einsum`), with its multiply-accumulates from the
    actual shapes. A row's weights are quantized where a weight quantizer quantizes its kernel (None for a product
    of two activations), its inputs where each comes from an activation quantizer, directly or through layers that
    keep the values (`VALUE_PRESERVING_LAYERS`: Reshape, Flatten, MaxPooling, ...). `float_layers` names every layer
    that holds weights and runs without a weight quantizer (normalizations, embeddings, skipped layers). Works on QAT
    models and on converted ones.

    Args:
        model: a Sequential or Functional Keras model (nested models are walked too).
        data: an array of samples or batches, as `calibrate` takes them; the first batch is used.

    Returns:
        The `Coverage`; `print(coverage.format())` summarises it.
    """
    check_model(model)
    check_data("data", data)
    if not isinstance(model, (keras.Sequential, Functional)) or not model.inputs:
        raise QuantizationConfigError(
            f"quantization_coverage walks the layer graph of a built Sequential or Functional model; {model.name!r} "
            f"is a {type(model).__name__}"
        )
    inputs = _batch_inputs(model, data)
    walk = _CoverageWalk()
    walk.run(model, inputs, [False] * len(inputs))
    return Coverage(tuple(walk.rows), tuple(walk.float_layers))
