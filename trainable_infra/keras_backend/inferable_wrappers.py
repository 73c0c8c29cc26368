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
from trainable_infra.keras_backend.integer import inferable_grid, integer_forward, integer_kernel_applies
from trainable_infra.keras_backend.wrappers import (
    PACKAGE,
    HolderQuantizerAlias,
    QuantizedWeight,
    WeightsWrapperBase,
    call_with_weights,
    claim_output_holder,
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

    With `input_holder` and `output_holder` (what `convert_to_inferable` carries over from the trained wrapper) a
    Conv2D, DepthwiseConv2D or Dense layer computes as TFLite's int8 kernel does (`integer.integer_forward`), as
    the trained wrapper does in inference.

    Args:
        layer: the Keras layer to wrap.
        weights_quantizers: attribute name of a layer variable -> an mct-quantizers `BaseKerasInferableQuantizer`.
        input_holder: the name of the `KerasInferableActivationQuantizationHolder` whose output the layer reads
            (directly or through `VALUE_PRESERVING_LAYERS`), or None.
        output_holder: the name of the one that quantizes the layer's output (directly or after a ReLU), or None.
        **kwargs: Keras layer arguments (`name` defaults to "quant_" + the layer's name).
    """

    quantizer_base = BaseKerasInferableQuantizer
    quantizer_kind = "mct-quantizers Keras inferable quantizer"

    def __init__(
        self,
        layer: keras.layers.Layer,
        weights_quantizers: Mapping[str, Any],
        input_holder: str | None = None,
        output_holder: str | None = None,
        **kwargs: Any,
    ):
        super().__init__(layer, weights_quantizers, input_holder, output_holder, **kwargs)

    def build(self, input_shape: Any) -> None:
        if not self.layer.built:
            self.layer.build(input_shape)
        self._quantized_weights = tuple(
            QuantizedWeight(name, layer_variable(self.layer, name, "weights_quantizers"), quantizer)
            for name, quantizer in self.weights_quantizers.items()
        )

    def _quantize(self, weight: QuantizedWeight, training: bool) -> Any:
        # An inferable quantizer has no training mode.
        return weight.quantizer(tf.convert_to_tensor(weight.variable))

    def call(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        substitutes = [(w.variable, self._quantize(w, False)) for w in self._quantized_weights]
        if not args and not kwargs:
            integer = self._integer_output(inputs, substitutes)
            if integer is not None:
                return integer
        outputs, losses = call_with_weights(self.layer, substitutes, (inputs, *args), kwargs)
        if losses:
            self.add_loss(losses)
        return outputs

    def _integer_output(self, inputs: Any, substitutes: list) -> Any:
        """As `KerasTrainableQuantizationWrapper._integer_output`, from the inferable quantizers' ranges."""
        holders = [ref() if ref is not None else None for ref in (self._input_holder_ref, self._output_holder_ref)]
        kernel_quantizer = self.weights_quantizers.get("kernel")
        if any(h is None for h in holders) or kernel_quantizer is None or not integer_kernel_applies(self.layer):
            return None
        grids = [inferable_grid(q) for q in (holders[0].activation_holder_quantizer, kernel_quantizer,
                                            holders[1].activation_holder_quantizer)]
        kernel = next((value for variable, value in substitutes if variable is self.layer.kernel), None)
        if any(g is None for g in grids) or kernel is None:
            return None
        bias = tf.convert_to_tensor(self.layer.bias) if self.layer.use_bias else None
        return integer_forward(self.layer, inputs, kernel, bias, *grids, getattr(self, "_output_clip", None))

    def compute_output_spec(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        return self.layer.compute_output_spec(inputs, *args, **kwargs)

    def compute_mask(self, inputs: Any, mask: Any = None) -> Any:
        return self.layer.compute_mask(inputs, mask)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config["layer"] = keras.saving.serialize_keras_object(self.layer)
        config["weights_quantizers"] = {name: serialize_inferable(q) for name, q in self.weights_quantizers.items()}
        config["input_holder"] = self.input_holder
        config["output_holder"] = self.output_holder
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> KerasInferableQuantizationWrapper:
        config = dict(config)
        layer = keras.saving.deserialize_keras_object(config.pop("layer"))
        quantizers = {name: deserialize_inferable(q) for name, q in config.pop("weights_quantizers").items()}
        return cls(layer, quantizers, **config)


@keras.saving.register_keras_serializable(package=PACKAGE)
class KerasInferableActivationQuantizationHolder(HolderQuantizerAlias, keras.layers.Layer):
    """Fake-quantizes the tensor that flows through it with an mct-quantizers Keras inferable quantizer.

    The quantizer is the attribute `activation_holder_quantizer` (`activation_quantizer` is its deprecated alias).

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
        self.activation_holder_quantizer = activation_quantizer
        self.supports_masking = True

    def __call__(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        claim_output_holder(self, inputs, KerasInferableQuantizationWrapper)
        return super().__call__(inputs, *args, **kwargs)

    def call(self, inputs: Any) -> Any:
        return _inferable_call(self.activation_holder_quantizer, inputs)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        # Keyed by the constructor argument, as files saved before the attribute's rename are.
        config["activation_quantizer"] = serialize_inferable(self.activation_holder_quantizer)
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> KerasInferableActivationQuantizationHolder:
        config = dict(config)
        quantizer = deserialize_inferable(config.pop("activation_quantizer"))
        return cls(quantizer, **config)


# Set here: the holder class is defined after the wrapper that reads its output.
KerasInferableQuantizationWrapper.holder_class = KerasInferableActivationQuantizationHolder
