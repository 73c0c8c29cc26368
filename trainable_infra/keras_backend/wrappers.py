"""Keras 3 layers that put trainable quantizers into a model: a weights wrapper and an activation holder."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar

import keras
import numpy as np
import tensorflow as tf
from keras.src.backend import AutocastScope

from trainable_infra.common import debug
from trainable_infra.common.debug import FINITE_CHECKS
from trainable_infra.common.errors import QuantizationConfigError
from trainable_infra.common.mct import QuantizationTarget
from trainable_infra.keras_backend.base_quantizer import BaseKerasTrainableQuantizer
from trainable_infra.keras_backend.fake_quant import integer_bias
from trainable_infra.keras_backend.integer import integer_forward, integer_kernel_applies, trainable_grid

PACKAGE = "trainable_infra"
# The note on XLA: the layers here and in inferable_wrappers.py set `supports_jit = False`, so Keras never
# compiles them with XLA (`jit_compile="auto"` would on a GPU; `jit_compile=True` falls back with a warning).
# XLA's lowering of TensorFlow's fake-quant op, and its rewriting of the float64 range arithmetic, give outputs
# that differ from TensorFlow's own kernels (which the mct-quantizers inferable quantizers run) by steps near
# rounding ties and in last bits. Without XLA a trained model and its conversion agree bit for bit.


# Layers whose outputs are values of their input (reshaped, permuted, max-pooled, zero-padded; dropout is the
# identity in inference): a holder's grid reaches through them to the layer that reads them.
VALUE_PRESERVING_LAYERS = (
    keras.layers.Flatten, keras.layers.Reshape, keras.layers.Permute, keras.layers.Identity,
    keras.layers.MaxPooling1D, keras.layers.MaxPooling2D, keras.layers.MaxPooling3D,
    keras.layers.GlobalMaxPooling1D, keras.layers.GlobalMaxPooling2D, keras.layers.GlobalMaxPooling3D,
    keras.layers.ZeroPadding1D, keras.layers.ZeroPadding2D, keras.layers.ZeroPadding3D,
    keras.layers.Cropping1D, keras.layers.Cropping2D, keras.layers.Cropping3D,
    keras.layers.Dropout, keras.layers.SpatialDropout1D, keras.layers.SpatialDropout2D, keras.layers.SpatialDropout3D,
)


def producing_holder(tensor: Any, holder_class: type | None = None) -> Any:
    """The holder (a `KerasActivationQuantizationHolder`, or an instance of `holder_class`) whose output a symbolic
    tensor is, directly or through `VALUE_PRESERVING_LAYERS`; None if there is none (or the tensor is not
    symbolic)."""
    history = getattr(tensor, "_keras_history", None)
    while history is not None:
        operation = history.operation
        if isinstance(operation, holder_class or KerasActivationQuantizationHolder):
            return operation
        if not isinstance(operation, VALUE_PRESERVING_LAYERS):
            return None
        node = operation._inbound_nodes[history.node_index]
        if len(node.input_tensors) != 1:
            return None
        history = getattr(node.input_tensors[0], "_keras_history", None)
    return None


def _relu_clip(layer: Any) -> float | None:
    """The upper clip of a ReLU layer (inf for a plain ReLU, 6 for ReLU6), or None for any other layer."""
    if isinstance(layer, keras.layers.ReLU):
        if float(layer.negative_slope) != 0.0 or float(layer.threshold) != 0.0:
            return None
        return float("inf") if layer.max_value is None else float(layer.max_value)
    if isinstance(layer, keras.layers.Activation):
        return {"relu": float("inf"), "relu6": 6.0}.get(getattr(layer.activation, "__name__", None))
    return None


def claim_output_holder(holder: keras.layers.Layer, tensor: Any, wrapper_class: type) -> None:
    """Tell the wrapper (an instance of `wrapper_class`) whose output `tensor` is, directly or through a ReLU or
    ReLU6 layer, that `holder` quantizes its output, if it names `holder` as its `output_holder` (symbolic tensors
    only); the wrapper's integer computation then clips as that layer does (`_output_clip`)."""
    history = getattr(tensor, "_keras_history", None)
    clip = None
    if history is not None and _relu_clip(history.operation) is not None:
        clip = _relu_clip(history.operation)
        node = history.operation._inbound_nodes[history.node_index]
        history = getattr(node.input_tensors[0], "_keras_history", None) if len(node.input_tensors) == 1 else None
    producer = history.operation if history is not None else None
    if isinstance(producer, wrapper_class) and producer.output_holder == holder.name:
        producer._output_holder_ref = weakref.ref(holder)
        producer._output_clip = clip


