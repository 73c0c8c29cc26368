"""Integer bias in the Keras backend (QATConfig.integer_bias): a wrapped layer that reads a holder's output adds
round(b / s)·s, s = Δ_in·Δ_w, in training, in inference, after reloading and in the converted model.

Oracles: `common.integer.quantize_bias` / `bias_scale`, with each step Δ = (max - min) / (2^n - 1) in float32
from the range of the mct-quantizers inferable quantizer (TensorFlow's fake-quant op derives its step so).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

from trainable_infra import (
    QATConfig,
    QuantizationConfigError,
    QuantizationMethod,
    TrainableQuantizerWeightsConfig,
    TrainingMethod,
)
from trainable_infra.common.integer import bias_scale, quantize_bias
from trainable_infra.keras_backend import (
    KerasActivationQuantizationHolder,
    KerasTrainableQuantizationWrapper,
    STESymmetricWeightQuantizer,
    convert_to_inferable,
    quantize_model,
)
from trainable_infra.keras_backend.fake_quant import integer_bias

X = np.random.default_rng(0).uniform(-1.0, 1.0, size=(8, 6, 6, 3)).astype(np.float32)
# Each reads a holder's output (dense through Flatten; the separable convolution's pointwise part the holder on its
# depthwise part's output).
ROUNDED = ("conv", "depthwise", "separable_pointwise", "dense", "head")


def bias_model(seed: int = 0) -> keras.Model:
    """Biases far from their grids: conv and depthwise (multiplier 2) after holders, a separable convolution
    (split into a depthwise part without bias and a pointwise part after its holder), a dense layer reading a holder
    through a Flatten and a dense head
    after a holder."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6, 6, 3), name="x")
    x = layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(inputs)
    x = layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same", activation="relu", name="depthwise")(x)
    x = layers.SeparableConv2D(4, 3, padding="same", activation="relu", name="separable")(x)
    x = layers.Flatten(name="flat")(x)
    x = layers.Dense(5, activation="relu", name="dense")(x)
    x = layers.Dense(3, name="head")(x)
    model = keras.Model(inputs, x, name="bias_model")
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if getattr(layer, "bias", None) is not None:
            layer.bias.assign(rng.normal(0.0, 0.3, size=layer.bias.shape).astype(np.float32))
    return model


def _wrappers(model):
    return {layer.name: layer for layer in model.layers if isinstance(layer, KerasTrainableQuantizationWrapper)}


def _holders(model):
    return {layer.name: layer for layer in model.layers if isinstance(layer, KerasActivationQuantizationHolder)}


def _step(quantizer) -> np.ndarray:
    inferable = quantizer.convert2inferable()
    low, high = np.float32(inferable.min_range), np.float32(inferable.max_range)
    return (high - low) / np.float32(2**inferable.num_bits - 1)


def _expected_bias(model, name: str) -> np.ndarray:
    wrapper = _wrappers(model)[name]
    input_step = _step(_holders(model)[wrapper.input_holder].activation_holder_quantizer)
    kernel_step = _step(wrapper.weights_quantizers["kernel"])
    if isinstance(wrapper.layer, layers.DepthwiseConv2D) and kernel_step.size > 1:
        kernel_step = np.repeat(kernel_step, wrapper.layer.depth_multiplier)  # per input channel -> per output
    return quantize_bias(wrapper.layer.bias.numpy(), bias_scale(input_step.reshape(()), kernel_step))


def _bias_in_forward(wrapper) -> np.ndarray:
    """What the wrapped layer adds to a zero input (no activation, zero kernel contribution): its bias."""
    shape = (1, *wrapper.input.shape[1:])
    inner_activation = wrapper.layer.activation
    wrapper.layer.activation = keras.activations.linear
    try:
        # In training: in inference the wrapper between two holders requantizes its output (integer eval).
        out = wrapper(np.zeros(shape, np.float32), training=True).numpy()
    finally:
        wrapper.layer.activation = inner_activation
    return out.reshape(-1, out.shape[-1])[0]


@pytest.fixture(scope="module")
def qat():
    return quantize_model(bias_model(), QATConfig(weight_n_bits=4), [X], progress=False)


def test_layers_reading_a_holder_round_their_bias_on_its_grid(qat):
    found = _wrappers(qat)
    assert {name for name, w in found.items() if w.input_holder is not None} == {*ROUNDED, "separable_depthwise"}
    assert found["separable_pointwise"].input_holder == "separable_depthwise_activation_quantizer"
    assert found["conv"].input_holder == "x_activation_quantizer"
    assert found["dense"].input_holder == "separable_pointwise_activation_quantizer"  # through the Flatten
    assert found["head"].input_holder == "dense_activation_quantizer"
    for name in ROUNDED:
        expected = _expected_bias(qat, name)
        assert not np.array_equal(expected, found[name].layer.bias.numpy()), name  # the rounding does something
        np.testing.assert_array_equal(found[name].integer_bias().numpy(), expected, err_msg=name)
        # Traced (as in fit and predict) too: the graph optimizer must not change the steps.
        np.testing.assert_array_equal(tf.function(found[name].integer_bias)().numpy(), expected, err_msg=name)
        np.testing.assert_array_equal(_bias_in_forward(found[name]), expected, err_msg=name)


