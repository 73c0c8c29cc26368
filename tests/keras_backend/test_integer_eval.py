"""Integer eval computation (`keras_backend.integer`): a quantized Conv2D / DepthwiseConv2D / Dense between two
holders computes in inference as TFLite's int8 kernel (XNNPACK) does, in the trained and in the converted model.

Oracle: numpy, float64 integer accumulator of the integers on the grids, float32 requantization scale
float32(Δ_in·Δ_w) / Δ_out, rounding half to even, clamping to the output grid; and the TFLite interpreter itself
on a trained model (benchmarks/fidelity.py --backend keras has the table).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import layers

from trainable_infra import QATConfig
from trainable_infra.common.digits import load_digits_split
from trainable_infra.keras_backend import (
    KerasTrainableQuantizationWrapper,
    convert_to_inferable,
    export_tflite,
    quantize_model,
)
from trainable_infra.keras_backend.demo import train
from trainable_infra.keras_backend.integer import trainable_grid
from trainable_infra.keras_backend.wrappers import KerasActivationQuantizationHolder

X = np.random.default_rng(0).uniform(-1.0, 1.0, size=(16, 6, 6, 3)).astype(np.float32)


def _model(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6, 6, 3), name="x")
    x = layers.Conv2D(8, 3, padding="same", name="conv")(inputs)
    x = layers.ReLU(name="relu")(x)
    x = layers.DepthwiseConv2D(3, depth_multiplier=2, strides=2, activation="relu", name="depthwise")(x)
    x = layers.Flatten(name="flat")(x)
    return keras.Model(inputs, layers.Dense(5, name="head")(x), name="integer_eval")


def _grid_values(grid):
    return (grid.step.numpy().astype(np.float32), grid.k_min.numpy(), grid.k_max.numpy())


@pytest.fixture(scope="module")
def qat():
    return quantize_model(_model(), QATConfig(weight_n_bits=4, activation_n_bits=6), [X], progress=False)


def test_wrappers_between_holders_know_both(qat):
    wrappers = {layer.name: layer for layer in qat.layers if isinstance(layer, KerasTrainableQuantizationWrapper)}
    assert {name: (w.input_holder, w.output_holder) for name, w in wrappers.items()} == {
        "conv": ("x_activation_quantizer", "conv_activation_quantizer"),  # through the ReLU layer
        "depthwise": ("conv_activation_quantizer", "depthwise_activation_quantizer"),
        "head": ("depthwise_activation_quantizer", "head_activation_quantizer"),  # through the Flatten
    }
    assert all(w._output_holder_ref() is qat.get_layer(w.output_holder) for w in wrappers.values())


@pytest.mark.parametrize("name", ["conv", "depthwise", "head"])
def test_eval_output_is_the_requantized_integer_accumulator(qat, name):
    wrapper = qat.get_layer(name)
    source = qat.get_layer(wrapper.input_holder)
    inputs = keras.ops.convert_to_numpy(keras.Model(qat.inputs, source.output)(X))
    if name == "head":
        inputs = inputs.reshape(len(inputs), -1)
    in_step, _, _ = _grid_values(trainable_grid(source.activation_holder_quantizer))
    w_step, _, _ = _grid_values(trainable_grid(wrapper.weights_quantizers["kernel"]))
    output_quantizer = qat.get_layer(wrapper.output_holder).activation_holder_quantizer
    out_step, k_min, k_max = _grid_values(trainable_grid(output_quantizer))
    kernel = wrapper.weights_quantizers["kernel"](wrapper.layer.kernel, False).numpy()
    x_int = np.round(inputs / in_step).astype(np.float64)
    if name == "depthwise":
        w_int = np.round(kernel / w_step[:, None]).astype(np.float64)
        acc = keras.ops.convert_to_numpy(keras.ops.depthwise_conv(x_int, w_int, 2, "valid"))
        product = np.repeat(np.float32(in_step) * w_step, 2)
    else:
        w_int = np.round(kernel / w_step).astype(np.float64)
        acc = x_int @ w_int if name == "head" else keras.ops.convert_to_numpy(keras.ops.conv(x_int, w_int, 1, "same"))
        product = np.float32(in_step) * w_step
    acc = acc + np.round(wrapper.integer_bias().numpy() / product)
    k = np.rint(acc.astype(np.float32) * (product / np.float32(out_step)))
    if name == "depthwise":
        k = np.maximum(k, 0)  # its own relu
    expected = np.clip(k, k_min, k_max).astype(np.float32) * out_step
    got = keras.ops.convert_to_numpy(wrapper(inputs, training=False))
    np.testing.assert_array_equal(got, expected)
    assert np.all(np.abs(acc) < 2**24)  # the oracle's float64 sums are exact


def test_training_and_calibration_keep_the_float_computation(qat):
    wrapper = qat.get_layer("conv")
    inputs = keras.ops.convert_to_numpy(keras.Model(qat.inputs, qat.get_layer("x_activation_quantizer").output)(X))
    trained = keras.ops.convert_to_numpy(wrapper(inputs, training=True))
    step = _grid_values(trainable_grid(qat.get_layer("conv_activation_quantizer").activation_holder_quantizer))[0]
    assert not np.allclose(trained / step, np.round(trained / step))  # not on the output grid
    holder = qat.get_layer("conv_activation_quantizer")
    holder._observer = lambda values: values
    try:
        float_eval = keras.ops.convert_to_numpy(wrapper(inputs, training=False))
    finally:
        holder._observer = None
    np.testing.assert_allclose(float_eval, trained, rtol=1e-5, atol=1e-6)


def test_trained_and_converted_models_agree_and_reload(qat, tmp_path):
    expected = qat.predict(X, verbose=0)
    converted = convert_to_inferable(qat)
    np.testing.assert_array_equal(converted.predict(X, verbose=0), expected)
    assert converted.get_layer("head")._output_holder_ref is not None
    qat.save(tmp_path / "qat.keras")
    converted.save(tmp_path / "converted.keras")
    for path in ("qat.keras", "converted.keras"):
        reloaded = keras.models.load_model(tmp_path / path)
        assert reloaded.get_layer("depthwise")._output_holder_ref is not None
        np.testing.assert_array_equal(reloaded.predict(X, verbose=0), expected)


def test_interpreter_reproduces_a_trained_model(tmp_path):
    x_train, y_train, x_test, _ = load_digits_split(seed=0)
    x_train, x_test = x_train[..., None], x_test[..., None]
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1), name="x")
    x = layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = layers.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="conv2")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    float_model = keras.Model(inputs, layers.Dense(10, name="fc")(x))
    train(float_model, x_train, y_train, 2, 3e-3, "", False)
    qat = quantize_model(float_model, QATConfig(weight_n_bits=4), x_train[:256], progress=False)
    train(qat, x_train, y_train, 1, 1e-3, "", False)
    report = export_tflite(convert_to_inferable(qat), tmp_path / "m.tflite", x_test, require_identical=0.999)
    assert report.argmax_identical == 1.0


def test_holders_of_the_inferable_model_are_found_after_a_clone(qat):
    converted = convert_to_inferable(qat)
    clone = keras.models.clone_model(converted)
    clone.set_weights(converted.get_weights())
    assert isinstance(qat.get_layer("conv_activation_quantizer"), KerasActivationQuantizationHolder)
    assert clone.get_layer("conv")._output_holder_ref is not None
    np.testing.assert_array_equal(clone.predict(X, verbose=0), converted.predict(X, verbose=0))