@contextlib.contextmanager
def _functions_run_eagerly() -> Iterator[None]:
    """TensorFlow functions run eagerly while `check_finite` is on: the checks read values, so that they raise
    `NonFiniteError` from `model.fit` itself, also in a model whose training step was traced before."""
    before = tf.config.functions_run_eagerly()
    tf.config.run_functions_eagerly(True)
    try:
        yield
    finally:
        tf.config.run_functions_eagerly(before)


FINITE_CHECKS.add_backend_mode(_functions_run_eagerly)


def check_finite_values(owner: str, tensor: str, x: Any, quantizer: BaseKerasTrainableQuantizer) -> None:
    """Raise `NonFiniteError` if `x` (what `quantizer` quantizes) or a variable of `quantizer` is unusable
    (`trainable_infra.check_finite`). Symbolic calls, which build a model, have no values to check."""
    if not tf.executing_eagerly():
        return
    debug.check_input(owner, tensor, tf.cast(x, tf.float32).numpy())
    debug.check_parameters(owner, {
        name: np.asarray(entry.variable.numpy()) for name, entry in quantizer.registered_variables().items()
    })


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A variable of the wrapped layer and what replaces it in the forward pass.

    A plain object on purpose: Keras' attribute tracking would adopt a variable held in a list or tuple as one
    of the wrapper's own, saving it twice.
    """

    name: str
    variable: keras.Variable
    quantizer: Callable[[Any, bool], Any]


def layer_variable(layer: keras.layers.Layer, name: str, argument: str) -> keras.Variable:
    """The variable `layer.<name>`, or a `QuantizationConfigError` naming what the layer has."""
    variable = getattr(layer, name, None)
    if not isinstance(variable, keras.Variable):
        available = sorted(v.name for v in layer.weights)
        found = "no such attribute" if variable is None else f"a {type(variable).__name__}, not a variable"
        raise QuantizationConfigError(
            f"{argument} names {name!r}, but {type(layer).__name__} layer {layer.name!r} has {found}; "
            f"its variables are {available}"
        )
    return variable


def claim_quantizer(quantizer: Any, layer: keras.layers.Layer, argument: str) -> None:
    """Record that `quantizer` now quantizes a tensor of `layer`; raise if another layer already uses it.

    A quantizer holds the parameters of one tensor, so sharing one instance would silently overwrite them.
    """
    owner = getattr(quantizer, "_keras_owner", None)
    owner = owner() if owner is not None else None
    if owner is not None and owner is not layer:
        raise QuantizationConfigError(
            f"{argument} ({type(quantizer).__name__}) already quantizes a tensor of layer {owner.name!r}; "
            f"layer {layer.name!r} needs its own quantizer instance"
        )
    quantizer._keras_owner = weakref.ref(layer)


def call_with_weights(
    layer: keras.layers.Layer, substitutes: list[tuple[keras.Variable, Any]], args: tuple, kwargs: dict
) -> tuple[Any, list[Any]]:
    """Run `layer(*args, **kwargs)` with each substituted variable read as its given value.

    The layer's own `call` runs unchanged inside a `keras.StatelessScope`. Its other variables are mapped to
    their current values too, so that an enclosing stateless scope (e.g. `model.stateless_call`) still
    decides what they read; updates the layer makes (e.g. batch-norm statistics) are applied after the scope.
    Returns the outputs and the losses the layer added (activity regularization).
    """
    replaced = {id(variable) for variable, _ in substitutes}
    current = [(v, tf.convert_to_tensor(v)) for v in layer.variables if id(v) not in replaced]
    with keras.StatelessScope(state_mapping=substitutes + current, collect_losses=True) as scope:
        outputs = layer(*args, **kwargs)
    for variable, value in current:
        updated = scope.get_current_value(variable)
        if updated is not value:
            variable.assign(updated)
    return outputs, scope.losses


def check_weights_quantizers(weights_quantizers: Any, base: type, what: str) -> dict[str, Any]:
    """Return `weights_quantizers` as a dict if it maps attribute names to distinct weights quantizers of `base`."""
    if not isinstance(weights_quantizers, Mapping):
        raise QuantizationConfigError(
            f"weights_quantizers must be a dict of attribute name -> {what}, got {weights_quantizers!r}"
        )
    seen: dict[int, str] = {}
    for name, quantizer in weights_quantizers.items():
        if not isinstance(name, str) or not name:
            raise QuantizationConfigError(
                f"weights_quantizers keys must be attribute names of the layer (e.g. 'kernel'), got {name!r}"
            )
        if not isinstance(quantizer, base):
            raise QuantizationConfigError(
                f"weights_quantizers[{name!r}] must be a {what}, got {quantizer!r} of type {type(quantizer).__name__}"
            )
        if getattr(quantizer, "quantization_target", QuantizationTarget.Weights) is not QuantizationTarget.Weights:
            raise QuantizationConfigError(
                f"weights_quantizers[{name!r}] quantizes {quantizer.quantization_target.value}, not Weights: "
                f"{type(quantizer).__name__}"
            )
        if id(quantizer) in seen:
            raise QuantizationConfigError(
                f"weights_quantizers[{name!r}] is the same quantizer object as "
                f"weights_quantizers[{seen[id(quantizer)]!r}]; each weight needs its own quantizer instance"
            )
        seen[id(quantizer)] = name
    return dict(weights_quantizers)


def check_layer(layer: Any) -> keras.layers.Layer:
    """Return `layer` if it is a Keras 3 layer, else raise `QuantizationConfigError`."""
    if not isinstance(layer, keras.layers.Layer):
        raise QuantizationConfigError(f"layer must be a Keras 3 layer, got {layer!r} of type {type(layer).__name__}")
    return layer


class WeightsWrapperBase(keras.layers.Layer):
    """What the trainable and the inferable weights wrappers share: argument checks, name, dtype, masking.

    A subclass names the quantizer base class it takes (`quantizer_base`) and how to call it in messages.
    """

    quantizer_base: ClassVar[type]
    quantizer_kind: ClassVar[str]
    # The holder class whose output the wrapper reads (None: KerasActivationQuantizationHolder).
    holder_class: ClassVar[type | None] = None

    def __init__(
        self,
        layer: keras.layers.Layer,
        weights_quantizers: Mapping[str, Any],
        input_holder: str | None = None,
        output_holder: str | None = None,
        **kwargs: Any,
    ):
        holder_kind = (self.holder_class or KerasActivationQuantizationHolder).__name__
        for argument, value in (("input_holder", input_holder), ("output_holder", output_holder)):
            if value is not None and (not isinstance(value, str) or not value):
                raise QuantizationConfigError(f"{argument} must be None or the name of a {holder_kind}, got {value!r}")
        check_layer(layer)
        quantizers = check_weights_quantizers(weights_quantizers, self.quantizer_base, self.quantizer_kind)
        kwargs.setdefault("name", f"quant_{layer.name}")
        kwargs.setdefault("dtype", layer.dtype_policy)
        # No autocast: quantizers read float32 variables; the wrapped layer still autocasts its own reads.
        super().__init__(autocast=False, **kwargs)
        self.supports_jit = False  # no XLA: see the note on it above
        self.layer = layer
        self.weights_quantizers = quantizers
        self.supports_masking = layer.supports_masking
        if layer.built:
            for name in quantizers:
                layer_variable(layer, name, "weights_quantizers")
        self.input_holder = input_holder
        self.output_holder = output_holder
        # weakref.ref to the holders once found: a plain attribute would make Keras track them as sublayers.
        self._input_holder_ref: Callable[[], Any] | None = None
        self._output_holder_ref: Callable[[], Any] | None = None

    def _quantize(self, weight: QuantizedWeight, training: bool) -> Any:
        """The value of `weight.variable` that the forward pass uses in `training` mode."""
        raise NotImplementedError  # each wrapper calls its own kind of quantizer

    def get_quantized_weights(self) -> dict[str, tf.Tensor]:
        """The fake-quantized weights the layer computes with in inference, as mct-quantizers'
        `PytorchQuantizationWrapper.get_quantized_weights` gives them.

        Returns:
            A dict of attribute name (e.g. "kernel") -> float32 tensor, one entry per weight whose quantizer is
            enabled. A bias has no quantizer and is not listed: where `input_holder` is set the trained wrapper
            rounds it onto the integer grid (`integer_bias()`), and the converted one holds that rounded bias.
        """
        if not self.built:
            raise QuantizationConfigError(
                f"layer {self.name!r} is not built, so its weights do not exist yet: call it on data (or build it, or "
                "the model it is in) before get_quantized_weights"
            )
        # Variables read in float32, as `call` reads them, also inside a mixed-precision autocast scope.
        with AutocastScope(None):
            return {w.name: self._quantize(w, False) for w in self._quantized_weights}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.input_holder is not None and args:
            producer = producing_holder(args[0], self.holder_class)  # a model being built records producers
            if producer is not None and producer.name == self.input_holder:
                self._input_holder_ref = weakref.ref(producer)
        return super().__call__(*args, **kwargs)


@keras.saving.register_keras_serializable(package=PACKAGE)
class KerasTrainableQuantizationWrapper(WeightsWrapperBase):
    """Runs a layer with its weights fake-quantized by trainable quantizers.

    The layer's own `call` runs with each quantized variable substituted by its quantized value; gradients reach
    both the float variable and the quantizer's parameters. Works in Sequential and Functional models, eagerly
    and under `model.fit`, and saves to `.keras`.

    With `input_holder` (what `quantize_model` sets where `QATConfig.integer_bias` is on) the layer's bias is
    rounded as integer runtimes store it: round(b / s)·s with s = Δ_in·Δ_w, the float32 product of the step of
    that holder's quantizer and the per-output-channel step of the kernel's (`integer_bias`); the gradient passes
    straight through to the bias. The holder is found by name when the wrapper is called on its output (directly,
    or through layers that keep its values, `VALUE_PRESERVING_LAYERS`, e.g. Flatten) while a model is built
    (`keras.Model(...)`, loading a `.keras` file, `clone_model`).

    With `output_holder` too (the holder that quantizes the layer's output, directly or after a ReLU), a Conv2D,
    DepthwiseConv2D or Dense layer computes in inference as TFLite's int8 kernel does (`integer.integer_forward`:
    the exact integer accumulator, requantized once); training and calibration keep the float computation.

    Args:
        layer: the Keras layer to wrap (built or not).
        weights_quantizers: attribute name of a layer variable (e.g. "kernel", "depthwise_kernel") -> a
            weights quantizer (a `BaseKerasTrainableQuantizer` with target Weights), one instance per variable.
        input_holder: the name of the `KerasActivationQuantizationHolder` whose output the layer reads, to round
            the bias on its grid; None keeps the float bias. Needs a quantizer of "kernel" quantized per output
            channel (or per tensor).
        output_holder: the name of the `KerasActivationQuantizationHolder` that quantizes the layer's output
            (found when it is called on that output, or on a ReLU of it); None keeps the float computation.
        **kwargs: Keras layer arguments (`name` defaults to "quant_" + the layer's name).

    Example:
        >>> wrapped = KerasTrainableQuantizationWrapper(  # doctest: +SKIP
        ...     keras.layers.Conv2D(16, 3), {"kernel": STESymmetricWeightQuantizer(weights_config)})
    """

    quantizer_base = BaseKerasTrainableQuantizer
    quantizer_kind = "Keras weights trainable quantizer"

    def __init__(
        self,
        layer: keras.layers.Layer,
        weights_quantizers: Mapping[str, Any],
        input_holder: str | None = None,
        output_holder: str | None = None,
        **kwargs: Any,
    ):
        super().__init__(layer, weights_quantizers, input_holder, output_holder, **kwargs)
        if input_holder is not None and "kernel" not in self.weights_quantizers:
            raise QuantizationConfigError(
                f"input_holder={input_holder!r} rounds the bias on the grid of the input's and the kernel's steps, "
                f"but layer {layer.name!r} has no 'kernel' quantizer (weights_quantizers: "
                f"{sorted(self.weights_quantizers)})"
            )

    def build(self, input_shape: Any) -> None:
        if not self.layer.built:
            self.layer.build(input_shape)
        quantized = []
        for name, quantizer in self.weights_quantizers.items():
            variable = layer_variable(self.layer, name, "weights_quantizers")
            if not quantizer.weights_quantization():
                continue
            claim_quantizer(quantizer, self, f"weights_quantizers[{name!r}]")
            quantizer.initialize_quantization(tuple(variable.shape), name, self)
            quantized.append(QuantizedWeight(name, variable, quantizer))
        self._quantized_weights = tuple(quantized)
        self._bias = None
        bias = getattr(self.layer, "bias", None)
        if self.input_holder is not None and isinstance(bias, keras.Variable):
            self._bias = bias
            # Depthwise output channel c = input channel c // multiplier: the kernel's steps are per input channel.
            self._bias_step_repeat = int(getattr(self.layer, "depth_multiplier", 1) or 1)

    def _quantize(self, weight: QuantizedWeight, training: bool) -> Any:
        return weight.quantizer.quantize_inputs(tf.convert_to_tensor(weight.variable), training)

    def integer_bias(self) -> tf.Tensor | None:
        """The bias the forward pass uses: round(b / s)·s on the grid s = Δ_in·Δ_w (float32, per output channel),
        or None where the float bias is used (no `input_holder`, no bias, or a quantizer without a grid step)."""
        if self._bias is None:
            return None
        holder = self._input_holder_ref() if self._input_holder_ref is not None else None
        if holder is None:
            raise QuantizationConfigError(
                f"layer {self.name!r} rounds its bias on the grid of holder {self.input_holder!r} but has not found "
                "it: the wrapper finds its input_holder when it is called on that holder's output while a Functional "
                "or Sequential model is built"
            )
        kernel_quantizer = self.weights_quantizers["kernel"]
        if not (holder._enabled and kernel_quantizer.weights_quantization()):
            return None
        input_step, kernel_step = holder.activation_holder_quantizer.grid_step(), kernel_quantizer.grid_step()
        if input_step is None or kernel_step is None:
            return None
        scale = tf.cast(input_step, tf.float32) * tf.cast(kernel_step, tf.float32)
        if self._bias_step_repeat > 1 and scale.shape.rank == 1:
            scale = tf.repeat(scale, self._bias_step_repeat)
        bias = tf.convert_to_tensor(self._bias)
        if scale.shape.rank == 1 and scale.shape[0] != bias.shape[0]:
            raise QuantizationConfigError(
                f"layer {self.name!r}: the kernel quantizer has {scale.shape[0]} channel steps for a bias of "
                f"{bias.shape[0]} output channels; with input_holder the kernel must be quantized per output channel "
                "or per tensor"
            )
        return integer_bias(bias, tf.stop_gradient(scale))

    def call(self, inputs: Any, *args: Any, training: bool | None = None, **kwargs: Any) -> Any:
        training = bool(training)
        # Keras autocasts variable reads inside a mixed-precision layer's call even with autocast=False: the kernel
        # and the quantizers' variables are read (and quantized) in float32, as the inferable quantizers do; the
        # wrapped layer casts the quantized kernel to its compute dtype, as it would cast its float kernel.
        with AutocastScope(None):
            if FINITE_CHECKS.enabled:
                for w in self._quantized_weights:
                    owner = f"layer {self.name!r}, the {w.name!r} quantizer ({type(w.quantizer).__name__})"
                    kernel = tf.convert_to_tensor(w.variable)
                    check_finite_values(owner, f"{self.layer.name}.{w.name}", kernel, w.quantizer)
            substitutes = [(w.variable, self._quantize(w, training)) for w in self._quantized_weights]
            bias = self.integer_bias() if self._bias is not None else None
            if bias is not None:
                substitutes.append((self._bias, bias))
            if not training and not args and not kwargs:
                integer = self._integer_output(inputs, substitutes, bias)
                if integer is not None:
                    return integer
        outputs, losses = call_with_weights(self.layer, substitutes, (inputs, *args), kwargs)
        if losses:
            self.add_loss(losses)
        return outputs

    def _integer_output(self, inputs: Any, substitutes: list, bias: Any) -> Any:
        """The layer's output computed as TFLite's int8 kernel does (`integer.integer_forward`), or None where the
        float computation runs: no holders on both sides, a layer or quantizer without an integer grid, or holders
        that are disabled or being calibrated (which must see the float values)."""
        holders = [ref() if ref is not None else None for ref in (self._input_holder_ref, self._output_holder_ref)]
        if any(h is None or not h._enabled or h._observer is not None for h in holders):
            return None
        kernel_quantizer = self.weights_quantizers.get("kernel")
        if not integer_kernel_applies(self.layer) or kernel_quantizer is None:
            return None
        grids = [trainable_grid(q) for q in (holders[0].activation_holder_quantizer, kernel_quantizer,
                                            holders[1].activation_holder_quantizer)]
        kernel = next((value for variable, value in substitutes if variable is self.layer.kernel), None)
        if any(g is None for g in grids) or kernel is None or (self.layer.use_bias and bias is None):
            return None
        return integer_forward(self.layer, inputs, kernel, bias, *grids, getattr(self, "_output_clip", None))

    def compute_output_spec(self, inputs: Any, *args: Any, training: bool | None = None, **kwargs: Any) -> Any:
        return self.layer.compute_output_spec(inputs, *args, **kwargs)

    def compute_mask(self, inputs: Any, mask: Any = None) -> Any:
        return self.layer.compute_mask(inputs, mask)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config["layer"] = keras.saving.serialize_keras_object(self.layer)
        config["weights_quantizers"] = {
            name: keras.saving.serialize_keras_object(q) for name, q in self.weights_quantizers.items()
        }
        config["input_holder"] = self.input_holder
        config["output_holder"] = self.output_holder
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> KerasTrainableQuantizationWrapper:
        config = dict(config)
        layer = keras.saving.deserialize_keras_object(config.pop("layer"))
        quantizers = {
            name: keras.saving.deserialize_keras_object(q) for name, q in config.pop("weights_quantizers").items()
        }
        return cls(layer, quantizers, **config)


class HolderQuantizerAlias:
    """The deprecated `activation_quantizer` attribute of the Keras holders, an alias of
    `activation_holder_quantizer` (the name PyTorch's holders and MCT's use), kept for one release."""

    @property
    def activation_quantizer(self) -> Any:
        """Deprecated: read `activation_holder_quantizer`."""
        warnings.warn(
            f"{type(self).__name__}.activation_quantizer is deprecated and will be removed in the next release; "
            "read activation_holder_quantizer instead",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.activation_holder_quantizer

    def __dir__(self) -> list[str]:
        # Keras' saving walks a layer by getattr on every name dir() lists (saving_lib._walk_saveable): hidden
        # from it, the alias warns only where user code reads it, never on save or load.
        return [name for name in super().__dir__() if name != "activation_quantizer"]


@keras.saving.register_keras_serializable(package=PACKAGE)
class KerasActivationQuantizationHolder(HolderQuantizerAlias, keras.layers.Layer):
    """Fake-quantizes the tensor that flows through it with a trainable activation quantizer.

    The quantizer is the attribute `activation_holder_quantizer` (`activation_quantizer` is its deprecated alias).

    Args:
        activation_quantizer: a `BaseKerasTrainableQuantizer` with target Activation.
        **kwargs: Keras layer arguments.
    """

    def __init__(self, activation_quantizer: BaseKerasTrainableQuantizer, **kwargs: Any):
        if not isinstance(activation_quantizer, BaseKerasTrainableQuantizer):
            raise QuantizationConfigError(
                f"activation_quantizer must be a Keras activation trainable quantizer, got {activation_quantizer!r} "
                f"of type {type(activation_quantizer).__name__}"
            )
        if activation_quantizer.quantization_target is not QuantizationTarget.Activation:
            raise QuantizationConfigError(
                f"activation_quantizer quantizes {activation_quantizer.quantization_target.value}, not Activation: "
                f"{type(activation_quantizer).__name__}"
            )
        # No autocast: the quantizer reads its float32 variables; the op computes in float32 and returns
        # the input's dtype.
        super().__init__(autocast=False, **kwargs)
        self.supports_jit = False  # no XLA: see the note on it in wrappers.py
        self.activation_holder_quantizer = activation_quantizer
        self.supports_masking = True
        self._enabled = activation_quantizer.activation_quantization()
        # Set by `calibrate` and `quantization_report` for the eager calls they make: a function of the input
        # that returns the holder's output, to observe what reaches the holder (or let it pass unquantized).
        self._observer: Callable[[Any], Any] | None = None

    def __call__(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        claim_output_holder(self, inputs, KerasTrainableQuantizationWrapper)
        return super().__call__(inputs, *args, **kwargs)

    def build(self, input_shape: Any) -> None:
        if self._enabled:
            claim_quantizer(self.activation_holder_quantizer, self, "activation_quantizer")
            self.activation_holder_quantizer.initialize_quantization(tuple(input_shape), "activation", self)

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        if not self._enabled:
            return inputs
        # The quantizer reads its variables in float32 under a mixed-precision policy too (see
        # KerasTrainableQuantizationWrapper.call).
        with AutocastScope(None):
            if FINITE_CHECKS.enabled:
                quantizer = self.activation_holder_quantizer
                check_finite_values(f"layer {self.name!r} ({type(quantizer).__name__})", "its input", inputs, quantizer)
            if self._observer is not None:
                return self._observer(inputs)
            return self.activation_holder_quantizer.quantize_inputs(inputs, bool(training))

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def compute_output_spec(self, inputs: Any, training: bool | None = None) -> Any:
        # The input's dtype, as `call` returns (not the compute dtype: a float32 model input stays float32).
        return keras.KerasTensor(inputs.shape, dtype=inputs.dtype)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        # Keyed by the constructor argument, as files saved before the attribute's rename are.
        config["activation_quantizer"] = keras.saving.serialize_keras_object(self.activation_holder_quantizer)
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> KerasActivationQuantizationHolder:
        config = dict(config)
        quantizer = keras.saving.deserialize_keras_object(config.pop("activation_quantizer"))
        return cls(quantizer, **config)
