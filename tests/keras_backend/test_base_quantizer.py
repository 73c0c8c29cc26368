"""Keras base quantizers: config round trips, Keras serialization, trainable variables, resolution."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.keras_backend.helpers import activation_config, weights_config
from trainable_infra import (
    QuantizationMethod,
    QuantizationTarget,
    TrainingMethod,
    VariableGroup,
    get_trainable_quantizer_class,
)
from trainable_infra.keras_backend import (
    BaseKerasTrainableQuantizer,
    KerasTrainableQuantizationWrapper,
    LSQSymmetricActivationQuantizer,
    LSQSymmetricWeightQuantizer,
    LSQUniformActivationQuantizer,
    LSQUniformWeightQuantizer,
    STESymmetricActivationQuantizer,
    STESymmetricWeightQuantizer,
    STEUniformActivationQuantizer,
    STEUniformWeightQuantizer,
)

UNIFORM_PARAMS = {"range_min": -1.0, "range_max": 2.0}
WEIGHT_SHAPE = (3, 3, 2, 4)

# (class, config) for every built-in quantizer; per-channel weights with MCT's broadcast-shaped parameters.
BUILT_INS = {
    "STESymmetricWeight": (STESymmetricWeightQuantizer, lambda: weights_config(
        QuantizationMethod.POWER_OF_TWO, 4, {"threshold": np.array([[[[0.5, 1.0, 2.0, 3.0]]]])})),
    "STEUniformWeight": (STEUniformWeightQuantizer, lambda: weights_config(
        QuantizationMethod.UNIFORM, 4, {"range_min": [-1.0, -2, -0.5, 0.25], "range_max": [1.0, 1, 2, 3]})),
    "STESymmetricActivation": (STESymmetricActivationQuantizer, lambda: activation_config(n_bits=4)),
    "STEUniformActivation": (STEUniformActivationQuantizer, lambda: activation_config(
        QuantizationMethod.UNIFORM, 4, UNIFORM_PARAMS)),
    "LSQSymmetricWeight": (LSQSymmetricWeightQuantizer, lambda: weights_config(
        QuantizationMethod.SYMMETRIC, 4, {"threshold": [0.5, 1.0, 2.0, 3.0]})),
    "LSQUniformWeight": (LSQUniformWeightQuantizer, lambda: weights_config(
        QuantizationMethod.UNIFORM, 4, {"range_min": -1.0, "range_max": 1.0}, per_channel=False)),
    "LSQSymmetricActivation": (LSQSymmetricActivationQuantizer, lambda: activation_config(
        QuantizationMethod.POWER_OF_TWO, 4, {"threshold": 3.0, "is_signed": True})),
    "LSQUniformActivation": (LSQUniformActivationQuantizer, lambda: activation_config(
        QuantizationMethod.UNIFORM, 4, UNIFORM_PARAMS)),
}


def _initialized(quantizer):
    shape = WEIGHT_SHAPE if "Weight" in type(quantizer).__name__ else (None, 5, 4)
    quantizer.initialize_quantization(shape, "x", keras.layers.Layer())
    return quantizer


def _sample(quantizer):
    shape = WEIGHT_SHAPE if "Weight" in type(quantizer).__name__ else (2, 5, 4)
    return tf.constant(np.random.default_rng(0).normal(size=shape).astype(np.float32) * 2)


@pytest.mark.parametrize("freeze", [False, True], ids=["trainable", "frozen"])
@pytest.mark.parametrize("name", list(BUILT_INS))
def test_get_config_is_json_and_from_config_rebuilds_the_same_quantizer(name, freeze):
    cls, make_config = BUILT_INS[name]
    quantizer = cls(make_config(), freeze_quant_params=freeze)
    config = quantizer.get_config()
    decoded = json.loads(json.dumps(config))
    rebuilt = cls.from_config(decoded)
    assert type(rebuilt) is cls
    assert rebuilt.quantization_config == quantizer.quantization_config
    assert rebuilt.freeze_quant_params is freeze
    x = _sample(quantizer)
    np.testing.assert_array_equal(_initialized(rebuilt)(x, False).numpy(), _initialized(quantizer)(x, False).numpy())


@pytest.mark.parametrize("name", list(BUILT_INS))
def test_keras_serialization_uses_the_registered_name_and_needs_no_custom_objects(name):
    cls, make_config = BUILT_INS[name]
    quantizer = cls(make_config())
    serialized = keras.saving.serialize_keras_object(quantizer)
    assert serialized["registered_name"] == f"trainable_infra>{cls.__name__}"
    payload = json.loads(json.dumps(serialized))
    with keras.saving.custom_object_scope({}):
        rebuilt = keras.saving.deserialize_keras_object(payload, safe_mode=True)
    assert type(rebuilt) is cls
    assert rebuilt.quantization_config == quantizer.quantization_config


@pytest.mark.parametrize(
    ("target", "identifier", "method", "expected"),
    [
        (QuantizationTarget.Weights, TrainingMethod.STE, QuantizationMethod.SYMMETRIC, STESymmetricWeightQuantizer),
        (QuantizationTarget.Weights, TrainingMethod.STE, QuantizationMethod.POWER_OF_TWO, STESymmetricWeightQuantizer),
        (QuantizationTarget.Weights, TrainingMethod.STE, QuantizationMethod.UNIFORM, STEUniformWeightQuantizer),
        (QuantizationTarget.Weights, TrainingMethod.LSQ, QuantizationMethod.SYMMETRIC, LSQSymmetricWeightQuantizer),
        (QuantizationTarget.Weights, TrainingMethod.LSQ, QuantizationMethod.POWER_OF_TWO, LSQSymmetricWeightQuantizer),
        (QuantizationTarget.Weights, TrainingMethod.LSQ, QuantizationMethod.UNIFORM, LSQUniformWeightQuantizer),
        (QuantizationTarget.Activation, TrainingMethod.STE, QuantizationMethod.SYMMETRIC,
         STESymmetricActivationQuantizer),
        (QuantizationTarget.Activation, TrainingMethod.STE, QuantizationMethod.POWER_OF_TWO,
         STESymmetricActivationQuantizer),
        (QuantizationTarget.Activation, TrainingMethod.STE, QuantizationMethod.UNIFORM, STEUniformActivationQuantizer),
        (QuantizationTarget.Activation, TrainingMethod.LSQ, QuantizationMethod.SYMMETRIC,
         LSQSymmetricActivationQuantizer),
        (QuantizationTarget.Activation, "LSQ", QuantizationMethod.POWER_OF_TWO, LSQSymmetricActivationQuantizer),
        (QuantizationTarget.Activation, TrainingMethod.LSQ, QuantizationMethod.UNIFORM, LSQUniformActivationQuantizer),
    ],
)
def test_built_ins_are_resolvable(target, identifier, method, expected):
    assert get_trainable_quantizer_class(target, identifier, method, BaseKerasTrainableQuantizer) is expected


def test_lsq_parameters_are_trainable_qparams():
    quantizer = _initialized(LSQSymmetricWeightQuantizer(BUILT_INS["LSQSymmetricWeight"][1]()))
    (threshold,) = quantizer.get_trainable_variables(VariableGroup.QPARAMS)
    assert threshold.trainable
    assert threshold.dtype == "float32"
    np.testing.assert_array_equal(threshold.numpy(), [0.5, 1.0, 2.0, 3.0])
    assert quantizer.get_trainable_variables(VariableGroup.WEIGHTS) == []


def test_freeze_quant_params_creates_non_trainable_parameters():
    quantizer = _initialized(LSQUniformActivationQuantizer(BUILT_INS["LSQUniformActivation"][1](),
                                                            freeze_quant_params=True))
    assert quantizer.get_trainable_variables(VariableGroup.QPARAMS) == []
    registered = quantizer.quantizer_parameters
    assert sorted(registered) == ["x_range_max", "x_range_min"]
    assert all(not entry.variable.trainable for entry in registered.values())


def test_a_variable_made_non_trainable_is_not_returned():
    quantizer = _initialized(LSQUniformActivationQuantizer(BUILT_INS["LSQUniformActivation"][1]()))
    range_min, range_max = quantizer.get_trainable_variables(VariableGroup.QPARAMS)
    range_min.trainable = False
    assert quantizer.get_trainable_variables(VariableGroup.QPARAMS) == [range_max]


def test_freezing_the_wrapper_layer_freezes_its_quantizer():
    quantizer = LSQSymmetricWeightQuantizer(weights_config(n_bits=4))
    wrapper = KerasTrainableQuantizationWrapper(keras.layers.Dense(3), {"kernel": quantizer})
    wrapper.build((None, 2))
    assert len(quantizer.get_trainable_variables(VariableGroup.QPARAMS)) == 1
    wrapper.trainable = False
    assert quantizer.get_trainable_variables(VariableGroup.QPARAMS) == []
    assert wrapper.trainable_variables == []


@pytest.mark.parametrize("name", [n for n in BUILT_INS if n.startswith("STE")])
def test_ste_quantizers_have_no_trainable_parameters(name):
    cls, make_config = BUILT_INS[name]
    quantizer = _initialized(cls(make_config()))
    assert quantizer.get_trainable_variables(VariableGroup.QPARAMS) == []
    assert quantizer.get_trainable_variables(VariableGroup.WEIGHTS) == []


def test_repr_names_class_and_config():
    text = repr(STEUniformActivationQuantizer(BUILT_INS["STEUniformActivation"][1]()))
    assert text.startswith("STEUniformActivationQuantizer(TrainableQuantizerActivationConfig(")
    assert "range_min" in text
