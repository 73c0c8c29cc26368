"""quantize_model inlines nested Sequential and Functional models: their layers become layers of the QAT model."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from trainable_infra import QATConfig
from trainable_infra.keras_backend import (
    KerasTrainableQuantizationWrapper,
    convert_to_inferable,
    quantization_coverage,
    quantize_model,
)

X = np.random.default_rng(0).normal(size=(32, 8, 8, 3)).astype(np.float32)
Y = np.arange(32) % 5


def _stem() -> keras.Sequential:
    return keras.Sequential([
        keras.Input((8, 8, 3)),
        keras.layers.Conv2D(4, 3, padding="same", name="stem_conv"),
        keras.layers.LayerNormalization(name="stem_norm"),
    ], name="stem")


def _block(conv_name: str = "block_conv") -> keras.Model:
    inputs = keras.Input((8, 8, 4), name="block_in")
    y = keras.layers.Conv2D(4, 3, padding="same", name=conv_name)(inputs)
    y = keras.layers.BatchNormalization(name="block_bn")(y)
    y = keras.layers.ReLU(name="block_relu")(y)
    return keras.Model(inputs, keras.layers.Add(name="block_add")([y, inputs]), name="block")


def _outer(stem: keras.Model, block: keras.Model) -> keras.Model:
    inputs = keras.Input((8, 8, 3), name="x")
    y = keras.layers.GlobalAveragePooling2D(name="pool")(block(stem(inputs)))
    return keras.Model(inputs, keras.layers.Dense(5, name="fc")(y), name="outer")


def _wrapped(model: keras.Model) -> list[str]:
    return sorted(layer.name for layer in model.layers if isinstance(layer, KerasTrainableQuantizationWrapper))


def test_nested_sequential_and_functional_models_are_inlined(tmp_path):
    keras.utils.set_random_seed(1)
    stem, block = _stem(), _block()
    model = _outer(stem, block)
    nodes = {layer.name: len(layer._inbound_nodes) for layer in [*stem.layers, *block.layers]}
    float_out = model.predict(X, verbose=0)

    qat = quantize_model(model, QATConfig(weight_n_bits=4), X, progress=False)

    assert _wrapped(qat) == ["block_conv", "fc", "stem_conv"]
    assert not any(isinstance(layer, keras.Model) for layer in qat.layers)
    assert "block_bn" not in [layer.name for layer in qat.layers]  # folded into block_conv, as in an outer model
    assert quantization_coverage(qat, X).quantized_share == 1.0
    # The float model is untouched: its layers got no calls of the QAT model and compute what they did.
    assert {layer.name: len(layer._inbound_nodes) for layer in [*stem.layers, *block.layers]} == nodes
    np.testing.assert_array_equal(model.predict(X, verbose=0), float_out)

    qat.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    qat.fit(X, Y, batch_size=16, epochs=1, verbose=0)
    expected = qat(X, training=False).numpy()
    np.testing.assert_array_equal(convert_to_inferable(qat)(X, training=False).numpy(), expected)
    qat.save(tmp_path / "nested.keras")
    loaded = keras.models.load_model(tmp_path / "nested.keras")  # safe mode
    np.testing.assert_array_equal(loaded(X, training=False).numpy(), expected)


def test_nested_sequential_in_a_sequential_model_is_inlined():
    model = keras.Sequential([
        keras.Input((8, 8, 3)), _stem(), keras.layers.Flatten(name="flat"), keras.layers.Dense(5, name="fc"),
    ], name="outer_sequential")
    qat = quantize_model(model, QATConfig(), X, progress=False)
    assert isinstance(qat, keras.Sequential)
    assert _wrapped(qat) == ["fc", "stem_conv"]
    assert quantization_coverage(qat, X).quantized_share == 1.0


def test_nested_model_called_twice_stays_float():
    shared = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(3, 1, name="shared_conv")], name="shared")
    inputs = keras.Input((8, 8, 3), name="x")
    y = keras.layers.Flatten(name="flat")(shared(shared(inputs)))
    model = keras.Model(inputs, keras.layers.Dense(5, name="fc")(y))
    with pytest.warns(UserWarning, match="contains the model 'shared', which is kept in float: it is called 2 times"):
        qat = quantize_model(model, QATConfig(), X, progress=False)
    assert _wrapped(qat) == ["fc"]
    assert qat.get_layer("shared") is not shared  # a copy, in float
    np.testing.assert_allclose(qat.predict(X, verbose=0), model.predict(X, verbose=0), atol=0.1)


def test_nested_model_with_a_layer_named_like_an_outer_layer_stays_float():
    model = _outer(_stem(), _block(conv_name="fc"))
    with pytest.warns(UserWarning, match=r"'block', which is kept in float: its layers \['fc'\] are named like"):
        qat = quantize_model(model, QATConfig(), X, progress=False)
    assert _wrapped(qat) == ["fc", "stem_conv"]


def test_skip_override_on_a_nested_model_keeps_it_float():
    qat = quantize_model(_outer(_stem(), _block()), QATConfig(overrides={"block": {"skip": True}}), X,
                         progress=False)
    assert _wrapped(qat) == ["fc", "stem_conv"]
    assert isinstance(qat.get_layer("block"), keras.Model)
