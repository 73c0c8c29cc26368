"""`.keras` save and reload: a fresh process in safe mode, resumed training, user-defined quantizers."""

import io
import subprocess
import sys
import textwrap
import warnings
import zipfile
from enum import Enum
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf
from mct_quantizers.keras.quantizers import ActivationUniformInferableQuantizer

from tests.keras_backend.helpers import compiled, small_cnn, weights_config
from trainable_infra import (
    QATConfig,
    QuantizationMethod,
    QuantizationTarget,
    TrainableQuantizerActivationConfig,
    TrainingMethod,
    get_trainable_quantizer_class,
    mark_quantizer,
)
from trainable_infra.keras_backend import (
    BaseKerasActivationTrainableQuantizer,
    BaseKerasTrainableQuantizer,
    KerasActivationQuantizationHolder,
    KerasInferableActivationQuantizationHolder,
    KerasTrainableQuantizationWrapper,
    LSQUniformActivationQuantizer,
    LSQUniformWeightQuantizer,
    STESymmetricWeightQuantizer,
    calibrate,
    convert_to_inferable,
    export_tflite,
    freeze_quantizers,
    keras_load_quantized_model,
    quantization_report,
    quantize_model,
    unfreeze_quantizers,
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
    assert type(holder.activation_holder_quantizer) is PACTActivationQuantizer
    assert holder.activation_holder_quantizer.initial_alpha == 3.0
    trained_alpha = model.layers[1].activation_holder_quantizer.alpha.numpy()
    assert trained_alpha != 3.0
    np.testing.assert_array_equal(holder.activation_holder_quantizer.alpha.numpy(), trained_alpha)
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


def test_model_saved_with_frozen_quantizers_loads_its_values(tmp_path, digits):
    """Freezing is a training state, not part of the saved config: the reloaded model creates its variables as
    the saved one did and loads every value into its own variable (call freeze_quantizers again to go on)."""
    x, y = digits
    model = compiled(small_cnn(lsq=True))
    model.fit(x[:64], y[:64], batch_size=32, epochs=1, verbose=0)
    assert freeze_quantizers(model) > 0
    model.fit(x[:64], y[:64], batch_size=32, epochs=1, verbose=0)
    model.save(tmp_path / "frozen.keras")
    for loader in (keras.models.load_model, keras_load_quantized_model):
        loaded = loader(tmp_path / "frozen.keras")
        np.testing.assert_array_equal(loaded.predict(x[:32], verbose=0), model.predict(x[:32], verbose=0))
        for layer, twin in zip(model.layers, loaded.layers, strict=True):
            for v, w in zip(layer.weights, twin.weights, strict=True):
                np.testing.assert_array_equal(tf.convert_to_tensor(v).numpy(), tf.convert_to_tensor(w).numpy())
        assert freeze_quantizers(loaded) > 0  # the reloaded quantizers were built trainable, as the saved ones


# Saved by the library before the holders' quantizer attribute became `activation_holder_quantizer`
# (data/make_pre_rename_fixture.py), with the models' outputs on a fixed input.
DATA = Path(__file__).parent / "data"
PRE_RENAME = {
    "qat": (KerasActivationQuantizationHolder, LSQUniformActivationQuantizer),
    "inferable": (KerasInferableActivationQuantizationHolder, ActivationUniformInferableQuantizer),
}


def _load_in_safe_mode(path):
    return keras.saving.load_model(path, safe_mode=True)


def _weight_paths(path) -> list[str]:
    """Where a `.keras` file keeps each variable (Keras' saving_lib paths) and its shape."""
    with zipfile.ZipFile(path) as archive, h5py.File(io.BytesIO(archive.read("model.weights.h5"))) as weights:
        found = []
        weights.visititems(lambda name, item: found.append(f"{name} {item.shape}")
                           if isinstance(item, h5py.Dataset) else None)
    return found


def _alias_reads(caught) -> list[str]:
    """Where the recorded warnings say the deprecated holder alias was read."""
    return [f"{w.filename}:{w.lineno}" for w in caught if "activation_quantizer is deprecated" in str(w.message)]


@pytest.mark.parametrize("loader", [keras_load_quantized_model, _load_in_safe_mode],
                         ids=["keras_load_quantized_model", "keras.saving.load_model"])
@pytest.mark.parametrize("kind", list(PRE_RENAME))
def test_files_saved_before_the_holder_attribute_rename_load_with_identical_outputs(tmp_path, loader, kind):
    holder_cls, quantizer_cls = PRE_RENAME[kind]
    expected = np.load(DATA / "pre_rename_expected.npz")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = loader(str(DATA / f"pre_rename_{kind}.keras"))
        outputs = keras.ops.convert_to_numpy(model(expected["x"], training=False))
        model.save(tmp_path / "again.keras")
    assert not _alias_reads(caught)
    np.testing.assert_array_equal(outputs, expected[kind])
    # Saving again writes each variable where the old file had it.
    assert _weight_paths(tmp_path / "again.keras") == _weight_paths(DATA / f"pre_rename_{kind}.keras")

    holders = [layer for layer in model.layers if isinstance(layer, holder_cls)]
    assert [h.name for h in holders] == ["x_activation_quantizer", "conv_activation_quantizer",
                                         "dense_activation_quantizer"]
    x = tf.constant(np.linspace(-4.0, 4.0, 64, dtype=np.float32))
    for holder in holders:
        quantizer = holder.activation_holder_quantizer
        assert type(quantizer) is quantizer_cls, holder.name
        if kind == "qat":  # its parameters are the holder's loaded variables, and the holder computes with it
            assert {id(entry.variable) for entry in quantizer.quantizer_parameters.values()} == {
                id(v) for v in holder.weights}
            np.testing.assert_array_equal(holder(x, training=False).numpy(), quantizer(x, False).numpy())
        else:
            np.testing.assert_array_equal(holder(x).numpy(), quantizer(x).numpy())


def _float_model_with_attention() -> keras.Model:
    keras.utils.set_random_seed(5)
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.ReLU()(keras.layers.Conv2D(4, 3, name="conv")(inputs))
    x = keras.layers.Reshape((36, 4))(x)
    x = keras.layers.MultiHeadAttention(num_heads=1, key_dim=4, name="attention")(x, x)
    return keras.Model(inputs, keras.layers.Dense(10, name="head")(keras.layers.Flatten()(x)))


def test_library_never_reads_the_deprecated_holder_alias(tmp_path, digits):
    x, y = digits
    # Recorded, not turned into errors: Keras' saving reads attributes inside `except Exception`, which would
    # swallow an error raised there, and the alias must not warn there either.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = QATConfig(weight_training_method=TrainingMethod.LSQ, activation_training_method=TrainingMethod.LSQ)
        qat = compiled(quantize_model(_float_model_with_attention(), config, x[:64], progress=False))
        qat.fit(x[:64], y[:64], batch_size=32, epochs=1, verbose=0)
        quantization_report(qat, x[:16], print_table=False)
        calibrate(qat, x[:16], progress=False)
        freeze_quantizers(qat)
        unfreeze_quantizers(qat)
        inferable = convert_to_inferable(qat)
        export_tflite(inferable, tmp_path / "m.tflite", x[:8])
        for name, model in (("qat", qat), ("inferable", inferable)):
            model.save(tmp_path / f"{name}.keras")
            expected = model.predict(x[:16], verbose=0)
            for loader in (keras_load_quantized_model, _load_in_safe_mode):
                loaded = loader(str(tmp_path / f"{name}.keras"))
                np.testing.assert_array_equal(loaded.predict(x[:16], verbose=0), expected, err_msg=name)
    assert not _alias_reads(caught)
