"""The weights wrapper and the activation holder inside Keras layers, models, `fit` and stateless calls."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.keras_backend.helpers import activation_config, compiled, small_cnn, weights_config
from trainable_infra import QuantizationMethod, VariableGroup
from trainable_infra.common import numerics as nm
from trainable_infra.common.errors import QuantizationConfigError
from trainable_infra.keras_backend import (
    KerasActivationQuantizationHolder,
    KerasInferableActivationQuantizationHolder,
    KerasTrainableQuantizationWrapper,
    LSQSymmetricActivationQuantizer,
    LSQSymmetricWeightQuantizer,
    LSQUniformWeightQuantizer,
    STESymmetricActivationQuantizer,
    STESymmetricWeightQuantizer,
    STEUniformWeightQuantizer,
)

RNG = np.random.default_rng(0)

# (layer factory, input shape, quantized attribute, channel axis of that variable)
LAYERS = {
    "dense": (lambda: keras.layers.Dense(5), (4, 6), "kernel", -1),
    "conv2d": (lambda: keras.layers.Conv2D(4, 3, padding="same"), (2, 6, 6, 3), "kernel", -1),
    "depthwise": (lambda: keras.layers.DepthwiseConv2D(3, depth_multiplier=2), (2, 6, 6, 3), "kernel", 2),
    "conv2d-transpose": (lambda: keras.layers.Conv2DTranspose(4, 3), (2, 5, 5, 3), "kernel", 2),
    "conv1d-axis0-per-tensor": (lambda: keras.layers.Conv1D(4, 3), (2, 7, 3), "kernel", None),
}
QUANTIZERS = {
    "ste-symmetric": (STESymmetricWeightQuantizer, QuantizationMethod.SYMMETRIC),
    "ste-uniform": (STEUniformWeightQuantizer, QuantizationMethod.UNIFORM),
    "lsq-pot": (LSQSymmetricWeightQuantizer, QuantizationMethod.POWER_OF_TWO),
    "lsq-uniform": (LSQUniformWeightQuantizer, QuantizationMethod.UNIFORM),
}


def _quantizer(kind, axis, n_bits=4):
    cls, method = QUANTIZERS[kind]
    params = {"range_min": -0.3, "range_max": 0.2} if method is QuantizationMethod.UNIFORM else {"threshold": 0.3}
    return cls(weights_config(method, n_bits, params, axis=-1 if axis is None else axis, per_channel=axis is not None))


def _oracle(layer, attribute, quantized_value, input_shape):
    """The same layer with the quantized value written into its variable: what the wrapper must compute."""
    clone = layer.__class__.from_config(layer.get_config())
    clone.build(input_shape)
    for source, target in zip(layer.weights, clone.weights, strict=True):
        target.assign(quantized_value if source is getattr(layer, attribute) else source)
    return clone


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("kind", list(QUANTIZERS))
@pytest.mark.parametrize("layer_name", list(LAYERS))
def test_wrapper_output_is_the_layer_on_its_quantized_weight(layer_name, kind, training):
    factory, shape, attribute, axis = LAYERS[layer_name]
    layer = factory()
    quantizer = _quantizer(kind, axis)
    wrapper = KerasTrainableQuantizationWrapper(layer, {attribute: quantizer})
    x = tf.constant(RNG.normal(size=shape).astype(np.float32))
    y = wrapper(x, training=training)
    variable = getattr(layer, attribute)
    expected_weight = quantizer.convert2inferable()(tf.convert_to_tensor(variable))
    assert not np.array_equal(expected_weight.numpy(), variable.numpy()), "quantization changes the weight"
    oracle = _oracle(layer, attribute, expected_weight, shape)
    np.testing.assert_array_equal(y.numpy(), oracle(x).numpy())


@pytest.mark.parametrize("layer_name", ["dense", "depthwise"])
def test_ste_gradient_reaches_the_float_weight_through_the_clipped_identity(layer_name):
    factory, shape, attribute, axis = LAYERS[layer_name]
    layer = factory()
    quantizer = _quantizer("ste-symmetric", axis, n_bits=3)
    wrapper = KerasTrainableQuantizationWrapper(layer, {attribute: quantizer})
    x = tf.constant(RNG.normal(size=shape).astype(np.float32))
    wrapper.build(shape)
    variable = getattr(layer, attribute)
    variable.assign(variable * 3.0)  # put some weights outside the threshold
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(wrapper(x, training=True) ** 2)
    grad = tape.gradient(loss, variable)
    q_weight = quantizer.convert2inferable()(tf.convert_to_tensor(variable))
    oracle = _oracle(layer, attribute, q_weight, shape)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(oracle(x) ** 2)
    oracle_grad = tape.gradient(loss, getattr(oracle, attribute))
    mask = nm.ste_mask_symmetric(variable.numpy(), 0.3, 3, channel_axis=axis)
    assert 0 < mask.mean() < 1
    np.testing.assert_allclose(grad.numpy(), oracle_grad.numpy() * mask, rtol=1e-6, atol=1e-7)


def test_lsq_wrapper_trains_weights_and_threshold():
    quantizer = _quantizer("lsq-pot", -1)
    wrapper = KerasTrainableQuantizationWrapper(keras.layers.Dense(3), {"kernel": quantizer})
    x = tf.constant(RNG.normal(size=(8, 4)).astype(np.float32))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(wrapper(x, training=True) ** 2)
    variables = wrapper.trainable_variables
    assert {v.name for v in variables} == {"kernel_threshold", "kernel", "bias"}
    grads = tape.gradient(loss, variables)
    assert all(g is not None and np.any(g.numpy() != 0) for g in grads)


def _sequential():
    keras.utils.set_random_seed(1)
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        KerasActivationQuantizationHolder(STESymmetricActivationQuantizer(activation_config(
            params={"threshold": 16.0, "is_signed": False}))),
        KerasTrainableQuantizationWrapper(keras.layers.Conv2D(8, 3), {"kernel": _quantizer("ste-symmetric", -1)}),
        keras.layers.ReLU(),
        KerasActivationQuantizationHolder(LSQSymmetricActivationQuantizer(activation_config(n_bits=4))),
        keras.layers.Flatten(),
        KerasTrainableQuantizationWrapper(keras.layers.Dense(10), {"kernel": _quantizer("lsq-uniform", -1)}),
    ])


@pytest.mark.parametrize("build", [_sequential, small_cnn], ids=["sequential", "functional"])
def test_model_fits_for_two_epochs_and_loss_falls(build, digits):
    x, y = digits
    model = compiled(build())
    history = model.fit(x[:640], y[:640], batch_size=64, epochs=2, verbose=0, shuffle=False)
    loss = history.history["loss"]
    assert np.all(np.isfinite(loss))
    assert loss[1] < loss[0]


def test_eager_and_graph_fit_agree(digits):
    x, y = digits
    results = []
    for run_eagerly in (True, False):
        model = small_cnn(lsq=True)
        # Plain SGD: Adam would magnify float noise in gradients that are zero in exact arithmetic (a conv bias
        # followed by batch norm).
        model.compile(keras.optimizers.SGD(0.05), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      run_eagerly=run_eagerly)
        model.fit(x[:96], y[:96], batch_size=32, epochs=1, verbose=0, shuffle=False)
        results.append([v.numpy() for v in model.weights])
    for eager, graph in zip(*results, strict=True):
        np.testing.assert_allclose(eager, graph, rtol=1e-4, atol=1e-5)


def test_quantized_batch_norm_updates_its_statistics_in_training_only():
    bn = keras.layers.BatchNormalization(momentum=0.5)
    wrapper = KerasTrainableQuantizationWrapper(bn, {"gamma": _quantizer("ste-symmetric", None, n_bits=8)})
    x = tf.constant(RNG.normal(loc=3.0, size=(16, 4)).astype(np.float32))
    wrapper(x, training=False)
    np.testing.assert_array_equal(bn.moving_mean.numpy(), np.zeros(4))
    wrapper(x, training=True)
    np.testing.assert_allclose(bn.moving_mean.numpy(), 0.5 * x.numpy().mean(axis=0), rtol=1e-5)


def test_activity_regularization_of_the_wrapped_layer_is_kept():
    dense = keras.layers.Dense(3, activity_regularizer=keras.regularizers.L2(0.1))
    inputs = keras.Input((4,))
    outputs = KerasTrainableQuantizationWrapper(dense, {"kernel": _quantizer("ste-symmetric", -1)})(inputs)
    model = keras.Model(inputs, outputs)
    x = RNG.normal(size=(2, 4)).astype(np.float32)
    y = model(x)
    assert len(model.losses) == 1
    np.testing.assert_allclose(model.losses[0].numpy(), 0.1 * np.sum(y.numpy() ** 2) / 2, rtol=1e-5)


def test_stateless_call_reads_the_values_it_is_given():
    model = _sequential()
    x = RNG.uniform(0, 16, size=(2, 8, 8, 1)).astype(np.float32)
    trainable = [tf.convert_to_tensor(v) * 0.5 for v in model.trainable_variables]
    outputs, _ = model.stateless_call(trainable, [tf.convert_to_tensor(v) for v in model.non_trainable_variables], x)
    for variable, value in zip(model.trainable_variables, trainable, strict=True):
        variable.assign(value)
    np.testing.assert_array_equal(outputs.numpy(), model(x).numpy())


def test_frozen_quantizer_parameters_do_not_move_in_fit(digits):
    x, y = digits
    frozen = LSQSymmetricWeightQuantizer(weights_config(n_bits=4, params={"threshold": 0.5}), freeze_quant_params=True)
    learning = LSQSymmetricActivationQuantizer(activation_config(n_bits=4))
    model = compiled(keras.Sequential([
        keras.Input((8, 8, 1)),
        KerasTrainableQuantizationWrapper(keras.layers.Conv2D(4, 3), {"kernel": frozen}),
        KerasActivationQuantizationHolder(learning),
        keras.layers.Flatten(),
        keras.layers.Dense(10),
    ]))
    assert all(v is not frozen.threshold for v in model.trainable_variables)
    model.fit(x[:64], y[:64], batch_size=32, epochs=1, verbose=0)
    np.testing.assert_array_equal(frozen.threshold.numpy(), 0.5)
    assert learning.threshold.numpy() != 4.0


def test_disabled_quantizers_leave_the_layer_and_tensor_alone():
    dense = keras.layers.Dense(3)
    wrapper = KerasTrainableQuantizationWrapper(dense, {"kernel": STESymmetricWeightQuantizer(
        weights_config(enable=False))})
    holder = KerasActivationQuantizationHolder(STESymmetricActivationQuantizer(activation_config(enable=False)))
    x = tf.constant(RNG.normal(size=(2, 4)).astype(np.float32) * 10)
    np.testing.assert_array_equal(wrapper(x).numpy(), dense(x).numpy())
    np.testing.assert_array_equal(holder(x).numpy(), x.numpy())


def test_wrapping_an_already_built_layer_keeps_its_weights():
    dense = keras.layers.Dense(3)
    dense.build((None, 4))
    before = dense.kernel.numpy().copy()
    quantizer = _quantizer("ste-symmetric", -1)
    wrapper = KerasTrainableQuantizationWrapper(dense, {"kernel": quantizer})
    wrapper(tf.ones((1, 4)))
    np.testing.assert_array_equal(dense.kernel.numpy(), before)
    assert wrapper.name == f"quant_{dense.name}"
    # The layer's own variables, and the STE threshold as a non-trainable weight of the wrapper.
    assert sorted(id(v) for v in wrapper.weights) == sorted([id(v) for v in dense.weights] + [id(quantizer.threshold)])
    assert [id(v) for v in wrapper.trainable_weights] == [id(v) for v in dense.trainable_weights]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_holder_returns_the_input_dtype_and_quantizes_in_float32(dtype):
    holder = KerasActivationQuantizationHolder(LSQSymmetricActivationQuantizer(activation_config(n_bits=4)))
    x = tf.constant(RNG.uniform(0, 5, size=(3, 6)).astype(np.float32))
    low = tf.cast(x, dtype)
    y = holder(low, training=True)
    assert y.dtype == dtype
    np.testing.assert_array_equal(tf.cast(y, "float32").numpy(), tf.cast(tf.cast(holder(tf.cast(low, "float32")),
                                                                                  dtype), "float32").numpy())


def test_mixed_precision_model_trains_with_float32_quantizer_variables(digits):
    x, y = digits
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    try:
        model = compiled(small_cnn(lsq=True))
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    history = model.fit(x[:64], y[:64], batch_size=32, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert model.layers[2].compute_dtype == "bfloat16"
    assert all(v.dtype == "float32" for v in model.weights)
    assert model(x[:2]).dtype == "bfloat16"
    thresholds = [v for v in model.weights if v.name.endswith("threshold")]
    assert len(thresholds) == 6
    assert all(np.isfinite(v.numpy()).all() for v in thresholds)


def test_quantizer_variables_are_wrapper_weights_and_get_trainable_variables_lists_them():
    quantizer = _quantizer("lsq-uniform", -1)
    wrapper = KerasTrainableQuantizationWrapper(keras.layers.Dense(3), {"kernel": quantizer})
    wrapper.build((None, 4))
    own = {v.name for v in wrapper._trainable_variables}
    assert own == {"kernel_range_min", "kernel_range_max"}
    assert {v.name for v in quantizer.get_trainable_variables(VariableGroup.QPARAMS)} == own


def test_models_with_quantizers_are_not_compiled_with_xla():
    # XLA's fake-quant lowering does not round like TensorFlow's kernels, which the inferable quantizers use.
    model = _sequential()
    with pytest.warns(UserWarning, match="doesn't support `jit_compile=True`"):
        model.compile(optimizer="sgd", loss="mse", jit_compile=True)
    assert model.jit_compile is False
    assert not any(layer.supports_jit for layer in model.layers if "quant" in type(layer).__name__.lower())


@pytest.mark.parametrize("kind", list(QUANTIZERS))
@pytest.mark.parametrize("layer_name", list(LAYERS))
def test_get_quantized_weights_are_what_the_layer_computes_with_in_eval(layer_name, kind):
    factory, shape, attribute, axis = LAYERS[layer_name]
    layer = factory()
    quantizer = _quantizer(kind, axis)
    wrapper = KerasTrainableQuantizationWrapper(layer, {attribute: quantizer})
    x = tf.constant(RNG.normal(size=shape).astype(np.float32))
    y = wrapper(x, training=False)
    quantized = wrapper.get_quantized_weights()
    assert list(quantized) == [attribute]
    assert quantized[attribute].dtype == tf.float32
    inferable = quantizer.convert2inferable()(tf.convert_to_tensor(getattr(layer, attribute)))
    np.testing.assert_array_equal(quantized[attribute].numpy(), inferable.numpy())
    np.testing.assert_array_equal(y.numpy(), _oracle(layer, attribute, quantized[attribute], shape)(x).numpy())


def test_dense_applied_by_hand_on_get_quantized_weights_is_the_wrapper_eval_output():
    dense = keras.layers.Dense(5)
    wrapper = KerasTrainableQuantizationWrapper(dense, {"kernel": _quantizer("lsq-uniform", -1, n_bits=3)})
    x = tf.constant(RNG.normal(size=(7, 6)).astype(np.float32))
    y = wrapper(x, training=False)
    kernel = wrapper.get_quantized_weights()["kernel"]
    assert not np.array_equal(kernel.numpy(), dense.kernel.numpy()), "quantization changes the kernel"
    np.testing.assert_array_equal(y.numpy(), (keras.ops.matmul(x, kernel) + dense.bias).numpy())


def test_get_quantized_weights_leaves_out_disabled_quantizers_and_needs_a_built_wrapper():
    dense = keras.layers.Dense(3)
    wrapper = KerasTrainableQuantizationWrapper(dense, {"kernel": STESymmetricWeightQuantizer(
        weights_config(enable=False))})
    with pytest.raises(QuantizationConfigError, match=r"layer 'quant_dense\w*' is not built"):
        wrapper.get_quantized_weights()
    wrapper.build((None, 4))
    assert wrapper.get_quantized_weights() == {}


def _built_holders():
    trainable = KerasActivationQuantizationHolder(LSQSymmetricActivationQuantizer(activation_config(n_bits=4)))
    trainable.build((None, 6))
    inferable = KerasInferableActivationQuantizationHolder(trainable.activation_holder_quantizer.convert2inferable())
    return {"trainable": trainable, "inferable": inferable}


@pytest.mark.parametrize("kind", ["trainable", "inferable"])
def test_activation_quantizer_is_a_deprecated_read_only_alias_of_activation_holder_quantizer(kind):
    holder = _built_holders()[kind]
    message = r"activation_quantizer is deprecated.*read activation_holder_quantizer"
    with pytest.warns(DeprecationWarning, match=message) as w:
        alias = holder.activation_quantizer
    assert alias is holder.activation_holder_quantizer
    assert {record.filename for record in w if issubclass(record.category, DeprecationWarning)} == {__file__}
    other = _built_holders()[kind].activation_holder_quantizer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Keras' __setattr__ reads the attribute first
        with pytest.raises(AttributeError, match="activation_quantizer"):
            holder.activation_quantizer = other
    assert holder.activation_holder_quantizer is alias
    # Keras' saving reads every attribute dir() lists; the alias is hidden there so that saving does not warn.
    assert "activation_quantizer" not in dir(holder)
    assert "activation_holder_quantizer" in dir(holder)
