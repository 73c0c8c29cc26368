"""DQA in Keras: resolution, the temperature schedule in a traced `fit`, `.keras` save and reload in safe mode,
config, conversion, errors."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.keras_backend.helpers import activation_config, weights_config
from trainable_infra import (
    LinearAnnealing,
    QATConfig,
    QuantizationConfigError,
    QuantizationMethod,
    QuantizationTarget,
    TrainingMethod,
    VariableGroup,
    get_trainable_quantizer_class,
)
from trainable_infra.common import numerics
from trainable_infra.keras_backend import (
    BaseKerasTrainableQuantizer,
    DQASymmetricActivationQuantizer,
    DQASymmetricWeightQuantizer,
    DQAUniformActivationQuantizer,
    DQAUniformWeightQuantizer,
    convert_to_inferable,
    quantize_model,
    set_dqa_temperature_schedule,
)
from trainable_infra.keras_backend.training import quantizers_of

DQA_CONFIG = QATConfig(weight_training_method=TrainingMethod.DQA, activation_training_method=TrainingMethod.DQA,
                       weight_n_bits=4)
SCHEDULE = LinearAnnealing(t_start=1, t_end=4, initial_value=2.0, target_value=0.0)
BATCH = 8


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(4 * BATCH, 8, 8, 1)).astype(np.float32), rng.integers(0, 3, 4 * BATCH)


def _model() -> keras.Model:
    keras.utils.set_random_seed(0)
    float_model = keras.Sequential([
        keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, activation="relu", name="conv"), keras.layers.Flatten(),
        keras.layers.Dense(3, name="fc"),
    ])
    model = quantize_model(float_model, DQA_CONFIG, [_data()[0]], progress=False)
    assert set_dqa_temperature_schedule(model, SCHEDULE) == len(quantizers_of(model))
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _kernel_quantizer(model: keras.Model) -> DQASymmetricWeightQuantizer:
    return quantizers_of(model)["conv.kernel"]


@pytest.mark.parametrize(("target", "method", "expected"), [
    (QuantizationTarget.Weights, QuantizationMethod.POWER_OF_TWO, DQASymmetricWeightQuantizer),
    (QuantizationTarget.Weights, QuantizationMethod.UNIFORM, DQAUniformWeightQuantizer),
    (QuantizationTarget.Activation, QuantizationMethod.SYMMETRIC, DQASymmetricActivationQuantizer),
    (QuantizationTarget.Activation, QuantizationMethod.UNIFORM, DQAUniformActivationQuantizer),
])
def test_resolver_finds_dqa(target, method, expected):
    assert get_trainable_quantizer_class(target, TrainingMethod.DQA, method, BaseKerasTrainableQuantizer) is expected


def test_fit_follows_the_schedule_which_saves_and_changes(tmp_path):
    model = _model()
    x, y = _data()
    quantizer = _kernel_quantizer(model)
    assert quantizer.get_trainable_variables(VariableGroup.QPARAMS) == []
    assert quantizer.get_trainable_variables(VariableGroup.WEIGHTS) == [quantizer.attention_logits]
    assert quantizer.temperature() == SCHEDULE(0)
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)  # 4 traced steps: T = 2, 2, 4/3, 2/3
    assert quantizer.current_step() == 4
    assert quantizer.temperature() == 0.0
    assert not np.allclose(quantizer.current_logits(), 0.0), "the attention logits did not learn"
    # At T = 0 the training forward is the b-bit quantizer, bit for bit, and eval converts exactly.
    kernel = tf.convert_to_tensor(model.get_layer("conv").layer.kernel)
    np.testing.assert_array_equal(quantizer(kernel, True).numpy(), quantizer(kernel, False).numpy())
    assert quantizer.attention().tolist() == [1.0, 0.0, 0.0]
    expected = model(x, training=False).numpy()
    np.testing.assert_array_equal(convert_to_inferable(model)(x, training=False).numpy(), expected)

    model.save(tmp_path / "dqa.keras")
    reloaded = keras.models.load_model(tmp_path / "dqa.keras", safe_mode=True)
    for a, b in zip(quantizers_of(model).values(), quantizers_of(reloaded).values(), strict=True):
        assert b.temperature_schedule == SCHEDULE
        assert b.current_step() == a.current_step()
        np.testing.assert_array_equal(b.current_logits(), a.current_logits())
    np.testing.assert_array_equal(reloaded(x, training=False).numpy(), expected)

    # A new schedule reaches the reloaded model's train step: at step 5 (4 in fit, 1 in the direct training call
    # above) T = 0.995, and the wider candidates weigh again.
    set_dqa_temperature_schedule(reloaded, LinearAnnealing(0, 1000, 1.0, 0.0))
    logits = _kernel_quantizer(reloaded).current_logits()
    reloaded.fit(x[:BATCH], y[:BATCH], batch_size=BATCH, epochs=1, verbose=0)
    assert not np.array_equal(_kernel_quantizer(reloaded).current_logits(), logits)
    assert _kernel_quantizer(reloaded).current_step() == 6


def test_mixture_matches_the_reference():
    quantizer = DQAUniformActivationQuantizer(
        activation_config(QuantizationMethod.UNIFORM, 3, {"range_min": -1.5, "range_max": 2.0}))
    quantizer.initialize_quantization((None, 6), "activation", keras.layers.Layer())
    x = np.linspace(-2.5, 2.5, 60, dtype=np.float32).reshape(10, 6)
    expected = numerics.fake_quant_dqa_uniform(x, -1.5, 2.0, 3, logits=np.zeros(3), temperature=1.0,
                                               rounding="half_up")
    np.testing.assert_allclose(quantizer(tf.constant(x), True).numpy(), expected, rtol=0, atol=1e-6)
    assert quantizer.current_step() == 1


def test_config_round_trip_keeps_the_schedule():
    quantizer = DQASymmetricWeightQuantizer(weights_config(n_bits=2), temperature_schedule=SCHEDULE.to_dict())
    config = keras.saving.serialize_keras_object(quantizer)
    rebuilt = keras.saving.deserialize_keras_object(config)
    assert isinstance(rebuilt, DQASymmetricWeightQuantizer)
    assert rebuilt.temperature_schedule == SCHEDULE
    assert rebuilt.candidate_bits == (2, 4, 8)


@pytest.mark.parametrize(("build", "message"), [
    (lambda: DQASymmetricActivationQuantizer(activation_config(n_bits=16)),
     "activation_n_bits must be in 2..8 for DQA (its candidates are b, 2b and 4b bits, at most 16), got 16"),
    (lambda: DQASymmetricWeightQuantizer(weights_config(n_bits=4), temperature_schedule={"t_start": 0}),
     "LinearAnnealing.from_dict expects keys t_start, t_end, initial_value, target_value"),
    (lambda: DQASymmetricWeightQuantizer(weights_config(n_bits=4),
                                         temperature_schedule=LinearAnnealing(0, 5, 1.0, 1.0)),
     "temperature_schedule.target_value must be 0.0"),
])
def test_bad_input_is_refused_with_the_library_error(build, message):
    with pytest.raises(QuantizationConfigError) as error:
        build()
    assert message in str(error.value)
