"""Convert a trained Keras model to an inference model built from mct-quantizers' Keras inferable quantizers."""

from __future__ import annotations

import keras

# The class of Functional models; keras.models.clone_model (which this module relies on) tests for it the same way.
from keras.src.models.functional import Functional

from trainable_infra.common.errors import QuantizationConfigError, TrainableInfraError
from trainable_infra.keras_backend.calibrate import all_layers
from trainable_infra.keras_backend.inferable_wrappers import (
    KerasInferableActivationQuantizationHolder,
    KerasInferableQuantizationWrapper,
)
from trainable_infra.keras_backend.wrappers import KerasActivationQuantizationHolder, KerasTrainableQuantizationWrapper


def _clone(layer: keras.layers.Layer) -> keras.layers.Layer:
    return layer.__class__.from_config(layer.get_config())


def _inferable_layer(layer: keras.layers.Layer) -> keras.layers.Layer:
    """The inference counterpart of one layer of the trained model (not yet holding weights)."""
    if isinstance(layer, KerasTrainableQuantizationWrapper):
        quantizers = {
            name: quantizer.convert2inferable()
            for name, quantizer in layer.weights_quantizers.items()
            if quantizer.weights_quantization()
        }
        return KerasInferableQuantizationWrapper(_clone(layer.layer), quantizers, name=layer.name)
    if isinstance(layer, KerasActivationQuantizationHolder):
        quantizer = layer.activation_quantizer
        if not quantizer.activation_quantization():
            return keras.layers.Identity(name=layer.name)
        return KerasInferableActivationQuantizationHolder(quantizer.convert2inferable(), name=layer.name)
    return _clone(layer)


def convert_to_inferable(model: keras.Model) -> keras.Model:
    """Return a new model in which every trainable quantizer is replaced by its mct-quantizers inferable quantizer.

    Weights wrappers become `KerasInferableQuantizationWrapper`, activation holders
    `KerasInferableActivationQuantizationHolder` (an `Identity` where quantization is disabled); every other
    layer is copied with its weights. The input model is not changed. The result predicts what the trained
    model predicts in inference and saves to `.keras`.

    Args:
        model: a built Sequential or Functional Keras model (nested ones are converted too).

    Returns:
        The inference model.
    """
    if not isinstance(model, keras.Model):
        raise TrainableInfraError(
            f"convert_to_inferable expects a Keras model, got {model!r} of type {type(model).__name__}"
        )
    if not isinstance(model, (keras.Sequential, Functional)):
        raise TrainableInfraError(
            f"convert_to_inferable supports Sequential and Functional models; {type(model).__name__} "
            f"{model.name!r} is a subclassed model, whose layer graph cannot be rebuilt"
        )
    if not model.built:
        raise TrainableInfraError(
            f"model {model.name!r} is not built: call it on data or give it an Input before converting"
        )
    trainable = (KerasTrainableQuantizationWrapper, KerasActivationQuantizationHolder)
    if not any(isinstance(layer, trainable) for layer in all_layers(model)):
        raise QuantizationConfigError(
            f"model {model.name!r} has no trainable quantization wrapper or holder: quantize it with quantize_model "
            "(or wrap its layers) and train it before converting"
        )
    pairs: list[tuple[keras.layers.Layer, keras.layers.Layer]] = []

    def clone_function(layer: keras.layers.Layer) -> keras.layers.Layer:
        new = _inferable_layer(layer)
        pairs.append((layer, new))
        return new

    converted = keras.models.clone_model(model, clone_function=clone_function, recursive=True)
    for old, new in pairs:
        # The quantizers' own variables are baked into the inferable quantizers; only the layers' weights move.
        if isinstance(old, KerasTrainableQuantizationWrapper):
            new.layer.set_weights(old.layer.get_weights())
        elif not isinstance(old, KerasActivationQuantizationHolder):
            new.set_weights(old.get_weights())
    return converted
