"""Quantized `keras.layers.MultiHeadAttention`: weight quantizers on its projections, activation quantizers on
both inputs of its two activation products.

Keras' attention computes q = x·W_q (an `EinsumDense` per projection: query, key, value, and the optional gate),
scores = einsum(k, q / sqrt(d)), p = softmax(scores), context = einsum(p, v) and the output projection of the
context. The layers here are `MultiHeadAttention` subclasses whose projections are weights wrappers around those
`EinsumDense` layers and which run activation holders at five points of that computation:

- "query" and "key": the scaled query and the key, the inputs of the score einsum;
- "probabilities" and "value": the attention probabilities (before dropout) and the value, the inputs of the
  context einsum;
- "context": the context, the input of the output projection (no holder there with `use_gate`: the gate's
  product leaves the grid).

Everything else is Keras' own code (masks, the softmax, dropout, shapes), so the layers take every
`MultiHeadAttention` argument. The sublayers are named after the attention layer ("<name>_query",
"<name>_query_activation_quantizer", ...), so that reports and `calibrate` tell the holders of several attention
layers apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras
from keras import ops
from mct_quantizers.keras.quantizers import BaseKerasInferableQuantizer

from trainable_infra.common.einsum import einsum_output_shape
from trainable_infra.common.errors import QuantizationConfigError
from trainable_infra.keras_backend.base_quantizer import BaseKerasTrainableQuantizer
from trainable_infra.keras_backend.inferable_wrappers import (
    KerasInferableActivationQuantizationHolder,
    KerasInferableQuantizationWrapper,
    deserialize_inferable,
    serialize_inferable,
)
from trainable_infra.keras_backend.wrappers import (
    PACKAGE,
    KerasActivationQuantizationHolder,
    KerasTrainableQuantizationWrapper,
    WeightsWrapperBase,
)

# Projection name -> the attribute of `MultiHeadAttention` that holds its `EinsumDense`.
PROJECTIONS = {
    "query": "_query_dense",
    "key": "_key_dense",
    "value": "_value_dense",
    "attention_output": "_output_dense",
    "gate": "_gate_dense",
}
# Activation point -> whether its values can be negative (the probabilities cannot).
ACTIVATION_POINTS = {"query": True, "key": True, "probabilities": False, "value": True, "context": True}
# The two activation products: (operation, the points holding its inputs).
PRODUCTS = {"scores": ("query", "key"), "combine": ("probabilities", "value")}


def _check_keys(argument: str, value: Any, allowed: Mapping[str, Any]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise QuantizationConfigError(f"{argument} must be a dict keyed by {list(allowed)}, got {value!r}")
    unknown = sorted(str(k) for k in value if k not in allowed)
    if unknown:
        raise QuantizationConfigError(f"{argument} has unknown keys {unknown}; allowed keys are {list(allowed)}")
    return dict(value)


class QuantizedAttentionBase(keras.layers.MultiHeadAttention):
    """`MultiHeadAttention` with quantized projections and attention products (see the module's note).

    A subclass says how a projection is wrapped and a point held (`_wrap_projection`, `_make_holder`) and how its
    quantizers are saved.

    Args:
        *args: `MultiHeadAttention`'s arguments (num_heads, key_dim, ...).
        weights_quantizers: projection name ("query", "key", "value", "attention_output", "gate") -> the quantizer
            of its kernel; projections not named stay float.
        activation_quantizers: point name ("query", "key", "probabilities", "value", "context") -> its activation
            quantizer; points not named stay float.
        **kwargs: `MultiHeadAttention`'s keyword arguments.
    """

    def __init__(
        self,
        *args: Any,
        weights_quantizers: Mapping[str, Any] | None = None,
        activation_quantizers: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.weights_quantizers = _check_keys("weights_quantizers", weights_quantizers, PROJECTIONS)
        activation_quantizers = _check_keys("activation_quantizers", activation_quantizers, ACTIVATION_POINTS)
        if "gate" in self.weights_quantizers and not self._use_gate:
            raise QuantizationConfigError(
                f"weights_quantizers names 'gate', but {self.name!r} has no gate projection (use_gate=False)"
            )
        if "context" in activation_quantizers and self._use_gate:
            raise QuantizationConfigError(
                f"activation_quantizers names 'context', but {self.name!r} multiplies the context by its gate before "
                "the output projection (use_gate=True): no quantizer can sit there"
            )
        # One attribute per holder (Keras saves sublayers by attribute; a dict of layers would be saved as a
        # container too), made now so that bad quantizers fail here.
        self._points = tuple(point for point in ACTIVATION_POINTS if point in activation_quantizers)
        for point in self._points:
            setattr(self, f"_{point}_activation_holder", self._make_holder(point, activation_quantizers[point]))

    def _make_holder(self, point: str, quantizer: Any) -> keras.layers.Layer:
        """The holder layer at `point` for `quantizer` (each subclass holds its own kind of quantizer)."""
        raise NotImplementedError(f"{type(self).__name__} must say how it holds an activation quantizer")

    def _wrap_projection(self, name: str, dense: keras.layers.EinsumDense, quantizer: Any) -> keras.layers.Layer:
        """The layer that runs projection `name` (`dense`) with its kernel quantized by `quantizer`."""
        raise NotImplementedError(f"{type(self).__name__} must say how it wraps a projection")

    def holder_name(self, point: str) -> str:
        """The name of the holder at `point` ("<layer>_<point>_activation_quantizer")."""
        return f"{self.name}_{point}_activation_quantizer"

    def activation_holders(self) -> dict[str, keras.layers.Layer]:
        """{point: holder} of the quantized points (a method: Keras would save a property's dict of layers)."""
        return {point: getattr(self, f"_{point}_activation_holder") for point in self._points}

    def projection(self, name: str) -> keras.layers.Layer | None:
        """The layer of projection `name` (a wrapper where it is quantized), None if the layer has none; built
        layers only."""
        return getattr(self, PROJECTIONS[name], None)

    def quantization_layers(self) -> list[keras.layers.Layer]:
        """The wrappers of the quantized projections and the holders, in the order they run (built layers only)."""
        wrappers = [getattr(self, PROJECTIONS[name], None) for name in ("gate", "query", "key", "value")]
        holders = self.activation_holders()
        layers = [w for w in wrappers if isinstance(w, WeightsWrapperBase)]
        layers += [holders[point] for point in ACTIVATION_POINTS if point in holders]
        output = getattr(self, PROJECTIONS["attention_output"], None)
        return layers + ([output] if isinstance(output, WeightsWrapperBase) else [])

    def build(self, query_shape: Any, value_shape: Any, key_shape: Any = None) -> None:
        super().build(query_shape, value_shape, key_shape)
        key_shape = value_shape if key_shape is None else key_shape
        query = self._query_dense.compute_output_shape(query_shape)
        key = self._key_dense.compute_output_shape(key_shape)
        value = self._value_dense.compute_output_shape(value_shape)
        context = einsum_output_shape(self._combine_equation,
                                      einsum_output_shape(self._dot_product_equation, key, query), value)
        inputs = {"query": query_shape, "key": key_shape, "value": value_shape, "gate": query_shape,
                  "attention_output": context}
        for name, attribute in PROJECTIONS.items():
            quantizer = self.weights_quantizers.get(name)
            if quantizer is None:
                continue
            dense = getattr(self, attribute)
            # The wrapper takes the EinsumDense over: tracked once, through the wrapper, as the layer saves it.
            self._tracker.untrack(dense)
            wrapper = self._wrap_projection(name, dense, quantizer)
            wrapper.build(tuple(inputs[name]))
            setattr(self, attribute, wrapper)
        shapes = {"query": query, "key": key, "value": value, "context": context,
                  "probabilities": einsum_output_shape(self._dot_product_equation, key, query)}
        for point, holder in self.activation_holders().items():
            holder.build(tuple(shapes[point]))

    def _hold(self, point: str, x: Any) -> Any:
        return getattr(self, f"_{point}_activation_holder")(x) if point in self._points else x

    def _compute_attention(
        self,
        query: Any,
        key: Any,
        value: Any,
        attention_mask: Any = None,
        training: bool | None = None,
        return_attention_scores: bool = False,
        use_causal_mask: bool = False,
    ) -> tuple[Any, Any]:
        # Keras' explicit attention path (its fused dot_product_attention leaves no place for the holders).
        if use_causal_mask:
            causal = self._compute_causal_mask(query, value)
            attention_mask = causal if attention_mask is None else ops.logical_and(
                ops.cast(attention_mask, "bool"), causal)
        query = ops.multiply(query, ops.cast(self._inverse_sqrt_key_dim, query.dtype))
        scores = ops.einsum(self._dot_product_equation, self._hold("key", key), self._hold("query", query))
        scores = self._masked_softmax(scores, attention_mask)
        # The holder sees the probabilities before dropout rescales them: its range is the one inference sees.
        probabilities = self._hold("probabilities", scores)
        if self._dropout > 0.0:
            probabilities = self._dropout_layer(probabilities, training=training)
        output = ops.einsum(self._combine_equation, probabilities, self._hold("value", value))
        return self._hold("context", output), scores

    def _serialize_quantizer(self, quantizer: Any) -> Any:
        return keras.saving.serialize_keras_object(quantizer)

    @classmethod
    def _deserialize_quantizer(cls, description: Any) -> Any:
        return keras.saving.deserialize_keras_object(description)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config["weights_quantizers"] = {
            name: self._serialize_quantizer(q) for name, q in self.weights_quantizers.items()
        }
        config["activation_quantizers"] = {
            point: self._serialize_quantizer(holder.activation_holder_quantizer)
            for point, holder in self.activation_holders().items()
        }
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> QuantizedAttentionBase:
        config = dict(config)
        for key in ("weights_quantizers", "activation_quantizers"):
            config[key] = {name: cls._deserialize_quantizer(q) for name, q in (config.get(key) or {}).items()}
        return super().from_config(config)


@keras.saving.register_keras_serializable(package=PACKAGE)
class KerasQuantizedMultiHeadAttention(QuantizedAttentionBase):
    """`MultiHeadAttention` that trains with quantized projections and attention products.

    Each quantized projection is a `KerasTrainableQuantizationWrapper` around its `EinsumDense` ("<name>_query",
    ...), each quantized point a `KerasActivationQuantizationHolder` ("<name>_query_activation_quantizer", ...);
    `calibrate`, `freeze_quantizers` and the reports find them as they find the model's own. `quantize_model`
    makes this layer from a float `MultiHeadAttention` (`QATConfig.quantize_matmul_inputs` decides whether the
    products' inputs are quantized); `convert_to_inferable` turns it into a `KerasInferableMultiHeadAttention`.

    Args:
        *args: `MultiHeadAttention`'s arguments (num_heads, key_dim, ...).
        weights_quantizers: projection name ("query", "key", "value", "attention_output", "gate") -> a Keras
            weights trainable quantizer of its kernel.
        activation_quantizers: point name ("query", "key", "probabilities", "value", "context") -> a Keras
            activation trainable quantizer.
        **kwargs: `MultiHeadAttention`'s keyword arguments.

    Example:
        >>> attention = KerasQuantizedMultiHeadAttention(  # doctest: +SKIP
        ...     num_heads=2, key_dim=8, weights_quantizers={"query": STESymmetricWeightQuantizer(config), ...})
    """

    def __init__(
        self,
        *args: Any,
        weights_quantizers: Mapping[str, BaseKerasTrainableQuantizer] | None = None,
        activation_quantizers: Mapping[str, BaseKerasTrainableQuantizer] | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, weights_quantizers=weights_quantizers, activation_quantizers=activation_quantizers,
                         **kwargs)

    def _make_holder(self, point: str, quantizer: Any) -> keras.layers.Layer:
        return KerasActivationQuantizationHolder(quantizer, name=self.holder_name(point))

    def _wrap_projection(self, name: str, dense: keras.layers.EinsumDense, quantizer: Any) -> keras.layers.Layer:
        return KerasTrainableQuantizationWrapper(dense, {"kernel": quantizer}, name=f"{self.name}_{name}")


@keras.saving.register_keras_serializable(package=PACKAGE)
class KerasInferableMultiHeadAttention(QuantizedAttentionBase):
    """The inference counterpart of `KerasQuantizedMultiHeadAttention`, made by `convert_to_inferable`.

    Its projections are `KerasInferableQuantizationWrapper`s and its points
    `KerasInferableActivationQuantizationHolder`s, holding mct-quantizers Keras inferable quantizers.

    Args:
        *args: `MultiHeadAttention`'s arguments.
        weights_quantizers: projection name -> an mct-quantizers Keras inferable weights quantizer.
        activation_quantizers: point name -> an mct-quantizers Keras inferable activation quantizer.
        **kwargs: `MultiHeadAttention`'s keyword arguments.
    """

    def __init__(
        self,
        *args: Any,
        weights_quantizers: Mapping[str, BaseKerasInferableQuantizer] | None = None,
        activation_quantizers: Mapping[str, BaseKerasInferableQuantizer] | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, weights_quantizers=weights_quantizers, activation_quantizers=activation_quantizers,
                         **kwargs)

    def _make_holder(self, point: str, quantizer: Any) -> keras.layers.Layer:
        return KerasInferableActivationQuantizationHolder(quantizer, name=self.holder_name(point))

    def _wrap_projection(self, name: str, dense: keras.layers.EinsumDense, quantizer: Any) -> keras.layers.Layer:
        return KerasInferableQuantizationWrapper(dense, {"kernel": quantizer}, name=f"{self.name}_{name}")

    def _serialize_quantizer(self, quantizer: Any) -> Any:
        return serialize_inferable(quantizer)

    @classmethod
    def _deserialize_quantizer(cls, description: Any) -> Any:
        return deserialize_inferable(description)


def float_attention_config(layer: keras.layers.MultiHeadAttention) -> dict[str, Any]:
    """The `MultiHeadAttention` arguments of `layer` (its config without quantizers)."""
    config = layer.get_config()
    config.pop("weights_quantizers", None)
    config.pop("activation_quantizers", None)
    return config


def copy_attention_weights(source: keras.layers.MultiHeadAttention, target: keras.layers.MultiHeadAttention) -> None:
    """Copy the projections' weights of `source` into `target` (built attention layers with the same arguments,
    float or quantized): the quantizers' own variables are not copied."""
    for attribute in PROJECTIONS.values():
        layer = getattr(source, attribute, None)
        if layer is None:
            continue
        new = getattr(target, attribute)
        new = new.layer if isinstance(new, WeightsWrapperBase) else new
        new.set_weights((layer.layer if isinstance(layer, WeightsWrapperBase) else layer).get_weights())
