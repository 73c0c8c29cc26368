"""`quantize_model`: a QAT-ready copy of a float Keras 3 model (Sequential or Functional).

Kernels of convolutions (plain, depthwise, separable, transposed), dense and einsum-dense layers are wrapped;
activation holders go on the model inputs, after each quantized layer's activation (its own `activation=`, or
through BatchNormalization and a following activation layer), and after merges: `Add` and `Concatenate` layers and
their `keras.ops` forms on two or more tensors (`a + b`, `keras.ops.add`, `keras.ops.concatenate`; `x + 3.0` adds a
constant and is no merge). A `MultiHeadAttention` becomes a `KerasQuantizedMultiHeadAttention` (attention.py): its
projections are wrapped and, with `QATConfig.quantize_matmul_inputs`, both inputs of its two activation products
are quantized, as are both inputs of each product of two activations in the graph (`Dot` layers,
`keras.ops.matmul` / `@`, `keras.ops.einsum` of two tensors). The layer graph is rebuilt with copies of the layers
and of the `keras.ops` operations: names and weights are kept, the input model is not touched.

A SeparableConv1D/2D becomes a depthwise convolution `<name>_depthwise` (its depthwise kernel, strides, padding,
dilation and multiplier), a holder on its output, and a 1x1 convolution `<name>_pointwise` (its pointwise kernel,
bias and activation), as TFLite's converter splits it: integer runtimes have no separable kernel, and the
intermediate activation would otherwise stay float. The parts are quantized as any depthwise and 1x1 convolution
(a BatchNormalization after the separable convolution folds into the pointwise part); overrides on the separable
convolution's name apply to both parts, and a `skip` override keeps it whole and float.

A Sequential or Functional model nested in the model (as keras.applications' ConvNeXt builds its stem and
downsampling blocks) is inlined: its layers become layers of the rebuilt model, under their own names, and are
quantized as the outer model's are; overrides match their names. A nested model stays one float layer, with a
warning, where it is subclassed, called more than once, called with `training=` or `mask=`, has a layer named like a
different layer of the outer model, or branches inside an outer Sequential model (`inline_nested_models`); a `skip`
override matching its name keeps it float too.

With `QATConfig.fold_batch_norm` (the default) a BatchNormalization that only reads the output of a quantized layer
is folded into that layer's kernel and bias from its moving statistics and left out of the rebuilt graph, as
integer runtimes do; the weight quantizer starts from the folded kernel. With `QATConfig.integer_bias` (the
default) every wrapped layer reads a quantized input (a holder goes after an average pooling that feeds a Dense
layer, for example; Flatten, Reshape, MaxPooling and ZeroPadding keep a holder's grid), rounds its bias on the grid
Δ_in·Δ_w, as the runtimes store it (`KerasTrainableQuantizationWrapper(input_holder=...)`), and, with a holder on
its output too, computes in inference as TFLite's int8 kernel does (`output_holder=...`, `integer.py`).

A holder's signedness follows the architecture, not the data (unsigned after relu, relu6, sigmoid and
hard_sigmoid and after a merge whose inputs are all outputs of unsigned holders, signed elsewhere), so a model
rebuilt by `quantize_model` from the same float model and config always takes the weights of a trained one;
representative data sets the thresholds and ranges.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any

import keras
import numpy as np

# The class of Functional models; keras.models.clone_model tests for it the same way.
from keras.src.models.functional import Functional
from keras.src.ops.numpy import Add as AddOperation
from keras.src.ops.numpy import Concatenate as ConcatenateOperation

# The operations `keras.ops.matmul` (and `@`) and `keras.ops.einsum` record in a Functional graph.
from keras.src.ops.numpy import Einsum, Matmul

from trainable_infra.common.calibration import (
    default_activation_params,
    weight_quant_params,
)
from trainable_infra.common.config import (
    TrainableQuantizerActivationConfig,
    TrainableQuantizerWeightsConfig,
    check_bool,
)
from trainable_infra.common.einsum import kernel_channel_axis, parse_equation
from trainable_infra.common.errors import QuantizationConfigError
from trainable_infra.common.integer import fold_batch_norm
from trainable_infra.common.mct import QuantizationTarget
from trainable_infra.common.model_plan import (
    check_overrides,
    check_qat_arguments,
    holder_name,
    naming_layer,
    warn_no_representative_data,
)
from trainable_infra.common.qat_config import LayerSettings, QATConfig
from trainable_infra.common.resolver import get_trainable_quantizer_class
from trainable_infra.keras_backend.attention import (
    ACTIVATION_POINTS,
    PROJECTIONS,
    KerasQuantizedMultiHeadAttention,
    copy_attention_weights,
    float_attention_config,
)
from trainable_infra.keras_backend.base_quantizer import BaseKerasTrainableQuantizer
from trainable_infra.keras_backend.calibrate import all_layers, calibrate, check_data, check_model
from trainable_infra.keras_backend.wrappers import (
    VALUE_PRESERVING_LAYERS,
    KerasActivationQuantizationHolder,
    KerasTrainableQuantizationWrapper,
)

# Layer class name -> (class, {kernel attribute: its output-channel axis}). Depthwise kernels are
# (*window, in_channels, depth_multiplier): their thresholds are per input channel (axis -2), shared by the
# `depth_multiplier` outputs of that channel, which is per output channel for the usual multiplier of 1.
# Transposed convolutions keep their kernel as (*window, out_channels, in_channels). An EinsumDense kernel's axis
# follows from its equation (`quantized_kernels`); the -1 here is only its usual value.
QUANTIZABLE_LAYERS: dict[str, tuple[type[keras.layers.Layer], dict[str, int]]] = {
    "Conv1D": (keras.layers.Conv1D, {"kernel": -1}),
    "Conv2D": (keras.layers.Conv2D, {"kernel": -1}),
    "Conv3D": (keras.layers.Conv3D, {"kernel": -1}),
    "Conv1DTranspose": (keras.layers.Conv1DTranspose, {"kernel": -2}),
    "Conv2DTranspose": (keras.layers.Conv2DTranspose, {"kernel": -2}),
    "Conv3DTranspose": (keras.layers.Conv3DTranspose, {"kernel": -2}),
    "DepthwiseConv1D": (keras.layers.DepthwiseConv1D, {"kernel": -2}),
    "DepthwiseConv2D": (keras.layers.DepthwiseConv2D, {"kernel": -2}),
    "SeparableConv1D": (keras.layers.SeparableConv1D, {"depthwise_kernel": -2, "pointwise_kernel": -1}),
    "SeparableConv2D": (keras.layers.SeparableConv2D, {"depthwise_kernel": -2, "pointwise_kernel": -1}),
    "Dense": (keras.layers.Dense, {"kernel": -1}),
    "EinsumDense": (keras.layers.EinsumDense, {"kernel": -1}),
}
# Attention layers `quantize_model` replaces by quantized ones (only this exact class: a subclass may compute
# attention its own way, which the quantized layer would drop).
ATTENTION_LAYERS: dict[str, type[keras.layers.Layer]] = {"MultiHeadAttention": keras.layers.MultiHeadAttention}
# Activations whose output is never negative: the holder after them is unsigned.
NON_NEGATIVE_ACTIVATIONS = frozenset({"relu", "relu6", "sigmoid", "hard_sigmoid", "softmax"})
_ACTIVATION_LAYERS = (
    keras.layers.Activation, keras.layers.ReLU, keras.layers.LeakyReLU, keras.layers.ELU, keras.layers.PReLU,
    keras.layers.Softmax,
)
# Layers whose outputs are quantized (they are where residual branches and concatenations meet), and the operations
# that `a + b`, `keras.ops.add` and `keras.ops.concatenate` record on symbolic tensors (merges where they read two or
# more tensors). The operation classes are not exported by Keras; a Functional model's graph holds them as nodes.
_MERGE_LAYERS = (keras.layers.Add, keras.layers.Concatenate)
_MERGE_OPERATIONS = (AddOperation, ConcatenateOperation)
# Averages keep the sign of their input: a holder after one of an unsigned grid is unsigned.
_AVERAGING_LAYERS = (
    keras.layers.AveragePooling1D, keras.layers.AveragePooling2D, keras.layers.AveragePooling3D,
    keras.layers.GlobalAveragePooling1D, keras.layers.GlobalAveragePooling2D, keras.layers.GlobalAveragePooling3D,
)


def _check_arguments(
    model: Any, qat_config: Any, representative_data: Any, num_calibration_batches: Any, progress: Any
) -> QATConfig:
    check_model(model)
    if representative_data is not None:
        check_data("representative_data", representative_data)
    check_bool("progress", progress)
    if not isinstance(model, (keras.Sequential, Functional)):
        raise QuantizationConfigError(
            f"quantize_model rebuilds the layer graph of Sequential and Functional models; {model.name!r} is a "
            f"subclassed model ({type(model).__name__}), whose graph Keras does not record. Build it as a "
            "Functional model (keras.Model(inputs, outputs)) or a Sequential one, or wrap its layers by hand with "
            "KerasTrainableQuantizationWrapper and KerasActivationQuantizationHolder"
        )
    if not model.built or not model.inputs:
        raise QuantizationConfigError(
            f"model {model.name!r} is not built: give the Sequential model a keras.Input (or call build) so that "
            "its weights exist"
        )
    return check_qat_arguments(qat_config, num_calibration_batches, [*QUANTIZABLE_LAYERS, *ATTENTION_LAYERS], "Keras")


def quantized_kernels(layer: keras.layers.Layer, config: QATConfig) -> dict[str, int | None] | None:
    """{kernel attribute: output-channel axis (None: none, per tensor)} if `config` quantizes `layer`'s type,
    else None."""
    names = config.layer_types if config.layer_types is not None else tuple(QUANTIZABLE_LAYERS)
    for name in names:
        if name not in QUANTIZABLE_LAYERS:
            continue
        cls, kernels = QUANTIZABLE_LAYERS[name]
        if isinstance(layer, cls):
            if isinstance(layer, keras.layers.EinsumDense):
                return {"kernel": einsum_kernel_axis(layer)}
            return kernels
    return None


def einsum_kernel_axis(layer: keras.layers.EinsumDense) -> int | None:
    """The per-channel axis of an EinsumDense kernel, as a negative index: the last kernel axis its equation maps to
    an output axis (`common.einsum.kernel_channel_axis`); None where no kernel axis reaches the output."""
    axis = kernel_channel_axis(layer.equation)
    return None if axis is None else axis - len(parse_equation(layer.equation)[0][1])


def quantizes_attention(layer: Any, config: QATConfig) -> bool:
    """Whether `config` replaces `layer` by a `KerasQuantizedMultiHeadAttention`."""
    names = config.layer_types if config.layer_types is not None else tuple(ATTENTION_LAYERS)
    return any(type(layer) is ATTENTION_LAYERS[name] for name in names if name in ATTENTION_LAYERS)


def copy_layer(layer: keras.Operation) -> keras.Operation:
    """A new, unbuilt layer with `layer`'s configuration (weights are copied once it is built); for a stateless
    operation of a Functional model (a `keras.ops` call such as `x + 3.0`), a new operation of the same kind."""
    if isinstance(layer, keras.layers.Lambda):
        # Cloning, not loading: the function is already in this process (a model loaded in safe mode holds no
        # Python lambda), so rebuilding it runs no code from a file; safe mode would refuse any lambda.
        return keras.layers.Lambda.from_config(layer.get_config(), safe_mode=False)
    return layer.__class__.from_config(layer.get_config())


def make_wrapper(
    layer: keras.layers.Layer,
    kernels: dict[str, int],
    settings: LayerSettings,
    config: QATConfig,
    weights: Mapping[str, np.ndarray] | None = None,
) -> KerasTrainableQuantizationWrapper:
    """Wrap a copy of `layer` with the quantizers `settings` ask for, initialised from `layer`'s kernels.

    `weights` ({attribute: value}, e.g. a folded kernel and bias) replaces the layer's own values where given;
    a "bias" in it gives the copy a bias (`use_bias=True`).
    """
    weights = dict(weights or {})
    quantizers = {}
    for attribute, axis in kernels.items():
        kernel = weights[attribute] if attribute in weights else getattr(layer, attribute).numpy()
        quantizers[attribute] = make_weight_quantizer(kernel, axis, settings, config)
    copy = copy_layer(layer) if "bias" not in weights else _with_bias(layer)
    return KerasTrainableQuantizationWrapper(copy, quantizers, name=layer.name)


def make_weight_quantizer(
    kernel: np.ndarray, axis: int | None, settings: LayerSettings, config: QATConfig
) -> BaseKerasTrainableQuantizer:
    """The weights quantizer `settings` ask for, initialised from `kernel`, per channel along `axis` (None: per
    tensor) where the settings are per channel."""
    method = settings.weight_quantization_method
    cls = get_trainable_quantizer_class(
        QuantizationTarget.Weights, settings.weight_training_method, method, BaseKerasTrainableQuantizer
    )
    per_channel = settings.weight_per_channel and axis is not None
    channel_axis = axis % kernel.ndim if per_channel else None
    params = weight_quant_params(
        kernel, method, settings.weight_n_bits, channel_axis, config.weight_init, config.min_threshold
    )
    return cls(TrainableQuantizerWeightsConfig(
        method, settings.weight_n_bits, params, True, channel_axis, per_channel, config.min_threshold,
    ))


def make_attention(
    layer: keras.layers.MultiHeadAttention, settings: LayerSettings, config: QATConfig
) -> KerasQuantizedMultiHeadAttention:
    """A `KerasQuantizedMultiHeadAttention` with `layer`'s arguments, a weights quantizer for each projection
    (initialised from `layer`'s kernels) and activation quantizers at the points `config` asks for: the inputs of
    both products with `quantize_matmul_inputs`, the output projection's input with `integer_bias` (as every wrapped
    layer reads a quantized input then)."""
    weights = {}
    for name, attribute in PROJECTIONS.items():
        dense = getattr(layer, attribute, None)
        if dense is not None:
            weights[name] = make_weight_quantizer(dense.kernel.numpy(), einsum_kernel_axis(dense), settings, config)
    points = []
    if config.quantize_activations and config.quantize_matmul_inputs:
        points += ["query", "key", "probabilities", "value"]
    if config.quantize_activations and config.integer_bias and not layer._use_gate:
        points.append("context")
    activations = {}
    for point in points:
        params = default_activation_params(settings.activation_quantization_method, ACTIVATION_POINTS[point])
        activations[point] = _activation_quantizer(settings, config, params)
    return KerasQuantizedMultiHeadAttention(
        **float_attention_config(layer), weights_quantizers=weights, activation_quantizers=activations
    )


def _with_bias(layer: keras.layers.Layer) -> keras.layers.Layer:
    config = layer.get_config()
    config["use_bias"] = True
    return layer.__class__.from_config(config)


def make_holder(
    settings: LayerSettings, config: QATConfig, params: dict, name: str
) -> KerasActivationQuantizationHolder:
    """An activation holder called `name` with the quantizer `settings` ask for and the given parameters."""
    return KerasActivationQuantizationHolder(_activation_quantizer(settings, config, params), name=name)


def _activation_quantizer(settings: LayerSettings, config: QATConfig, params: dict) -> BaseKerasTrainableQuantizer:
    method = settings.activation_quantization_method
    quantizer_config = TrainableQuantizerActivationConfig(
        method, settings.activation_n_bits, params, True, config.min_threshold
    )
    cls = get_trainable_quantizer_class(
        QuantizationTarget.Activation, settings.activation_training_method, method, BaseKerasTrainableQuantizer
    )
    return cls(quantizer_config)


# --- the float graph ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Call:
    """One call of a layer in the float model: the keys of the tensors it reads and writes, and how to replay it."""

    layer: Any  # a Layer, or a stateless Operation (keras.ops applied to symbolic tensors)
    inputs: list[Hashable]
    outputs: list[Hashable]
    replay: Callable[[Any, Any], Any]  # (new layer, {key: new tensor}) -> outputs
    arguments: dict[str, Any] = dataclasses.field(default_factory=dict)  # call argument name -> what was passed
    # id(a tensor in `arguments`) -> its key, where that is not its id (a call inlined from a nested model)
    renamed: dict[int, Hashable] = dataclasses.field(default_factory=dict)

    def key(self, tensor: keras.KerasTensor) -> Hashable:
        """The key of a tensor this call was given (one of `arguments`)."""
        return self.renamed.get(id(tensor), id(tensor))


def input_name(tensor: keras.KerasTensor) -> str:
    """The name of the InputLayer that made a model input (KerasTensors of inputs have generic names)."""
    history = getattr(tensor, "_keras_history", None)
    return history.operation.name if history is not None else tensor.name


@dataclasses.dataclass
class _Graph:
    inputs: list[tuple[Hashable, keras.KerasTensor]]  # model inputs: (key, tensor)
    calls: list[_Call]  # in an order where every call comes after the calls that produce its inputs
    outputs: set[Hashable]  # keys of the model outputs
    dtypes: dict[Hashable, str] = dataclasses.field(default_factory=dict)  # tensor key -> dtype (Functional only)
    inlined: list[str] = dataclasses.field(default_factory=list)  # names of the nested models inlined into `calls`
    # name of a part of a split separable convolution -> the separable convolution's name (`split_separable_convs`)
    origins: dict[str, str] = dataclasses.field(default_factory=dict)

    def settings(self, config: QATConfig, name: str) -> LayerSettings:
        """The settings of the layer or holder base `name`: a part of a split separable convolution takes those of
        the separable convolution, so that overrides on its name apply to both parts."""
        return config.for_layer(self.origins.get(name, name))

    def consumers(self) -> dict[Hashable, list[_Call]]:
        found: dict[Hashable, list[_Call]] = {}
        for call in self.calls:
            for key in dict.fromkeys(call.inputs):
                found.setdefault(key, []).append(call)
        return found


def _functional_graph(model: Functional) -> _Graph:
    # Keras records the graph as nodes by depth (as its own clone_model and Functional.call walk it).
    calls = []
    dtypes = {}
    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in model._nodes_by_depth[depth]:
            if node.operation is None or node.is_input:
                continue
            calls.append(_Call(
                node.operation, [id(t) for t in node.input_tensors], [id(t) for t in node.outputs],
                lambda layer, tensors, node=node: _replay(layer, node, tensors), _bound_arguments(node),
            ))
            dtypes.update({id(t): t.dtype for t in [*node.input_tensors, *node.outputs]})
    return _Graph([(id(t), t) for t in model.inputs], calls, {id(t) for t in model.outputs}, dtypes)


def _bound_arguments(node: Any) -> dict[str, Any]:
    """{argument name: value} of a node's call, bound to the signature of the operation's `call`."""
    try:
        bound = inspect.signature(node.operation.call).bind(*node.arguments.args, **node.arguments.kwargs)
    except (TypeError, ValueError):
        return {}
    return dict(bound.arguments)


def _replay(layer: Any, node: Any, tensors: dict) -> Any:
    args, kwargs = node.arguments.fill_in(tensors)
    return layer(*args, **kwargs)


def model_graph(model: keras.Model) -> _Graph:
    """The calls of a Sequential or Functional model's layers and operations, in an order that computes them."""
    return _sequential_graph(model) if isinstance(model, keras.Sequential) else _functional_graph(model)


