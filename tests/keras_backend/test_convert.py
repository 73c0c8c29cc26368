"""convert_to_inferable: mct-quantizers inferable quantizers in Keras 3 layers, same predictions, input untouched."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from mct_quantizers.keras.quantizers import (
    ActivationPOTInferableQuantizer,
    ActivationSymmetricInferableQuantizer,
    ActivationUniformInferableQuantizer,
    BaseKerasInferableQuantizer,
    WeightsPOTInferableQuantizer,
    WeightsSymmetricInferableQuantizer,
    WeightsUniformInferableQuantizer,
)

from tests.keras_backend.helpers import activation_config, compiled, small_cnn, weights_config
from trainable_infra import QuantizationMethod, TrainableInfraError
from trainable_infra.keras_backend import (
    KerasActivationQuantizationHolder,
    KerasInferableActivationQuantizationHolder,
    KerasInferableQuantizationWrapper,
    KerasTrainableQuantizationWrapper,
    LSQSymmetricActivationQuantizer,
    LSQSymmetricWeightQuantizer,
    LSQUniformActivationQuantizer,
    LSQUniformWeightQuantizer,
    STESymmetricActivationQuantizer,
    STESymmetricWeightQuantizer,
    STEUniformActivationQuantizer,
    STEUniformWeightQuantizer,
    convert_to_inferable,
)

UNIFORM = {"range_min": -0.5, "range_max": 0.4}

# One of each quantizer, with the inferable class it must convert to.
EXPECTED_CLASSES = [
    (STESymmetricWeightQuantizer, QuantizationMethod.SYMMETRIC, WeightsSymmetricInferableQuantizer),
    (STESymmetricWeightQuantizer, QuantizationMethod.POWER_OF_TWO, WeightsPOTInferableQuantizer),
    (STEUniformWeightQuantizer, QuantizationMethod.UNIFORM, WeightsUniformInferableQuantizer),
    (LSQSymmetricWeightQuantizer, QuantizationMethod.SYMMETRIC, WeightsSymmetricInferableQuantizer),
    (LSQSymmetricWeightQuantizer, QuantizationMethod.POWER_OF_TWO, WeightsPOTInferableQuantizer),
    (LSQUniformWeightQuantizer, QuantizationMethod.UNIFORM, WeightsUniformInferableQuantizer),
    (STESymmetricActivationQuantizer, QuantizationMethod.SYMMETRIC, ActivationSymmetricInferableQuantizer),
    (STESymmetricActivationQuantizer, QuantizationMethod.POWER_OF_TWO, ActivationPOTInferableQuantizer),
    (STEUniformActivationQuantizer, QuantizationMethod.UNIFORM, ActivationUniformInferableQuantizer),
    (LSQSymmetricActivationQuantizer, QuantizationMethod.SYMMETRIC, ActivationSymmetricInferableQuantizer),
    (LSQSymmetricActivationQuantizer, QuantizationMethod.POWER_OF_TWO, ActivationPOTInferableQuantizer),
    (LSQUniformActivationQuantizer, QuantizationMethod.UNIFORM, ActivationUniformInferableQuantizer),
]


def _one_layer_model(quantizer_cls, method):
    keras.utils.set_random_seed(2)
    inputs = keras.Input((5,))
    if "Weight" in quantizer_cls.__name__:
        params = UNIFORM if method is QuantizationMethod.UNIFORM else {"threshold": 0.4}
        layer = KerasTrainableQuantizationWrapper(keras.layers.Dense(3), {"kernel": quantizer_cls(
            weights_config(method, 4, params))})
    else:
        params = UNIFORM if method is QuantizationMethod.UNIFORM else {"threshold": 0.4, "is_signed": True}
        layer = KerasActivationQuantizationHolder(quantizer_cls(activation_config(method, 4, params)))
    return keras.Model(inputs, layer(inputs))


@pytest.mark.parametrize(("quantizer_cls", "method", "inferable_cls"), EXPECTED_CLASSES,
                         ids=[f"{c.__name__}-{m.name}" for c, m, _ in EXPECTED_CLASSES])
def test_each_quantizer_converts_to_its_mct_inferable_quantizer(quantizer_cls, method, inferable_cls):
    model = _one_layer_model(quantizer_cls, method)
    converted = convert_to_inferable(model)
    layer = converted.layers[1]
    if isinstance(layer, KerasInferableQuantizationWrapper):
        quantizer = layer.weights_quantizers["kernel"]
    else:
        assert isinstance(layer, KerasInferableActivationQuantizationHolder)
        quantizer = layer.activation_holder_quantizer
    assert type(quantizer) is inferable_cls
    x = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32)
    np.testing.assert_array_equal(converted(x).numpy(), model(x, training=False).numpy())


def _nested_model():
    keras.utils.set_random_seed(5)
    inner = keras.Sequential([
        keras.Input((6,)),
        KerasTrainableQuantizationWrapper(keras.layers.Dense(6), {"kernel": LSQUniformWeightQuantizer(
            weights_config(QuantizationMethod.UNIFORM, 4, UNIFORM))}),
        KerasActivationQuantizationHolder(LSQUniformActivationQuantizer(activation_config(
            QuantizationMethod.UNIFORM, 4, {"range_min": -2.0, "range_max": 2.0}))),
    ], name="inner")
    inputs = keras.Input((6,))
    x = inner(inputs)
    x = keras.layers.Add()([x, inputs])
    outputs = KerasTrainableQuantizationWrapper(keras.layers.Dense(2), {"kernel": STESymmetricWeightQuantizer(
        weights_config(n_bits=4, params={"threshold": 0.5}))})(x)
    return keras.Model(inputs, outputs)


def test_trained_cnn_converts_with_identical_predictions_and_is_not_mutated(digits):
    x, y = digits
    model = compiled(small_cnn(lsq=True))
    model.fit(x[:128], y[:128], batch_size=32, epochs=1, verbose=0)
    before = [tf.convert_to_tensor(v).numpy().copy() for v in model.weights]
    layer_types = [type(layer) for layer in model.layers]
    converted = convert_to_inferable(model)
    np.testing.assert_array_equal(converted.predict(x[:100], verbose=0), model.predict(x[:100], verbose=0))
    assert [type(layer) for layer in model.layers] == layer_types
    for v, b in zip(model.weights, before, strict=True):
        np.testing.assert_array_equal(tf.convert_to_tensor(v).numpy(), b)
    assert not any(isinstance(layer, (KerasTrainableQuantizationWrapper, KerasActivationQuantizationHolder))
                   for layer in converted.layers)
    # The learned thresholds (per channel for kernels, one per holder) are baked into the inferable quantizers.
    thresholds = [v for v in model.weights if v.name.endswith("threshold")]
    assert sum(int(np.prod(v.shape)) for v in thresholds) == 8 + 16 + 10 + 3
    assert converted.count_params() == model.count_params() - (8 + 16 + 10 + 3)
    # The converted layers share nothing with the trained ones.
    trained_ids = {id(v) for v in model.weights}
    assert not any(id(v) in trained_ids for v in converted.weights)


def test_nested_model_converts_recursively():
    model = _nested_model()
    x = np.random.default_rng(1).normal(size=(9, 6)).astype(np.float32)
    converted = convert_to_inferable(model)
    np.testing.assert_array_equal(converted(x).numpy(), model(x).numpy())
    inner = converted.get_layer("inner")
    assert isinstance(inner.layers[0], KerasInferableQuantizationWrapper)
    assert isinstance(inner.layers[1], KerasInferableActivationQuantizationHolder)


def test_converted_model_saves_and_loads(tmp_path):
    model = _nested_model()
    converted = convert_to_inferable(model)
    converted.save(tmp_path / "c.keras")
    loaded = keras.models.load_model(tmp_path / "c.keras")
    x = np.random.default_rng(2).normal(size=(9, 6)).astype(np.float32)
    np.testing.assert_array_equal(loaded(x).numpy(), converted(x).numpy())
    quantizers = [q for layer in loaded.get_layer("inner").layers
                  for q in getattr(layer, "weights_quantizers", {}).values()]
    assert all(isinstance(q, BaseKerasInferableQuantizer) for q in quantizers)
    assert quantizers


def test_disabled_holder_converts_to_identity():
    inputs = keras.Input((3,))
    holder = KerasActivationQuantizationHolder(STESymmetricActivationQuantizer(activation_config(enable=False)))
    model = keras.Model(inputs, holder(inputs))
    converted = convert_to_inferable(model)
    assert isinstance(converted.layers[1], keras.layers.Identity)
    assert converted.layers[1].name == holder.name


def test_converted_inferable_layers_accept_low_precision_inputs():
    quantizer = ActivationSymmetricInferableQuantizer(num_bits=4, threshold=[2.0], signed=True)
    holder = KerasInferableActivationQuantizationHolder(quantizer)
    x = tf.constant([[0.3, -1.1, 5.0]], dtype="bfloat16")
    y = holder(x)
    assert y.dtype == "bfloat16"
    np.testing.assert_array_equal(tf.cast(y, "float32").numpy(), [[0.25, -1.0, 1.75]])


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(2)

    def call(self, x):
        return self.dense(x)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: keras.layers.Dense(2), "expects a Keras model, got <Dense"),
        (_Subclassed, "supports Sequential and Functional models; _Subclassed"),
        (lambda: keras.Sequential([keras.layers.Dense(2)]), "is not built"),
    ],
    ids=["not-a-model", "subclassed", "unbuilt"],
)
def test_unsupported_models_are_refused(make, message):
    with pytest.raises(TrainableInfraError, match=message):
        convert_to_inferable(make())


def test_learned_range_that_crossed_converts_to_the_range_trained():
    """range_min 0.7 > range_max 0.2: the grid spans [0, 0.2] (the range widened to contain zero), and the
    inferable quantizer is given that range."""
    model = _one_layer_model(LSQUniformActivationQuantizer, QuantizationMethod.UNIFORM)
    quantizer = model.layers[1].activation_holder_quantizer
    quantizer.range_min.assign(0.7)
    quantizer.range_max.assign(0.2)
    converted = convert_to_inferable(model)
    inferable = converted.layers[1].activation_holder_quantizer
    np.testing.assert_array_equal([inferable.min_range, inferable.max_range], [[0.0], [np.float32(0.2)]])
    x = np.linspace(-1.0, 1.0, 35, dtype=np.float32).reshape(7, 5)
    np.testing.assert_array_equal(converted(x).numpy(), model(x, training=False).numpy())


WEIGHT_CASES = [(c, m) for c, m, _ in EXPECTED_CLASSES if "Weight" in c.__name__]


@pytest.mark.parametrize(("quantizer_cls", "method"), WEIGHT_CASES,
                         ids=[f"{c.__name__}-{m.name}" for c, m in WEIGHT_CASES])
def test_converted_wrapper_computes_with_the_trained_wrappers_quantized_weights(quantizer_cls, method):
    model = _one_layer_model(quantizer_cls, method)
    x = np.random.default_rng(3).normal(size=(7, 5)).astype(np.float32)
    trained = model.layers[1].get_quantized_weights()
    converted = convert_to_inferable(model).layers[1]
    quantized = converted.get_quantized_weights()
    assert list(quantized) == list(trained) == ["kernel"]
    np.testing.assert_array_equal(quantized["kernel"].numpy(), trained["kernel"].numpy())
    # A Dense layer by hand on that kernel is what the converted wrapper computes.
    dense = converted.layer
    by_hand = keras.ops.matmul(x, quantized["kernel"]) + dense.bias
    np.testing.assert_array_equal(converted(x).numpy(), by_hand.numpy())


def test_trained_and_converted_cnn_give_identical_quantized_weights(digits):
    x, y = digits
    model = compiled(small_cnn(lsq=True))
    model.fit(x[:64], y[:64], batch_size=32, epochs=1, verbose=0)  # the thresholds move off their initial values
    converted = convert_to_inferable(model)
    wrappers = [layer for layer in model.layers if isinstance(layer, KerasTrainableQuantizationWrapper)]
    assert len(wrappers) == 3
    for wrapper in wrappers:
        twin = converted.get_layer(wrapper.name)
        assert isinstance(twin, KerasInferableQuantizationWrapper)
        trained, inferable = wrapper.get_quantized_weights(), twin.get_quantized_weights()
        assert list(trained) == list(inferable) == ["kernel"], wrapper.name
        np.testing.assert_array_equal(inferable["kernel"].numpy(), trained["kernel"].numpy(), err_msg=wrapper.name)
