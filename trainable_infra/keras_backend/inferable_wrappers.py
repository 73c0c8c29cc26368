"""Keras 3 layers holding mct-quantizers' Keras inferable quantizers: what `convert_to_inferable` builds.

mct-quantizers' own Keras wrappers need Keras 2; its inferable quantizers are plain callables on float32
TensorFlow tensors and run unchanged inside these Keras 3 layers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras
import tensorflow as tf
from mct_quantizers.common.get_all_subclasses import get_all_subclasses
from mct_quantizers.keras.quantizers import BaseKerasInferableQuantizer

from trainable_infra.common.errors import QuantizationConfigError
from trainable_infra.keras_backend.wrappers import (
    PACKAGE,
    QuantizedWeight,
    WeightsWrapperBase,
    call_with_weights,
    layer_variable,
)


def serialize_inferable(quantizer: BaseKerasInferableQuantizer) -> dict[str, Any]:
    """A JSON-serializable description of an mct-quantizers Keras inferable quantizer."""
    return {"class_name": type(quantizer).__name__, "config": quantizer.get_config()}


def deserialize_inferable(description: Any) -> BaseKerasInferableQuantizer:
    """Rebuild an inferable quantizer from `serialize_inferable`'s output.

    Only subclasses of mct-quantizers' `BaseKerasInferableQuantizer` are looked up (by class name), so a file
    can name nothing else.
    """
    if not isinstance(description, Mapping) or not isinstance(description.get("class_name"), str):
        raise QuantizationConfigError(
            f"an inferable quantizer must be described as {{'class_name': str, 'config': dict}}, got {description!r}"
        )
    name = description["class_name"]
    classes = {cls.__name__: cls for cls in get_all_subclasses(BaseKerasInferableQuantizer)}
    if name not in classes:
        raise QuantizationConfigError(
            f"unknown inferable quantizer class {name!r}; known mct-quantizers Keras inferable quantizers are "
            f"{sorted(classes)}"
        )
    return classes[name].from_config(dict(description.get("config") or {}))


def _inferable_call(quantizer: BaseKerasInferableQuantizer, inputs: Any) -> Any:
    """Apply an inferable quantizer, which needs float32, to a tensor of any float dtype."""
    if inputs.dtype == "float32":
        return quantizer(inputs)
    return keras.ops.cast(quantizer(keras.ops.cast(inputs, "float32")), inputs.dtype)


@keras.saving.register_keras_serializable(package=PACKAGE)
class KerasInferableQuantizationWrapper(WeightsWrapperBase):
    """Runs a layer with its weights fake-quantized by mct-quantizers Keras inferable quantizers.

    Args:
        layer: the Keras layer to wrap.
        weights_quantizers: attribute name of a layer variable -> an mct-quantizers `BaseKerasInferableQuantizer`.
        **kwargs: Keras layer arguments (`name` defaults to "quant_" + the layer's name).
    """

    quantizer_base = BaseKerasInferableQuantizer
    quantizer_kind = "mct-quantizers Keras inferable quantizer"

    def build(self, input_shape: Any) -> None:
        if not self.layer.built:
            self.layer.build(input_shape)
        self._quantized_weights = tuple(
            QuantizedWeight(name, layer_variable(self.layer, name, "weights_quantizers"), quantizer)
            for name, quantizer in self.weights_quantizers.items()
        )

    def call(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        substitutes = [(w.variable, w.quantizer(tf.convert_to_tensor(w.variable))) for w in self._quantized_weights]
        outputs, losses = call_with_weights(self.layer, substitutes, (inputs, *args), kwargs)
        if losses:
            self.add_loss(losses)
        return outputs

    def compute_output_spec(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        return self.layer.compute_output_spec(inputs, *args, **kwargs)

    def compute_mask(self, inputs: Any, mask: Any = None) -> Any:
        return self.layer.compute_mask(inputs, mask)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config["layer"] = keras.saving.serialize_keras_object(self.layer)
        config["weights_quantizers"] = {name: serialize_inferable(q) for name, q in self.weights_quantizers.items()}
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> KerasInferableQuantizationWrapper:
        config = dict(config)
        layer = keras.saving.deserialize_keras_object(config.pop("layer"))
        quantizers = {name: deserialize_inferable(q) for name, q in config.pop("weights_quantizers").items()}
        return cls(layer, quantizers, **config)


@keras.saving.register_keras_serializable(package=PACKAGE)
class KerasInferableActivationQuantizationHolder(keras.layers.Layer):
    """Fake-quantizes the tensor that flows through it with an mct-quantizers Keras inferable quantizer.

    Args:
        activation_quantizer: an mct-quantizers `BaseKerasInferableQuantizer` of activations.
        **kwargs: Keras layer arguments.
    """

    def __init__(self, activation_quantizer: BaseKerasInferableQuantizer, **kwargs: Any):
        if not isinstance(activation_quantizer, BaseKerasInferableQuantizer):
            raise QuantizationConfigError(
                f"activation_quantizer must be an mct-quantizers Keras inferable quantizer, got "
                f"{activation_quantizer!r} of type {type(activation_quantizer).__name__}"
            )
        super().__init__(autocast=False, **kwargs)
        self.supports_jit = False  # no XLA: see the note on it in wrappers.py
        self.activation_quantizer = activation_quantizer
        self.supports_masking = True

    def call(self, inputs: Any) -> Any:
        return _inferable_call(self.activation_quantizer, inputs)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config["activation_quantizer"] = serialize_inferable(self.activation_quantizer)
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> KerasInferableActivationQuantizationHolder:
        config = dict(config)
        quantizer = deserialize_inferable(config.pop("activation_quantizer"))
        return cls(quantizer, **config)