def _sequential_graph(model: keras.Sequential) -> _Graph:
    # Tensor k is the output of layer k - 1; tensor 0 is the input.
    calls = [
        _Call(layer, [k], [k + 1], lambda new, tensors, k=k: new(tensors[k])) for k, layer in enumerate(model.layers)
    ]
    return _Graph([(0, model.inputs[0])], calls, {len(calls)})


# --- nested models ----------------------------------------------------------------------------------------------


class _Renamed:
    """The rebuilt tensors ({key: tensor}) seen by the keys of an inlined model's own graph, which is what the
    replay of its calls looks them up by (a Functional node looks up the ids of its own input tensors)."""

    def __init__(self, tensors: Any, rename: Mapping[Hashable, Hashable]) -> None:
        self._tensors, self._rename = tensors, rename

    def __getitem__(self, key: Hashable) -> Any:
        return self._tensors[self._rename.get(key, key)]

    def get(self, key: Hashable, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default


def _output_keys(model: keras.Model) -> list[Hashable]:
    """The keys of `model_graph(model)`'s outputs, in the order of the model's flat outputs."""
    return [len(model.layers)] if isinstance(model, keras.Sequential) else [id(t) for t in model.outputs]


def _is_chain(calls: list[_Call], first: Hashable, last: Hashable) -> bool:
    """Whether `calls` compute `last` from `first` one after the other, each reading the previous one's output."""
    key = first
    for call in calls:
        if call.inputs != [key] or len(call.outputs) != 1:
            return False
        key = call.outputs[0]
    return key == last


def inline_nested_models(model: keras.Model, graph: _Graph, config: QATConfig, notes: list[str]) -> _Graph:
    """`graph` with each call of a nested Sequential or Functional model replaced by the calls of that model's own
    layers (recursively), so that they are quantized as the outer model's layers are and the rebuilt model holds
    them, under their own names, in place of the nested model.

    A nested model stays one call, in float, where it is subclassed (Keras records no graph of it), called more than
    once (its layers would then be shared by the calls), called with arguments besides its inputs (`training=False`
    would be lost), where one of its layers is named like a different layer of the outer model, where it passes an
    input through as an output, or where it branches inside an outer Sequential model; `notes` gets a line saying
    which and why. A `skip` override matching a nested model's name keeps it in float too, silently.
    """
    nested = [call for call in graph.calls if isinstance(call.layer, keras.Model)]
    if not nested:
        return graph
    calls_of = Counter(id(call.layer) for call in graph.calls)
    # Layer name -> ids of the layers (and model inputs) of that name: a rebuilt model needs unique layer names.
    owners: dict[str, set[int]] = {}
    for _, tensor in graph.inputs:
        owners.setdefault(input_name(tensor), set()).add(id(tensor))
    for call in graph.calls:
        owners.setdefault(call.layer.name, set()).add(id(call.layer))
    calls: list[_Call] = []
    dtypes = dict(graph.dtypes)
    inlined = list(graph.inlined)
    for call in graph.calls:
        inner = call.layer
        if not isinstance(inner, keras.Model) or config.for_layer(inner.name).skip:
            calls.append(call)
            continue
        extra = sorted(name for name, value in call.arguments.items() if name != "inputs" and value is not None)
        sub, reason = None, None
        if not isinstance(inner, (keras.Sequential, Functional)):
            reason = f"it is a subclassed model ({type(inner).__name__}), whose graph Keras does not record"
        elif calls_of[id(inner)] > 1:
            reason = f"it is called {calls_of[id(inner)]} times, and only a model called once is inlined"
        elif extra:
            reason = f"it is called with {', '.join(extra)}, which its inlined layers would not get"
        else:
            sub = inline_nested_models(inner, model_graph(inner), config, notes)
            reason = _inlining_problem(model, call, inner, sub, owners)
        if reason is not None:
            notes.append(
                f"{model.name!r} contains the model {inner.name!r}, which is kept in float: {reason}; call the inner "
                "model's layers directly in the outer model to quantize them"
            )
            calls.append(call)
            continue
        owners[inner.name].discard(id(inner))
        for inner_call in sub.calls:
            owners.setdefault(inner_call.layer.name, set()).add(id(inner_call.layer))
        calls.extend(_renamed_calls(call, inner, sub, dtypes))
        inlined += [inner.name, *sub.inlined]
    return _Graph(graph.inputs, calls, graph.outputs, dtypes, inlined)


def _inlining_problem(
    model: keras.Model, call: _Call, inner: keras.Model, sub: _Graph, owners: dict[str, set[int]]
) -> str | None:
    """Why the nested model `inner` (called by `call`, its graph `sub`) cannot be inlined into `model`, or None."""
    inputs = keras.tree.flatten(call.arguments["inputs"]) if "inputs" in call.arguments else None
    if inputs is not None and not all(isinstance(t, keras.KerasTensor) for t in inputs):
        return "it is called on values that are not tensors of the outer model"
    inner_inputs, inner_outputs = [key for key, _ in sub.inputs], _output_keys(inner)
    if (len(inputs if inputs is not None else call.inputs) != len(inner_inputs)
            or len(inner_outputs) != len(call.outputs)):
        return "its inputs or outputs do not match those of its call"
    if len(set(inner_outputs)) != len(inner_outputs) or set(inner_outputs) & set(inner_inputs):
        return "it gives one of its inputs, or one tensor twice, as outputs"
    if isinstance(model, keras.Sequential) and not _is_chain(sub.calls, inner_inputs[0], inner_outputs[0]):
        return "its layers do not form a chain, which the outer Sequential model would need"
    own = {inner_call.layer.name: id(inner_call.layer) for inner_call in sub.calls}
    clashes = sorted(name for name, layer in own.items() if owners.get(name, set()) - {id(inner), layer})
    if clashes:
        return f"its layers {clashes} are named like layers of {model.name!r}"
    return None


def _renamed_calls(call: _Call, inner: keras.Model, sub: _Graph, dtypes: dict[Hashable, str]) -> list[_Call]:
    """The calls of `sub` (the graph of `inner`, which `call` calls) on the keys of the outer graph: its inputs and
    outputs become those of `call`, its other tensors get keys of their own (a Sequential graph's are small ints,
    like the outer model's). Adds their dtypes to `dtypes`."""
    inputs = keras.tree.flatten(call.arguments["inputs"]) if "inputs" in call.arguments else None
    outer_inputs = [call.key(t) for t in inputs] if inputs is not None else call.inputs
    rename: dict[Hashable, Hashable] = {}
    for inner_call in sub.calls:
        rename.update((key, (id(inner), key)) for key in [*inner_call.inputs, *inner_call.outputs])
    rename.update(zip([key for key, _ in sub.inputs], outer_inputs, strict=True))
    rename.update(zip(_output_keys(inner), call.outputs, strict=True))
    dtypes.update((rename[key], dtype) for key, dtype in sub.dtypes.items() if key in rename)
    renamed = []
    for inner_call in sub.calls:
        given = keras.tree.flatten(list(inner_call.arguments.values()))
        tensors = [t for t in given if isinstance(t, keras.KerasTensor)]
        renamed.append(_Call(
            inner_call.layer, [rename[key] for key in inner_call.inputs], [rename[key] for key in inner_call.outputs],
            lambda layer, tensors, replay=inner_call.replay: replay(layer, _Renamed(tensors, rename)),
            inner_call.arguments,
            {id(t): rename.get(inner_call.key(t), inner_call.key(t)) for t in tensors},
        ))
    return renamed


# --- separable convolutions ------------------------------------------------------------------------------------

_SEPARABLE_PARTS: dict[type, tuple[type[keras.layers.Layer], type[keras.layers.Layer]]] = {
    keras.layers.SeparableConv1D: (keras.layers.DepthwiseConv1D, keras.layers.Conv1D),
    keras.layers.SeparableConv2D: (keras.layers.DepthwiseConv2D, keras.layers.Conv2D),
}


def separable_parts(layer: keras.layers.Layer) -> tuple[keras.layers.Layer, keras.layers.Layer]:
    """A built depthwise convolution `<name>_depthwise` (the depthwise kernel, strides, padding, dilation; no bias,
    no activation) and a built 1x1 convolution `<name>_pointwise` (the pointwise kernel, bias and activation) that
    compute what the separable convolution `layer` does, with copies of its weights; `layer` is not changed."""
    depthwise_class, pointwise_class = next(
        parts for cls, parts in _SEPARABLE_PARTS.items() if isinstance(layer, cls))
    config = layer.get_config()
    rank = len(layer.kernel_size)
    common = {"data_format": config["data_format"], "dtype": layer.dtype_policy, "trainable": layer.trainable}
    depthwise = depthwise_class(
        kernel_size=config["kernel_size"], strides=config["strides"], padding=config["padding"],
        depth_multiplier=config["depth_multiplier"], dilation_rate=config["dilation_rate"], use_bias=False,
        depthwise_initializer=config["depthwise_initializer"], depthwise_regularizer=config["depthwise_regularizer"],
        depthwise_constraint=config["depthwise_constraint"], name=f"{layer.name}_depthwise", **common,
    )
    pointwise = pointwise_class(
        filters=config["filters"], kernel_size=1, activation=config["activation"], use_bias=config["use_bias"],
        kernel_initializer=config["pointwise_initializer"], kernel_regularizer=config["pointwise_regularizer"],
        kernel_constraint=config["pointwise_constraint"], bias_initializer=config["bias_initializer"],
        bias_regularizer=config["bias_regularizer"], bias_constraint=config["bias_constraint"],
        activity_regularizer=config["activity_regularizer"], name=f"{layer.name}_pointwise", **common,
    )
    in_channels, multiplier = layer.depthwise_kernel.shape[-2:]
    for part, channels in ((depthwise, in_channels), (pointwise, in_channels * multiplier)):
        shape: list[int | None] = [None] * (rank + 2)
        shape[-1 if layer.data_format == "channels_last" else 1] = channels
        part.build(tuple(shape))
    depthwise.kernel.assign(layer.depthwise_kernel.numpy())
    pointwise.kernel.assign(layer.pointwise_kernel.numpy())
    if layer.use_bias:
        pointwise.bias.assign(layer.bias.numpy())
    return depthwise, pointwise


def split_separable_convs(model: keras.Model, graph: _Graph, config: QATConfig, notes: list[str]) -> _Graph:
    """`graph` with each call of a SeparableConv1D/2D that `config` quantizes replaced by a call of its depthwise
    part, whose output gets a holder, and a call of its 1x1 pointwise part (`separable_parts`): integer runtimes have
    no separable kernel (TFLite's converter splits it the same way, with an int8 tensor in between), and the parts
    are then quantized as any depthwise and 1x1 convolution, a following BatchNormalization folding into the
    pointwise part. A `skip` override on the separable convolution's name keeps it whole, in float; where a layer
    of the model is named like one of its parts it stays whole too and `notes` gets a line saying so."""
    names = {input_name(t) for _, t in graph.inputs} | {call.layer.name for call in graph.calls}
    parts: dict[int, tuple[keras.layers.Layer, keras.layers.Layer] | None] = {}  # None: kept whole
    calls: list[_Call] = []
    dtypes = dict(graph.dtypes)
    origins = dict(graph.origins)
    for index, call in enumerate(graph.calls):
        layer = call.layer
        if (not isinstance(layer, tuple(_SEPARABLE_PARTS)) or quantized_kernels(layer, config) is None
                or config.for_layer(layer.name).skip or len(call.outputs) != 1):
            calls.append(call)
            continue
        if id(layer) not in parts:
            clashes = sorted({f"{layer.name}_depthwise", f"{layer.name}_pointwise"} & names)
            if clashes:
                notes.append(
                    f"{model.name!r} has layers named {clashes}, the names the parts of the separable convolution "
                    f"{layer.name!r} would take: it is kept whole, with its intermediate activation in float"
                )
                parts[id(layer)] = None
            else:
                parts[id(layer)] = separable_parts(layer)
                names.update(f"{layer.name}_{part}" for part in ("depthwise", "pointwise"))
                origins.update((f"{layer.name}_{part}", layer.name) for part in ("depthwise", "pointwise"))
        split = parts[id(layer)]
        if split is None:
            calls.append(call)
            continue
        middle = ("separable", id(layer), index)
        if call.outputs[0] in dtypes:
            dtypes[middle] = dtypes[call.outputs[0]]
        calls.append(dataclasses.replace(call, layer=split[0], outputs=[middle]))
        calls.append(_Call(split[1], [middle], list(call.outputs),
                           lambda new, tensors, middle=middle: new(tensors[middle])))
    return dataclasses.replace(graph, calls=calls, dtypes=dtypes, origins=origins)


# --- where the holders go -----------------------------------------------------------------------------------


def _activation_name(layer: Any) -> str | None:
    """The name of the activation a layer applies to its output (`activation=` or an activation layer), if any."""
    if isinstance(layer, keras.layers.ReLU):
        non_negative = float(layer.negative_slope) == 0.0 and float(layer.threshold) >= 0.0
        return "relu" if non_negative else "leaky_relu"
    if isinstance(layer, keras.layers.Softmax):
        return "softmax"
    activation = getattr(layer, "activation", None)
    if activation is None:
        return type(layer).__name__.lower() if isinstance(layer, _ACTIVATION_LAYERS) else None
    name = getattr(activation, "__name__", type(activation).__name__)
    return None if name == "linear" else name


def _is_activation(layer: Any) -> bool:
    return isinstance(layer, _ACTIVATION_LAYERS)


def _chain_end(call: _Call, graph: _Graph, consumers: dict, through_batch_norm: bool) -> tuple[Hashable, Any]:
    """(tensor key, producing layer) at the end of `call` -> [BatchNormalization] -> [activation], following each
    step only where it is the sole reader of the last tensor."""
    key, layer = call.outputs[0], call.layer
    if _activation_name(layer) is not None:
        return key, layer  # the layer's own activation ends the chain
    while key not in graph.outputs and len(consumers.get(key, [])) == 1:
        (user,) = consumers[key]
        if through_batch_norm and isinstance(user.layer, keras.layers.BatchNormalization):
            key, layer, through_batch_norm = user.outputs[0], user.layer, False
        elif _is_activation(user.layer):
            return user.outputs[0], user.layer
        else:
            break
    return key, layer


# --- BatchNorm folding ----------------------------------------------------------------------------------------


def _batch_norm_to_fold(call: _Call, graph: _Graph, consumers: dict, calls_of: Counter) -> Any:
    """The BatchNormalization that `call`'s layer can absorb, or None.

    It must read the layer's output alone (the layer has no activation of its own, the output is no model output
    and has no other reader), normalise the last (channel) axis, and both layers must be called once.
    """
    layer = call.layer
    if _activation_name(layer) is not None or len(call.outputs) != 1 or calls_of[id(layer)] != 1:
        return None
    if isinstance(layer, keras.layers.EinsumDense):
        return None  # its output channels need not be the kernel's channel axis: it keeps its BatchNormalization
    key = call.outputs[0]
    readers = consumers.get(key, [])
    if key in graph.outputs or len(readers) != 1:
        return None
    (user,) = readers
    bn = user.layer
    if not isinstance(bn, keras.layers.BatchNormalization) or calls_of[id(bn)] != 1 or user.inputs != [key]:
        return None
    rank = getattr(bn.input_spec, "ndim", None)
    last_axis = bn.axis == -1 or (rank is not None and bn.axis % rank == rank - 1)
    return bn if last_axis else None


def folded_weights(layer: keras.layers.Layer, bn: keras.layers.BatchNormalization) -> dict[str, np.ndarray]:
    """{attribute: float32 value} of `layer` with the BatchNormalization `bn` that follows it folded in
    (`common.integer.fold_batch_norm` on the moving statistics): its output kernel and a bias."""
    statistics = {
        "mean": bn.moving_mean.numpy(),
        "variance": bn.moving_variance.numpy(),
        "epsilon": bn.epsilon,
        "gamma": bn.gamma.numpy() if bn.scale else None,
        "beta": bn.beta.numpy() if bn.center else None,
    }
    bias = layer.bias.numpy() if getattr(layer, "use_bias", False) else None
    if isinstance(layer, (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)):
        # The pointwise convolution makes the output channels; the depthwise kernel is unchanged.
        kernel, bias = fold_batch_norm(layer.pointwise_kernel.numpy(), bias, channel_axis=-1, **statistics)
        return {"depthwise_kernel": layer.depthwise_kernel.numpy(), "pointwise_kernel": kernel, "bias": bias}
    kernel = layer.kernel.numpy()
    if isinstance(layer, (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)):
        # (*window, in, multiplier): output channel c = in_index * multiplier + m, the C order of the last two axes.
        flat, bias = fold_batch_norm(kernel.reshape(*kernel.shape[:-2], -1), bias, channel_axis=-1, **statistics)
        return {"kernel": flat.reshape(kernel.shape), "bias": bias}
    _, kernels = next(entry for entry in QUANTIZABLE_LAYERS.values() if isinstance(layer, entry[0]))
    kernel, bias = fold_batch_norm(kernel, bias, channel_axis=kernels["kernel"], **statistics)
    return {"kernel": kernel, "bias": bias}


@dataclasses.dataclass
class _Plan:
    wrappers: dict[int, KerasTrainableQuantizationWrapper]  # id(float layer) -> its wrapper
    holders: dict[Hashable, KerasActivationQuantizationHolder]  # tensor key -> the holder applied to it
    # id(float layer) -> the weights its copy gets instead of its own (a BatchNormalization folded in)
    weights: dict[int, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)
    # BatchNormalization name -> the name of the layer it is folded into (the BatchNormalization is left out)
    folded: dict[str, str] = dataclasses.field(default_factory=dict)
    removed: set[int] = dataclasses.field(default_factory=set)  # id(float layer) of the folded BatchNormalizations
    # id(float layer) -> the name of the holder whose grid its bias is rounded on (QATConfig.integer_bias)
    input_holders: dict[int, str] = dataclasses.field(default_factory=dict)
    # id(float layer) -> the name of the holder that quantizes its output (directly, after a folded BatchNormalization
    # or a ReLU): with an input holder, the layer computes in inference as TFLite's int8 kernel does
    output_holders: dict[int, str] = dataclasses.field(default_factory=dict)
    signed: dict[Hashable, bool] = dataclasses.field(default_factory=dict)  # tensor key -> its holder is signed
    # names of the holders put on the inputs of quantized layers (QATConfig.integer_bias) and of products of two
    # activations (QATConfig.quantize_matmul_inputs), for reports and tests
    added_input_holders: list[str] = dataclasses.field(default_factory=list)
    # id(float MultiHeadAttention) -> the quantized attention layer that replaces it
    attention: dict[int, KerasQuantizedMultiHeadAttention] = dataclasses.field(default_factory=dict)
    # name of a product of two activations -> the names of the holders that quantize its inputs
    # (QATConfig.quantize_matmul_inputs)
    product_inputs: dict[str, list[str]] = dataclasses.field(default_factory=dict)


def _plan(model: keras.Model, graph: _Graph, config: QATConfig) -> _Plan:
    names = [input_name(t) for _, t in graph.inputs] + [c.layer.name for c in graph.calls] + graph.inlined
    names += list(graph.origins.values())
    check_overrides(config, list(dict.fromkeys(names)))
    consumers = graph.consumers()
    calls_of = Counter(id(c.layer) for c in graph.calls)
    plan = _Plan({}, {})
    wrappers = plan.wrappers
    # (tensor key, its producer (None for an input), the name its settings come from, the keys a merge reads)
    points: list[tuple[Hashable, Any, str, list[Hashable]]] = [
        (key, None, input_name(tensor), []) for key, tensor in graph.inputs
        if key in consumers and keras.backend.is_float_dtype(tensor.dtype)
    ]
    for call in graph.calls:
        layer = call.layer
        if _is_merge(call):
            key, end = _chain_end(call, graph, consumers, through_batch_norm=False)
            # Where an activation follows the merge, it decides the sign (log_softmax of sums of unsigned values
            # is negative).
            points.append((key, end, layer.name, call.inputs if end is layer else []))
            continue
        if not isinstance(layer, keras.layers.Layer):
            continue
        if layer.name in graph.origins:
            # A part of a split separable convolution: quantized whatever `layer_types` says of its own class.
            kernels = QUANTIZABLE_LAYERS[type(layer).__name__][1]
        else:
            kernels = quantized_kernels(layer, config)
        if kernels is not None:
            settings = graph.settings(config, layer.name)
            if settings.skip:
                continue
            if id(layer) not in wrappers:
                bn = _batch_norm_to_fold(call, graph, consumers, calls_of) if config.fold_batch_norm else None
                with naming_layer(layer.name):
                    if bn is not None:
                        plan.weights[id(layer)] = folded_weights(layer, bn)
                        plan.folded[bn.name] = layer.name
                        plan.removed.add(id(bn))
                    wrappers[id(layer)] = make_wrapper(layer, kernels, settings, config, plan.weights.get(id(layer)))
            points.append((*_chain_end(call, graph, consumers, through_batch_norm=True), layer.name, []))
        elif quantizes_attention(layer, config):
            settings = config.for_layer(layer.name)
            if settings.skip:
                continue
            if id(layer) not in plan.attention:
                with naming_layer(layer.name):
                    plan.attention[id(layer)] = make_attention(layer, settings, config)
            # Its output is the output projection's: quantized as a wrapped layer's is.
            points.append((*_chain_end(call, graph, consumers, through_batch_norm=False), layer.name, []))
        elif isinstance(layer, keras.layers.MultiHeadAttention) and type(layer) is not keras.layers.MultiHeadAttention:
            warnings.warn(
                f"{layer.name!r} is a {type(layer).__name__}, a subclass of MultiHeadAttention, and is kept in float: "
                "quantize_model replaces keras.layers.MultiHeadAttention itself by a quantized attention layer, which "
                "would drop what the subclass computes differently", stacklevel=3,
            )

    holders = plan.holders
    if not config.quantize_activations:
        return plan
    taken = set(names)
    for attention in plan.attention.values():
        # Its sublayers' names: no holder of the model may take them (reports and calibrate find layers by name).
        taken.update(f"{attention.name}_{name}" for name in PROJECTIONS)
        taken.update(attention.holder_name(point) for point in ACTIVATION_POINTS)
    producers = {key: call for call in graph.calls for key in call.outputs}
    for key, producer, base, merged in points:
        settings = graph.settings(config, base)
        if key in holders or settings.skip:
            continue
        activation = _activation_name(producer) if producer is not None else None
        signed = activation not in NON_NEGATIVE_ACTIVATIONS and not _merges_non_negative(merged, plan, producers)
        params = default_activation_params(settings.activation_quantization_method, signed)
        with naming_layer(base):
            holders[key] = make_holder(settings, config, params, holder_name(base, taken))
        plan.signed[key] = signed
    if config.quantize_matmul_inputs:
        _plan_product_inputs(graph, plan, config, taken)
    if config.integer_bias:
        _plan_input_holders(graph, plan, config, calls_of, taken)
        _plan_integer_bias(graph, plan, calls_of)
    return plan


def _is_merge(call: _Call) -> bool:
    """Whether `call` adds or concatenates tensors: an `Add` or `Concatenate` layer, or the `keras.ops` form of one
    (`a + b`, `keras.ops.add`, `keras.ops.concatenate`) that reads two or more tensors, as `layers.Add` does."""
    if isinstance(call.layer, _MERGE_LAYERS):
        return True
    return isinstance(call.layer, _MERGE_OPERATIONS) and len(call.inputs) >= 2


def _merges_non_negative(merged: list[Hashable], plan: _Plan, producers: dict[Hashable, _Call]) -> bool:
    """Whether a merge reads only outputs of unsigned holders (directly or through `VALUE_PRESERVING_LAYERS`), so
    that its own output is never negative.

    Its holder is then unsigned too, as in the PyTorch backend: a signed one would spend a bit on negatives, and its
    step would be twice the step of an input with the same threshold, which puts half of that input's values on
    rounding ties.
    """
    if not merged:
        return False
    return all(plan.signed.get(key if key in plan.signed else grid_source(key, producers)) is False for key in merged)


def _has_grid_step(quantizer: Any) -> bool:
    return type(quantizer).grid_step is not BaseKerasTrainableQuantizer.grid_step


def grid_source(key: Hashable, producers: dict[Hashable, _Call], through_averages: bool = False) -> Hashable:
    """The key of the tensor whose values `key` holds (walking back through `VALUE_PRESERVING_LAYERS`, and with
    `through_averages` through average poolings too)."""
    kinds = (*VALUE_PRESERVING_LAYERS, *(_AVERAGING_LAYERS if through_averages else ()))
    while key in producers:
        call = producers[key]
        if not isinstance(call.layer, kinds) or len(call.inputs) != 1 or len(call.outputs) != 1:
            break
        key = call.inputs[0]
    return key


def _quantize_input(
    key: Hashable, owner: str, graph: _Graph, plan: _Plan, config: QATConfig, taken: set[str],
    producers: dict[Hashable, _Call],
) -> str | None:
    """Make sure the tensor `key`, which the layer or operation `owner` reads, is on a holder's grid: where it is no
    holder's output (directly or through `VALUE_PRESERVING_LAYERS`), a holder named "<owner>_input_activation_quantizer"
    goes right after the operation that left the grid, so that the runtime runs that operation on integers too
    (TFLite's int8 MEAN after a pooling, say). It is unsigned where the values come, through average poolings, from
    an unsigned holder or a non-negative activation. Returns the name of the holder the input is on (None where the
    input stays float: a model input the config leaves unquantized, or a folded BatchNormalization's output)."""
    source = grid_source(key, producers)
    if source in plan.holders:
        return plan.holders[source].name
    inputs = {k for k, _ in graph.inputs}
    if source in inputs or id(producers[source].layer) in plan.removed:
        return None
    origin = grid_source(key, producers, through_averages=True)
    if origin in plan.holders:
        signed = plan.signed[origin]
    else:
        producer = producers[origin].layer if origin in producers else None
        signed = producer is None or _activation_name(producer) not in NON_NEGATIVE_ACTIVATIONS
    settings = graph.settings(config, owner)
    params = default_activation_params(settings.activation_quantization_method, signed)
    name = holder_name(f"{owner}_input", taken)
    with naming_layer(owner):
        plan.holders[source] = make_holder(settings, config, params, name)
    plan.signed[source] = signed
    plan.added_input_holders.append(name)
    return name


def _attention_inputs(call: _Call) -> list[Hashable]:
    """The keys of the query, value and key tensors an attention call reads (not its masks)."""
    keys = [call.key(call.arguments[name]) for name in ("query", "value", "key")
            if isinstance(call.arguments.get(name), keras.KerasTensor)]
    return list(dict.fromkeys(keys))


def _plan_input_holders(
    graph: _Graph, plan: _Plan, config: QATConfig, calls_of: Counter, taken: set[str]
) -> None:
    """Give each wrapped layer (called once, one input) and each quantized attention layer (its query, key and value)
    a quantized input, as integer runtimes need (`_quantize_input`)."""
    producers = {key: call for call in graph.calls for key in call.outputs}
    for call in graph.calls:
        layer = call.layer
        if id(layer) in plan.attention:
            keys = _attention_inputs(call)
        elif id(layer) in plan.wrappers and calls_of[id(layer)] == 1 and len(call.inputs) == 1:
            keys = call.inputs
        else:
            continue
        for key in keys:
            _quantize_input(key, layer.name, graph, plan, config, taken, producers)


def product_inputs(call: Any, dtypes: Mapping[Hashable, str] | None = None) -> list[Hashable] | None:
    """The keys of the two float activations a call multiplies, or None where it is no such product: a `Dot` layer,
    `keras.ops.matmul` (or `@`) or `keras.ops.einsum` with two tensor operands."""
    layer = call.layer
    if not isinstance(layer, (keras.layers.Dot, Matmul, Einsum)) or len(call.inputs) != 2:
        return None
    if dtypes is not None and not all(keras.backend.is_float_dtype(dtypes.get(k, "float32")) for k in call.inputs):
        return None
    return list(call.inputs)


def _plan_product_inputs(graph: _Graph, plan: _Plan, config: QATConfig, taken: set[str]) -> None:
    """Quantize both inputs of every product of two activations (`product_inputs`) that no override skips, as
    integer runtimes need (`_quantize_input`; an input held already keeps its holder)."""
    producers = {key: call for call in graph.calls for key in call.outputs}
    for call in graph.calls:
        keys = product_inputs(call, graph.dtypes)
        if keys is None or config.for_layer(call.layer.name).skip:
            continue
        names = [_quantize_input(key, call.layer.name, graph, plan, config, taken, producers)
                 for key in dict.fromkeys(keys)]
        plan.product_inputs[call.layer.name] = [name for name in names if name is not None]


def _plan_integer_bias(graph: _Graph, plan: _Plan, calls_of: Counter) -> None:
    """Record the input holder of each wrapped layer, called once, that reads a holder's output (directly or
    through `VALUE_PRESERVING_LAYERS`) and has a quantized "kernel" (separable convolutions have none: their
    pointwise input is not on a grid): its bias, if any, is rounded on that grid. Record the holder of its output
    too (`KerasTrainableQuantizationWrapper(output_holder=...)`)."""
    producers = {key: call for call in graph.calls for key in call.outputs}
    consumers = graph.consumers()
    for call in graph.calls:
        wrapper = plan.wrappers.get(id(call.layer))
        if wrapper is None or calls_of[id(call.layer)] != 1 or len(call.inputs) != 1:
            continue
        holder = plan.holders.get(grid_source(call.inputs[0], producers))
        kernel_quantizer = wrapper.weights_quantizers.get("kernel")
        if holder is None or kernel_quantizer is None or not _bias_on_channel_axis(wrapper):
            continue
        if _has_grid_step(kernel_quantizer) and _has_grid_step(holder.activation_holder_quantizer):
            plan.input_holders[id(call.layer)] = holder.name
            key, _ = _chain_end(call, graph, consumers, through_batch_norm=True)
            if key in plan.holders and key != call.inputs[0]:
                plan.output_holders[id(call.layer)] = plan.holders[key].name


def _bias_on_channel_axis(wrapper: KerasTrainableQuantizationWrapper) -> bool:
    """Whether a rounded bias fits the layer: its bias steps Δ_in·Δ_w are per channel of the kernel quantizer, so an
    EinsumDense bias must lie along the output's last axis and be that channel axis (or the kernel per tensor)."""
    layer = wrapper.layer
    if not isinstance(layer, keras.layers.EinsumDense) or layer.bias_axes is None:
        return True
    kernel_config = wrapper.weights_quantizers["kernel"].quantization_config
    axis = kernel_config.weights_channels_axis
    if not kernel_config.weights_per_channel_threshold or axis is None:
        return True
    inputs, output = parse_equation(layer.equation)
    return layer.bias_axes == inputs[1][axis] == output[-1]


# --- rebuilding -------------------------------------------------------------------------------------------------


def _new_input(tensor: keras.KerasTensor) -> keras.KerasTensor:
    return keras.Input(batch_shape=tensor.shape, dtype=tensor.dtype, name=input_name(tensor))


def _rebuild(model: keras.Model, graph: _Graph, plan: _Plan) -> tuple[keras.Model, list[tuple[Any, Any]]]:
    """The QAT model and the (float layer, new layer) pairs whose weights are still to be copied."""
    copies: dict[int, Any] = {}
    pairs: list[tuple[Any, Any]] = []

    def new_layer(layer: Any) -> Any:
        if not isinstance(layer, keras.layers.Layer):
            # A stateless keras.ops operation (`x + 3.0`): copied, so that the float model's operations get no nodes
            # of the QAT model; it has no weights to copy.
            if id(layer) not in copies:
                copies[id(layer)] = copy_layer(layer)
            return copies[id(layer)]
        if id(layer) not in copies:
            wrapper = plan.wrappers.get(id(layer))
            if wrapper is not None:
                wrapper.input_holder = plan.input_holders.get(id(layer))
                wrapper.output_holder = plan.output_holders.get(id(layer))
            else:
                wrapper = plan.attention.get(id(layer))
            copies[id(layer)] = wrapper if wrapper is not None else copy_layer(layer)
            pairs.append((layer, copies[id(layer)]))
        return copies[id(layer)]

    def hold(key: Hashable, value: Any, applied: list) -> Any:
        holder = plan.holders.get(key)
        if holder is None:
            return value
        applied.append(holder)
        return holder(value)

    applied: list[Any] = []  # layers in the order they are called (the layer list of a Sequential result)
    tensors: dict[Hashable, Any] = {}
    new_inputs = {}
    for key, tensor in graph.inputs:
        new_inputs[key] = _new_input(tensor)
        tensors[key] = hold(key, new_inputs[key], applied)
    for call in graph.calls:
        if id(call.layer) in plan.removed:  # a folded BatchNormalization: its input goes on
            (key,) = call.outputs
            tensors[key] = hold(key, tensors[call.inputs[0]], applied)
            continue
        layer = new_layer(call.layer)
        applied.append(layer)
        outputs = keras.tree.flatten(call.replay(layer, tensors))
        for key, value in zip(call.outputs, outputs, strict=True):
            tensors[key] = hold(key, value, applied)

    if isinstance(model, keras.Sequential):
        qat_model = keras.Sequential([_new_input(model.inputs[0]), *applied], name=model.name,
                                     trainable=model.trainable)
    else:
        ids = {id(t): key for key, t in graph.inputs}
        inputs = keras.tree.map_structure(lambda t: new_inputs[ids[id(t)]], model.input)
        outputs = keras.tree.map_structure(lambda t: tensors[id(t)], model.output)
        qat_model = keras.Model(inputs, outputs, name=model.name, trainable=model.trainable)
    return qat_model, pairs


def _copy_weights(pairs: list[tuple[Any, Any]], plan: _Plan) -> None:
    for layer, new in pairs:
        if isinstance(new, KerasQuantizedMultiHeadAttention):
            copy_attention_weights(layer, new)
            continue
        target = new.layer if isinstance(new, KerasTrainableQuantizationWrapper) else new
        if id(layer) in plan.weights:
            for attribute, value in plan.weights[id(layer)].items():
                getattr(target, attribute).assign(value)
        else:
            target.set_weights(layer.get_weights())


def quantize_model(
    model: keras.Model,
    qat_config: QATConfig | None = None,
    representative_data: Iterable[Any] | Any | None = None,
    num_calibration_batches: int | None = None,
    *,
    progress: bool = True,
) -> keras.Model:
    """Return a QAT-ready copy of `model` (which is not changed).

    Args:
        model: a built float Sequential or Functional Keras model.
        qat_config: what to quantize and how (default `QATConfig()`: W8A8 per-channel symmetric STE).
        representative_data: data to calibrate activation parameters with: an array of samples, or batches
            (arrays, `(inputs, targets)` tuples, a `tf.data.Dataset`), as `calibrate` takes them. Without it,
            activations start at a threshold of 8 and a warning says so.
        num_calibration_batches: how many batches to use (None: all).
        progress: show a progress bar while calibrating.

    Returns:
        A model of the same kind (Sequential or Functional) whose quantized layers are
        `KerasTrainableQuantizationWrapper`s named like the float layers (a separable convolution `<name>` becomes
        the wrapped `<name>_depthwise` and `<name>_pointwise` convolutions, which take its overrides), with
        `KerasActivationQuantizationHolder`s named `<layer>_activation_quantizer` after them and after the inputs;
        each `MultiHeadAttention` is a `KerasQuantizedMultiHeadAttention` with its quantizers inside. Quantizer
        parameters are layer weights (`kernel_threshold`, `activation_threshold`, or `..._range_min` /
        `..._range_max`) and are saved in `.keras`.
        If `model` was compiled, the copy is compiled with the same settings.

    Example:
        >>> qat = quantize_model(model, QATConfig(weight_n_bits=4), x_train[:512])  # doctest: +SKIP
        >>> qat.compile(optimizer="adam", loss="sparse_categorical_crossentropy"); qat.fit(x_train, y_train)
    """
    config = _check_arguments(model, qat_config, representative_data, num_calibration_batches, progress)
    quantized = [layer.name for layer in all_layers(model)
                 if isinstance(layer, (KerasTrainableQuantizationWrapper, KerasActivationQuantizationHolder))]
    if quantized:
        raise QuantizationConfigError(
            f"model {model.name!r} is already quantized (it holds {', '.join(quantized[:5])}"
            f"{', ...' if len(quantized) > 5 else ''}); give quantize_model the float model"
        )
    notes: list[str] = []
    graph = inline_nested_models(model, model_graph(model), config, notes)
    graph = split_separable_convs(model, graph, config, notes)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    plan = _plan(model, graph, config)
    if not plan.wrappers and not plan.attention:
        types = config.layer_types if config.layer_types is not None else (*QUANTIZABLE_LAYERS, *ATTENTION_LAYERS)
        raise QuantizationConfigError(
            f"{model.name!r} has no layer to quantize: no {', '.join(types)} (or all were skipped by the config)"
        )
    qat_model, pairs = _rebuild(model, graph, plan)
    _copy_weights(pairs, plan)
    if model.compiled:
        qat_model.compile_from_config(model.get_compile_config())
    if not plan.holders:
        return qat_model
    if representative_data is None:
        warn_no_representative_data()
        return qat_model
    calibrate(qat_model, representative_data, num_calibration_batches, config.activation_calibration,
              progress=progress)
    return qat_model
