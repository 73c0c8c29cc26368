"""A quantizer's config follows its variables: after calibration `quantization_config` and `get_config()` hold
the calibrated threshold or range, after training `get_config()` holds the trained one, and
`from_config(get_config())` rebuilds a quantizer that computes the same (also through a `.keras` file)."""

import json

import keras
import numpy as np
import pytest

from trainable_infra import QATConfig, QuantizationMethod, TrainingMethod
from trainable_infra.keras_backend import (
    KerasActivationQuantizationHolder,
    KerasTrainableQuantizationWrapper,
    keras_load_quantized_model,
    quantize_model,
)

PLACEHOLDER_THRESHOLD = 8.0
X = np.random.default_rng(1).normal(size=(32, 8, 8, 1)).astype("float32") * 0.5
Y = np.arange(32) % 3


def float_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1), name="image")
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inputs)
    outputs = keras.layers.Dense(3, name="fc")(keras.layers.Flatten(name="flat")(x))
    return keras.Model(inputs, outputs)


def holders(model: keras.Model) -> list[KerasActivationQuantizationHolder]:
    return [layer for layer in model.layers if isinstance(layer, KerasActivationQuantizationHolder)]


def rebuilt_holder(holder: KerasActivationQuantizationHolder) -> KerasActivationQuantizationHolder:
    quantizer = holder.activation_holder_quantizer
    config = json.loads(json.dumps(quantizer.get_config()))
    rebuilt = KerasActivationQuantizationHolder(type(quantizer).from_config(config))
    rebuilt.build(holder.input.shape)
    return rebuilt


def variable_values(quantizer) -> dict[str, float]:
    return {name: entry.variable.numpy().tolist() for name, entry in quantizer.registered_variables().items()}


@pytest.mark.parametrize("method", [QuantizationMethod.SYMMETRIC, QuantizationMethod.POWER_OF_TWO,
                                    QuantizationMethod.UNIFORM])
def test_calibrated_values_are_in_the_config_and_get_config(method):
    qat = quantize_model(float_model(), QATConfig(activation_quantization_method=method), [X], progress=False)
    for holder in holders(qat):
        quantizer = holder.activation_holder_quantizer
        params = quantizer.quantization_config.activation_quantization_params
        keys = ["range_min", "range_max"] if method is QuantizationMethod.UNIFORM else ["threshold"]
        for key in keys:
            assert params[key] == float(quantizer.parameter_variable(key).numpy()), (holder.name, key)
        if method is not QuantizationMethod.UNIFORM:
            assert params["threshold"] != PLACEHOLDER_THRESHOLD
        assert quantizer.get_config()["quantization_config"] == quantizer.quantization_config.to_dict()
        rebuilt = rebuilt_holder(holder)
        assert variable_values(rebuilt.activation_holder_quantizer) == variable_values(quantizer)
        x = X * 4.0
        np.testing.assert_array_equal(rebuilt(x, training=False), holder(x, training=False))


def test_trained_values_are_in_get_config_and_in_the_saved_file(tmp_path):
    config = QATConfig(weight_training_method=TrainingMethod.LSQ, activation_training_method=TrainingMethod.LSQ)
    qat = quantize_model(float_model(), config, [X], progress=False)
    calibrated = {h.name: h.activation_holder_quantizer.quantization_config for h in holders(qat)}
    qat.compile(optimizer=keras.optimizers.Adam(0.01),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    qat.fit(X, Y, epochs=2, batch_size=8, verbose=0)
    for holder in holders(qat):
        quantizer = holder.activation_holder_quantizer
        threshold = float(quantizer.parameter_variable("threshold").numpy())
        assert threshold != calibrated[holder.name].activation_quantization_params["threshold"], holder.name
        assert quantizer.get_config()["quantization_config"]["activation_quantization_params"]["threshold"] == threshold
        np.testing.assert_array_equal(rebuilt_holder(holder)(X, training=False), holder(X, training=False))
    for layer in qat.layers:
        if isinstance(layer, KerasTrainableQuantizationWrapper):
            quantizer = layer.weights_quantizers["kernel"]
            trained = quantizer.parameter_variable("threshold").numpy()
            saved = quantizer.get_config()["quantization_config"]["weights_quantization_params"]["threshold"]
            np.testing.assert_array_equal(np.ravel(saved), np.ravel(trained).astype(np.float64))
    # The file's quantizer configs carry the trained values, and the reloaded model computes as the trained one.
    path = tmp_path / "qat.keras"
    qat.save(path)
    reloaded = keras_load_quantized_model(path)
    np.testing.assert_array_equal(reloaded.predict(X, verbose=0), qat.predict(X, verbose=0))
    for holder in holders(reloaded):
        quantizer = holder.activation_holder_quantizer
        assert quantizer.quantization_config.activation_quantization_params["threshold"] == float(
            quantizer.parameter_variable("threshold").numpy())