@pytest.mark.parametrize("method", [QuantizationMethod.SYMMETRIC, QuantizationMethod.POWER_OF_TWO,
                                    QuantizationMethod.UNIFORM])
def test_per_tensor_kernels_and_other_grids_use_a_scalar_weight_step(method):
    config = QATConfig(weight_per_channel=False, weight_quantization_method=method,
                       activation_quantization_method=method, weight_n_bits=8)
    model = quantize_model(bias_model(), config, [X], progress=False)
    for name in ROUNDED:
        expected = _expected_bias(model, name)
        np.testing.assert_array_equal(_wrappers(model)[name].integer_bias().numpy(), expected)
        np.testing.assert_array_equal(tf.function(_wrappers(model)[name].integer_bias)().numpy(), expected)
    np.testing.assert_array_equal(convert_to_inferable(model).predict(X, verbose=0), model.predict(X, verbose=0))


def test_gradient_passes_straight_through_to_the_bias_and_not_to_the_steps():
    config = QATConfig(weight_training_method=TrainingMethod.LSQ, activation_training_method=TrainingMethod.LSQ)
    model = quantize_model(bias_model(), config, [X], progress=False)
    wrapper = _wrappers(model)["conv"]
    holder_threshold = _holders(model)["x_activation_quantizer"].activation_holder_quantizer.threshold
    kernel_threshold = wrapper.weights_quantizers["kernel"].threshold
    with tf.GradientTape(persistent=True) as tape:
        outputs = wrapper(tf.constant(X), training=True)
        total = tf.reduce_sum(outputs)
    # Straight through the rounding: d(sum)/d(bias) is the count of positions the relu passes, per channel.
    passed = np.sum(outputs.numpy() > 0, axis=(0, 1, 2)).astype(np.float32)
    np.testing.assert_array_equal(tape.gradient(total, wrapper.layer.bias), passed)
    # The holder's threshold reaches the wrapper's output only through the bias's grid: no gradient.
    assert tape.gradient(total, holder_threshold) is None
    assert tape.gradient(total, kernel_threshold) is not None


def test_rounding_matches_the_reference_at_ties_saturation_and_nan():
    scale = np.float32([0.5, 0.25, 1e-9, 1e-9, 2.0, 0.1])
    bias = np.float32([0.25, -0.375, 5.0, -5.0, np.nan, 0.35])  # ties to even, int32 saturation both ways, NaN
    np.testing.assert_array_equal(integer_bias(tf.constant(bias), tf.constant(scale)).numpy(),
                                  quantize_bias(bias, scale))


def test_fit_trains_the_float_bias():
    model = quantize_model(bias_model(), QATConfig(), [X], progress=False)
    before = _wrappers(model)["conv"].layer.bias.numpy().copy()
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    model.fit(X, np.ones((len(X), 3), np.float32), batch_size=4, epochs=1, verbose=0)
    assert not np.array_equal(_wrappers(model)["conv"].layer.bias.numpy(), before)


def test_save_reload_and_clone_keep_the_rounded_bias(qat, tmp_path):
    expected = qat(X, training=False).numpy()
    qat.save(tmp_path / "bias.keras")
    reloaded = keras.models.load_model(tmp_path / "bias.keras")  # safe mode
    clone = keras.models.clone_model(qat)
    clone.set_weights(qat.get_weights())
    for model in (reloaded, clone):
        for name in ROUNDED:
            np.testing.assert_array_equal(_wrappers(model)[name].integer_bias().numpy(), _expected_bias(qat, name))
        np.testing.assert_array_equal(model(X, training=False).numpy(), expected)


def test_sequential_model_reloads_with_its_input_holder(tmp_path):
    model = keras.Sequential([keras.Input((6, 6, 3)), layers.Conv2D(4, 3, name="conv"), layers.Flatten(),
                              layers.Dense(2, name="fc")])
    model.get_layer("conv").bias.assign(np.linspace(-0.7, 0.9, 4).astype(np.float32))
    qat = quantize_model(model, QATConfig(weight_n_bits=4, activation_n_bits=4), [X], progress=False)
    assert _wrappers(qat)["conv"].input_holder is not None
    qat.save(tmp_path / "sequential.keras")
    reloaded = keras.models.load_model(tmp_path / "sequential.keras")
    np.testing.assert_array_equal(reloaded(X, training=False).numpy(), qat(X, training=False).numpy())
    np.testing.assert_array_equal(_wrappers(reloaded)["conv"].integer_bias(), _wrappers(qat)["conv"].integer_bias())


