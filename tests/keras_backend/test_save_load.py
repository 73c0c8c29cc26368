"""`.keras` save and reload: a fresh process in safe mode, resumed training, user-defined quantizers."""

import subprocess
import sys
import textwrap
from enum import Enum

import keras
import numpy as np
import pytest
import tensorflow as tf
from mct_quantizers.keras.quantizers import ActivationUniformInferableQuantizer

from tests.keras_backend.helpers import compiled, small_cnn, weights_config
from trainable_infra import (
    QuantizationMethod,
    QuantizationTarget,
    TrainableQuantizerActivationConfig,
    get_trainable_quantizer_class,
    mark_quantizer,
)
from trainable_infra.keras_backend import (
    BaseKerasActivationTrainableQuantizer,
    BaseKerasTrainableQuantizer,
    KerasActivationQuantizationHolder,
    KerasTrainableQuantizationWrapper,
    LSQUniformWeightQuantizer,
    STESymmetricWeightQuantizer,
    convert_to_inferable,
    keras_load_quantized_model,
)
from trainable_infra.keras_backend.fake_quant import fake_quant

_FRESH_PROCESS = """
import sys
import numpy as np
import keras
import trainable_infra.keras_backend  # registers the library's layers and quantizers with Keras

x = np.load(sys.argv[1])
for path in sys.argv[2:]:
    model = keras.models.load_model(path)  # safe_mode=True is Keras' default
    np.save(path + ".npy", model.predict(x, verbose=0))
"""


def _sequential():
    keras.utils.set_random_seed(3)
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        KerasTrainableQuantizationWrapper(keras.layers.Conv2D(4, 3), {"kernel": LSQUniformWeightQuantizer(
            weights_config(QuantizationMethod.UNIFORM, 4, {"range_min": -0.4, "range_max": 0.3}))}),
        keras.layers.Flatten(),
        KerasTrainableQuantizationWrapper(keras.layers.Dense(10), {"kernel": STESymmetricWeightQuantizer(
            weights_config(QuantizationMethod.POWER_OF_TWO, 8, {"threshold": 0.2}))}),
    ])


def test_fresh_process_loads_trained_and_converted_models_in_safe_mode(tmp_path, digits):
    x, y = digits
    models = {"functional": compiled(small_cnn(lsq=True)), "sequential": compiled(_sequential())}
    paths, expected = [], {}
    for name, model in models.items():
        model.fit(x[:128], y[:128], batch_size=32, epochs=1, verbose=0)
        for kind, saved in (("trained", model), ("converted", convert_to_inferable(model))):
            path = str(tmp_path / f"{name}-{kind}.keras")
            saved.save(path)
            paths.append(path)
            expected[path] = saved.predict(x[:50], verbose=0)
    np.save(tmp_path / "x.npy", x[:50])
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_FRESH_PROCESS), str(tmp_path / "x.npy"), *paths],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for path in paths:
        np.testing.assert_array_equal(np.load(path + ".npy"), expected[path], err_msg=path)


@pytest.mark.parametrize("loader", [keras.models.load_model, keras_load_quantized_model],
                         ids=["keras.models.load_model", "keras_load_quantized_model"])
def test_resumed_fit_ends_identical_to_an_uninterrupted_one(tmp_path, digits, loader):
    x, y = digits
    first, more, batch = 4, 3, 32
    uninterrupted = compiled(small_cnn(lsq=True))
    uninterrupted.fit(x[:(first + more) * batch], y[:(first + more) * batch], batch_size=batch, epochs=1,
                      verbose=0, shuffle=False)

    interrupted = compiled(small_cnn(lsq=True))
    interrupted.fit(x[:first * batch], y[:first * batch], batch_size=batch, epochs=1, verbose=0, shuffle=False)
    interrupted.save(tmp_path / "m.keras")
    resumed = loader(tmp_path / "m.keras")
    assert int(resumed.optimizer.iterations.numpy()) == first
    resumed.fit(x[first * batch:(first + more) * batch], y[first * batch:(first + more) * batch], batch_size=batch,
                epochs=1, verbose=0, shuffle=False)

    names = [v.name for v in uninterrupted.weights]
    assert names == [v.name for v in resumed.weights]
    assert any("threshold" in name for name in names)
    for name, a, b in zip(names, uninterrupted.weights, resumed.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=name)
    for a, b in zip(uninterrupted.optimizer.variables, resumed.optimizer.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.name)


