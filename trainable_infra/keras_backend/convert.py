"""Convert a trained Keras model to an inference model built from mct-quantizers' Keras inferable quantizers."""

from __future__ import annotations

import keras

# The class of Functional models; keras.models.clone_model (which this module relies on) tests for it the same way.
from keras.src.models.functional import Functional
from mct_quantizers.keras.quantizers import BaseKerasInferableQuantizer

from trainable_infra.common.errors import QuantizationConfigError, QuantizerDefinitionError
from trainable_infra.keras_backend.attention import (
    KerasInferableMultiHeadAttention,
    KerasQuantizedMultiHeadAttention,
    copy_attention_weights,
    float_attention_config,
)
from trainable_infra.keras_backend.base_quantizer import BaseKerasTrainableQuantizer
from trainable_infra.keras_backend.calibrate import all_layers
from trainable_infra.keras_backend.inferable_wrappers import (
    KerasInferableActivationQuantizationHolder,
    KerasInferableQuantizationWrapper,
)
from trainable_infra.keras_backend.quantize import copy_layer
from trainable_infra.keras_backend.wrappers import KerasActivationQuantizationHolder, KerasTrainableQuantizationWrapper


def inferable_of(quantizer: BaseKerasTrainableQuantizer) -> BaseKerasInferableQuantizer:
    """`quantizer.convert2inferable()`, checked to be an mct-quantizers Keras inferable quantizer."""
    inferable = quantizer.convert2inferable()
    if not isinstance(inferable, BaseKerasInferableQuantizer):
        raise QuantizerDefinitionError(
            f"{type(quantizer).__name__}.convert2inferable() must return an mct-quantizers Keras inferable quantizer "
            f"(a BaseKerasInferableQuantizer), got {inferable!r} of type {type(inferable).__name__}"
        )
    return inferable


def _inferable_layer(layer: keras.Operation) -> keras.Operation:
    """The inference counterpart of one layer or operation of the trained model (not yet holding weights)."""
    try:
        return _make_inferable_layer(layer)
    except Exception as exc:
        # The error keeps its type and message; the note says which layer failed.
        exc.add_note(f"raised while converting layer {layer.name!r} ({type(layer).__name__}); the input model is "
                     "unchanged")
        raise


def _make_inferable_layer(layer: keras.Operation) -> keras.Operation:
    if isinstance(layer, KerasTrainableQuantizationWrapper):
        quantizers = {
            name: inferable_of(quantizer)
            for name, quantizer in layer.weights_quantizers.items()
            if quantizer.weights_quantization()
        }
        return KerasInferableQuantizationWrapper(copy_layer(layer.layer), quantizers, input_holder=layer.input_holder,
                                                 output_holder=layer.output_holder, name=layer.name)
    if isinstance(layer, KerasActivationQuantizationHolder):
        quantizer = layer.activation_holder_quantizer
        if not quantizer.activation_quantization():
            return keras.layers.Identity(name=layer.name)
        return KerasInferableActivationQuantizationHolder(inferable_of(quantizer), name=layer.name)
    if isinstance(layer, KerasQuantizedMultiHeadAttention):
        weights = {name: inferable_of(q) for name, q in layer.weights_quantizers.items() if q.weights_quantization()}
        activations = {
            point: inferable_of(holder.activation_holder_quantizer)
            for point, holder in layer.activation_holders().items()
            if holder.activation_holder_quantizer.activation_quantization()
        }
        return KerasInferableMultiHeadAttention(
            **float_attention_config(layer), weights_quantizers=weights, activation_quantizers=activations
        )
    return copy_layer(layer)


def convert_to_inferable(model: keras.Model) -> keras.Model:
    """Return a new model in which every trainable quantizer is replaced by its mct-quantizers inferable quantizer.

    Weights wrappers become `KerasInferableQuantizationWrapper`, activation holders
    `KerasInferableActivationQuantizationHolder` (an `Identity` where quantization is disabled); every other
    layer is copied with its weights; a bias the trained wrapper rounds to its integer grid (`QATConfig.integer_bias`)
    is stored rounded. The input model is not changed. The result predicts what the trained model predicts in
    inference and saves to `.keras`.

    Args:
        model: a built Sequential or Functional Keras model (nested ones are converted too).

    Returns:
        The inference model.
    """
    if not isinstance(model, keras.Model):
        raise QuantizationConfigError(
            f"convert_to_inferable expects a Keras model, got {model!r} of type {type(model).__name__}"
        )
    if not isinstance(model, (keras.Sequential, Functional)):
        raise QuantizationConfigError(
            f"convert_to_inferable supports Sequential and Functional models; {type(model).__name__} "
            f"{model.name!r} is a subclassed model, whose layer graph cannot be rebuilt"
        )
    if not model.built:
        raise QuantizationConfigError(
            f"model {model.name!r} is not built: call it on data or give it an Input before converting"
        )
    trainable = (KerasTrainableQuantizationWrapper, KerasActivationQuantizationHolder)
    if not any(isinstance(layer, trainable) for layer in all_layers(model)):
        raise QuantizationConfigError(
            f"model {model.name!r} has no trainable quantization wrapper or holder: quantize it with quantize_model "
            "(or wrap its layers) and train it before converting"
        )
    pairs: list[tuple[keras.layers.Layer, keras.layers.Layer]] = []

    def clone_function(layer: keras.Operation) -> keras.Operation:
        new = _inferable_layer(layer)
        # clone_model hands over the stateless keras.ops operations of a Functional model too (the `Add` of
        # `x + 3.0`): they are copied and hold no weights.
        if isinstance(layer, keras.layers.Layer):
            pairs.append((layer, new))
        return new

    converted = keras.models.clone_model(model, clone_function=clone_function, recursive=True)
    for old, new in pairs:
        # The quantizers' own variables are baked into the inferable quantizers; only the layers' weights move.
        if isinstance(old, KerasTrainableQuantizationWrapper):
            new.layer.set_weights(old.layer.get_weights())
            bias = old.integer_bias() if old.input_holder is not None and old.built else None
            if bias is not None:
                # The rounded bias is baked in: the inference layer adds the values the trained one adds.
                new.layer.bias.assign(bias)
        elif isinstance(old, KerasQuantizedMultiHeadAttention):
            copy_attention_weights(old, new)
        elif not isinstance(old, KerasActivationQuantizationHolder):
            new.set_weights(old.get_weights())
    return converted