def test_converted_model_stores_the_rounded_bias_and_is_bit_identical(qat, tmp_path):
    converted = convert_to_inferable(qat)
    for name in ROUNDED:
        np.testing.assert_array_equal(converted.get_layer(name).layer.bias.numpy(), _expected_bias(qat, name))
    np.testing.assert_array_equal(converted(X).numpy(), qat(X, training=False).numpy())
    converted.save(tmp_path / "inferable.keras")
    np.testing.assert_array_equal(keras.models.load_model(tmp_path / "inferable.keras")(X).numpy(),
                                  qat(X, training=False).numpy())


def test_integer_bias_off_keeps_the_float_bias():
    float_model = bias_model()
    model = quantize_model(float_model, QATConfig(weight_n_bits=4, integer_bias=False), [X], progress=False)
    assert all(w.input_holder is None for w in _wrappers(model).values())
    assert "input_holder" in _wrappers(model)["conv"].get_config()
    for name in ROUNDED:
        wrapper = _wrappers(model)[name]
        assert wrapper.integer_bias() is None
        float_layer = float_model.get_layer(name.removesuffix("_pointwise"))  # the pointwise part has its bias
        np.testing.assert_array_equal(_bias_in_forward(wrapper), float_layer.bias.numpy())
    converted = convert_to_inferable(model)
    np.testing.assert_array_equal(converted.get_layer("conv").layer.bias.numpy(),
                                  float_model.get_layer("conv").bias.numpy())
    np.testing.assert_array_equal(converted(X).numpy(), model(X, training=False).numpy())


def _weights_quantizer(n_bits=8):
    config = TrainableQuantizerWeightsConfig(QuantizationMethod.SYMMETRIC, n_bits, {"threshold": [1.0] * 4}, True, 3,
                                             True, 2.0**-16)
    return STESymmetricWeightQuantizer(config)


def test_input_holder_needs_a_kernel_quantizer():
    with pytest.raises(QuantizationConfigError, match="has no 'kernel' quantizer"):
        KerasTrainableQuantizationWrapper(layers.SeparableConv2D(4, 3), {"pointwise_kernel": _weights_quantizer()},
                                          input_holder="x_activation_quantizer")
    with pytest.raises(QuantizationConfigError, match="input_holder must be None or the name"):
        KerasTrainableQuantizationWrapper(layers.Conv2D(4, 3), {"kernel": _weights_quantizer()}, input_holder="")


def test_wrapper_called_away_from_its_holder_says_so():
    wrapper = KerasTrainableQuantizationWrapper(layers.Conv2D(4, 3), {"kernel": _weights_quantizer()},
                                                input_holder="missing_activation_quantizer")
    with pytest.raises(QuantizationConfigError, match="has not found it"):
        wrapper(X)


def _pooled_model(seed: int = 0) -> keras.Model:
    """A convolution read through MaxPooling and ZeroPadding (values of the holder's grid), and dense heads after
    an average pooling of unsigned values and after a Flatten of signed ones."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6, 6, 3), name="x")
    x = layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(inputs)
    x = layers.MaxPooling2D(name="max")(x)
    x = layers.ZeroPadding2D(name="pad")(x)
    x = layers.Conv2D(4, 3, name="conv2")(x)
    pooled = layers.Dense(3, name="pooled_head")(layers.GlobalAveragePooling2D(name="pool")(
        layers.ReLU(name="relu")(x)))
    flat = layers.Dense(3, name="flat_head")(layers.Flatten(name="flat")(layers.AveragePooling2D(2, name="avg")(x)))
    return keras.Model(inputs, [pooled, flat], name="pooled")


def test_every_quantized_layer_reads_a_quantized_input():
    qat = quantize_model(_pooled_model(), QATConfig(weight_n_bits=4), [X], progress=False)
    found, holders = _wrappers(qat), _holders(qat)
    assert found["conv2"].input_holder == "conv_activation_quantizer"  # through MaxPooling2D and ZeroPadding2D
    # After the poolings, the operations that left the grid: unsigned after the relu, signed after conv2.
    assert found["pooled_head"].input_holder == "pooled_head_input_activation_quantizer"
    assert found["flat_head"].input_holder == "flat_head_input_activation_quantizer"
    assert not holders["pooled_head_input_activation_quantizer"].activation_holder_quantizer.params.signed
    assert holders["flat_head_input_activation_quantizer"].activation_holder_quantizer.params.signed
    assert qat.get_layer("flat_head_input_activation_quantizer").input.name == qat.get_layer("avg").output.name
    for name in ("conv2", "pooled_head", "flat_head"):
        np.testing.assert_array_equal(found[name].integer_bias().numpy(), _expected_bias(qat, name), err_msg=name)
    converted = convert_to_inferable(qat)
    np.testing.assert_array_equal(converted.predict(X, verbose=0)[1], qat.predict(X, verbose=0)[1])


def test_without_integer_bias_no_holder_is_added():
    qat = quantize_model(_pooled_model(), QATConfig(integer_bias=False), [X], progress=False)
    assert not [name for name in _holders(qat) if "_input_" in name]
    assert all(w.input_holder is None for w in _wrappers(qat).values())
