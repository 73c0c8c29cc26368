"""quantize_model splits separable convolutions into a quantized depthwise and a 1x1 pointwise convolution."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import layers

from trainable_infra import QATConfig
from trainable_infra.keras_backend import (
    KerasTrainableQuantizationWrapper,
    convert_to_inferable,
    export_tflite,
    quantization_coverage,
    quantize_model,
)
from trainable_infra.keras_backend.export import tflite_kernels

X = np.random.default_rng(0).normal(size=(8, 8, 8, 3)).astype("float32")


def separable_model(depth_multiplier: int = 1) -> keras.Model:
    """SeparableConv2D -> BatchNormalization -> ReLU, with trained-looking BatchNorm statistics."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3), name="image")
    x = layers.SeparableConv2D(6, 3, strides=2, padding="same", depth_multiplier=depth_multiplier, name="sep")(inputs)
    x = layers.BatchNormalization(name="bn")(x)
    x = layers.ReLU(name="relu")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    model = keras.Model(inputs, layers.Dense(4, name="fc")(x))
    rng = np.random.default_rng(1)
    bn = model.get_layer("bn")
    bn.moving_mean.assign(rng.normal(size=6).astype("float32"))
    bn.moving_variance.assign(rng.uniform(0.5, 2.0, size=6).astype("float32"))
    bn.beta.assign(rng.normal(size=6).astype("float32"))
    return model


@pytest.fixture(scope="module")
def models():
    model = separable_model()
    return model, quantize_model(model, QATConfig(), X, progress=False)


def test_parts_replace_the_separable_conv_and_the_batch_norm_folds_into_the_pointwise_part(models):
    model, qat = models
    names = [layer.name for layer in qat.layers]
    assert "sep" not in names
    assert "bn" not in names
    depthwise, pointwise = qat.get_layer("sep_depthwise"), qat.get_layer("sep_pointwise")
    assert isinstance(depthwise.layer, layers.DepthwiseConv2D)
    assert isinstance(pointwise.layer, layers.Conv2D)
    assert depthwise.layer.strides == (2, 2)
    assert depthwise.layer.padding == "same"
    assert not depthwise.layer.use_bias
    assert pointwise.layer.kernel_size == (1, 1)
    assert depthwise.weights_quantizers["kernel"].axis == 2
    assert pointwise.weights_quantizers["kernel"].axis == 3
    assert "sep_depthwise_activation_quantizer" in names
    assert pointwise.input_holder == "sep_depthwise_activation_quantizer"
    assert [layer.name for layer in model.layers] == ["image", "sep", "bn", "relu", "pool", "fc"]


def test_float_parts_compute_the_separable_conv():
    model = separable_model(depth_multiplier=2)
    qat = quantize_model(model, QATConfig(fold_batch_norm=False), X, progress=False)
    depthwise, pointwise = qat.get_layer("sep_depthwise").layer, qat.get_layer("sep_pointwise").layer
    np.testing.assert_allclose(pointwise(depthwise(X)), model.get_layer("sep")(X), atol=1e-5)


def test_coverage_is_complete(models):
    _, qat = models
    coverage = quantization_coverage(qat, X)
    assert coverage.quantized_share == 1.0, coverage.format()


def test_converts_exactly_reloads_identically_and_exports_int8_kernels(models, tmp_path):
    _, qat = models
    expected = np.asarray(qat(X, training=False))
    converted = convert_to_inferable(qat)
    np.testing.assert_array_equal(np.asarray(converted(X, training=False)), expected)
    qat.save(tmp_path / "qat.keras")
    reloaded = keras.models.load_model(tmp_path / "qat.keras", safe_mode=True)
    np.testing.assert_array_equal(np.asarray(reloaded(X, training=False)), expected)
    report = export_tflite(converted, tmp_path / "sep.tflite", X)
    assert report.identical == 1.0
    kernels = tflite_kernels(tmp_path / "sep.tflite")
    assert ("DEPTHWISE_CONV_2D", "int8") in kernels
    assert ("CONV_2D", "int8") in kernels


def test_overrides_on_the_separable_name_apply_to_both_parts_and_skip_keeps_it_whole():
    model = separable_model()
    qat = quantize_model(model, QATConfig(overrides={"sep": {"weight_n_bits": 4}}), X, progress=False)
    for part in ("sep_depthwise", "sep_pointwise"):
        assert qat.get_layer(part).weights_quantizers["kernel"].quantization_config.weights_n_bits == 4
    skipped = quantize_model(model, QATConfig(overrides={"sep": {"skip": True}}), X, progress=False)
    assert isinstance(skipped.get_layer("sep"), layers.SeparableConv2D)
    assert not isinstance(skipped.get_layer("sep"), KerasTrainableQuantizationWrapper)
    assert "sep_depthwise" not in [layer.name for layer in skipped.layers]


def test_separable_conv1d_in_a_sequential_model_splits():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((10, 3)), layers.SeparableConv1D(4, 3, activation="relu", name="sep1d")])
    sequence = np.random.default_rng(2).normal(size=(8, 10, 3)).astype("float32")
    qat = quantize_model(model, QATConfig(), sequence, progress=False)
    assert isinstance(qat, keras.Sequential)
    assert isinstance(qat.get_layer("sep1d_depthwise").layer, layers.DepthwiseConv1D)
    assert isinstance(qat.get_layer("sep1d_pointwise").layer, layers.Conv1D)
    assert quantization_coverage(qat, sequence).quantized_share == 1.0