class UserMethod(Enum):
    PACT = "pact"


@mark_quantizer(
    quantization_target=QuantizationTarget.Activation,
    quantization_method=[QuantizationMethod.UNIFORM],
    identifier=UserMethod.PACT,
)
class PACTActivationQuantizer(BaseKerasActivationTrainableQuantizer):
    """A user's quantizer (PACT-style learned clipping level), neither in the library nor registered with Keras."""

    def __init__(self, quantization_config, freeze_quant_params=False, initial_alpha=6.0):
        super().__init__(quantization_config, freeze_quant_params)
        self.initial_alpha = initial_alpha

    def initialize_quantization(self, tensor_shape, name, layer):
        self.alpha = self.add_quantizer_weight(layer, f"{name}_alpha", self.initial_alpha)

    def __call__(self, inputs, training=False):
        return fake_quant(inputs, 0.0, self.alpha, self.quantization_config.activation_n_bits, None)

    def convert2inferable(self):
        return ActivationUniformInferableQuantizer(
            num_bits=self.quantization_config.activation_n_bits, min_range=[0.0], max_range=[float(self.alpha.numpy())]
        )


def _pact_model():
    config = TrainableQuantizerActivationConfig(
        QuantizationMethod.UNIFORM, 4, {"range_min": 0.0, "range_max": 6.0}, True, 2.0**-16
    )
    quantizer_cls = get_trainable_quantizer_class(
        QuantizationTarget.Activation, UserMethod.PACT, QuantizationMethod.UNIFORM, BaseKerasTrainableQuantizer
    )
    keras.utils.set_random_seed(4)
    return keras.Sequential([
        keras.Input((6,)),
        keras.layers.Dense(8),
        KerasActivationQuantizationHolder(quantizer_cls(config, initial_alpha=3.0)),
        keras.layers.Dense(2),
    ])


def test_user_quantizer_is_found_by_keras_load_quantized_model(tmp_path):
    model = compiled(_pact_model())
    x = np.random.default_rng(0).normal(size=(32, 6)).astype(np.float32) * 4
    model.fit(x, np.arange(32) % 2, epochs=1, verbose=0)
    model.save(tmp_path / "pact.keras")
    with pytest.raises(TypeError, match="PACTActivationQuantizer"):
        keras.models.load_model(tmp_path / "pact.keras")
    loaded = keras_load_quantized_model(tmp_path / "pact.keras", compile=False)
    holder = loaded.layers[1]
    assert type(holder.activation_quantizer) is PACTActivationQuantizer
    assert holder.activation_quantizer.initial_alpha == 3.0
    trained_alpha = model.layers[1].activation_quantizer.alpha.numpy()
    assert trained_alpha != 3.0
    np.testing.assert_array_equal(holder.activation_quantizer.alpha.numpy(), trained_alpha)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    converted = convert_to_inferable(loaded)
    np.testing.assert_array_equal(converted.predict(x, verbose=0), model.predict(x, verbose=0))


def test_loaded_quantizers_hold_the_trained_parameters(tmp_path, digits):
    x, y = digits
    model = compiled(small_cnn(lsq=True))
    model.fit(x[:64], y[:64], batch_size=32, epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    for layer, twin in zip(model.layers, loaded.layers, strict=True):
        assert type(layer) is type(twin)
        for v, w in zip(layer.weights, twin.weights, strict=True):
            np.testing.assert_array_equal(tf.convert_to_tensor(v).numpy(), tf.convert_to_tensor(w).numpy())
