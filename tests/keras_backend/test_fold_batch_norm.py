"""BatchNormalization folding in Keras `quantize_model` (QATConfig.fold_batch_norm).

Oracles: the float model in inference mode (the folded layer computes conv -> BN to float rounding) and
`common.integer.fold_batch_norm`'s maths (the weight quantizer starts at max |folded kernel| per channel).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import layers

from tests.keras_backend.zoo import tiny_sequential
from trainable_infra import QATConfig
from trainable_infra.keras_backend import KerasTrainableQuantizationWrapper, convert_to_inferable, quantize_model

X = np.random.default_rng(0).uniform(-1.0, 1.0, size=(8, 6, 6, 3)).astype(np.float32)
# The separable convolution is split: its BatchNormalization folds into the pointwise part.
FOLDED = {"conv_bn": "conv", "up_bn": "up", "depthwise_bn": "depthwise", "separable_bn": "separable_pointwise",
          "dense_bn": "dense"}
SEPARABLE_PARTS = ("separable_depthwise", "separable_pointwise")
KEPT = ("after_activation_bn", "shared_bn")  # after a layer's own activation; after an output read twice


def bn_model(seed: int = 0) -> keras.Model:
    """Every foldable kind (with and without bias, scale or center) and two BatchNormalizations that must stay."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6, 6, 3), name="x")
    x = layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    x = layers.ReLU(name="conv_relu")(layers.BatchNormalization(name="conv_bn")(x))
    x = layers.Conv2DTranspose(5, 3, padding="same", use_bias=False, name="up")(x)
    x = layers.ReLU(name="up_relu")(layers.BatchNormalization(scale=False, name="up_bn")(x))
    # depth_multiplier 2: output channel c = input channel c // 2, multiplier c % 2.
    x = layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same", use_bias=False, name="depthwise")(x)
    x = layers.ReLU(name="depthwise_relu")(layers.BatchNormalization(center=False, name="depthwise_bn")(x))
    x = layers.SeparableConv2D(4, 3, padding="same", name="separable")(x)
    x = layers.BatchNormalization(name="separable_bn")(x)
    x = layers.Conv2D(4, 1, activation="relu", name="activated")(x)
    x = layers.BatchNormalization(name="after_activation_bn")(x)
    shared = layers.Conv2D(4, 1, name="shared")(x)
    x = layers.Add(name="add")([layers.BatchNormalization(name="shared_bn")(shared), shared])
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dense(6, use_bias=False, name="dense")(x)
    outputs = layers.BatchNormalization(scale=False, center=False, name="dense_bn")(x)
    model = keras.Model(inputs, outputs, name="bn_model")
    rng = np.random.default_rng(seed)
    for layer in model.layers:  # statistics and affine parameters far from the identity
        if isinstance(layer, layers.BatchNormalization):
            for variable in (layer.moving_mean, layer.gamma, layer.beta):
                if variable is not None:
                    variable.assign(rng.normal(0.3, 0.5, size=variable.shape).astype(np.float32))
            layer.moving_variance.assign(rng.uniform(0.2, 3.0, size=layer.moving_variance.shape).astype(np.float32))
    return model


def _wrappers(model):
    return {layer.name: layer for layer in model.layers if isinstance(layer, KerasTrainableQuantizationWrapper)}


def _batch_norms(model):
    return sorted(layer.name for layer in model.layers if isinstance(layer, layers.BatchNormalization))


def test_folded_batch_norms_are_left_out_and_the_others_kept():
    qat = quantize_model(bn_model(), QATConfig(), [X], progress=False)
    assert _batch_norms(qat) == sorted(KEPT)
    assert all(_wrappers(qat)[name].layer.use_bias for name in FOLDED.values())


def test_folded_layers_compute_the_float_layer_then_batch_norm():
    float_model = bn_model()
    qat = quantize_model(float_model, QATConfig(), [X], progress=False)
    found = _wrappers(qat)
    for bn_name, name in FOLDED.items():
        layer, bn = float_model.get_layer(name.removesuffix("_pointwise")), float_model.get_layer(bn_name)
        inputs = keras.ops.convert_to_tensor(
            X if name == "conv" else np.random.default_rng(1).normal(size=(4, *layer.input.shape[1:])).astype("f"))
        expected = bn(layer(inputs), training=False)
        computed = found["separable_depthwise"].layer(inputs) if name == "separable_pointwise" else inputs
        np.testing.assert_allclose(found[name].layer(computed), expected, rtol=1e-5, atol=1e-5, err_msg=name)


def test_float_path_of_the_folded_model_equals_the_float_model_in_inference():
    float_model = bn_model()
    config = QATConfig(weight_n_bits=16, quantize_activations=False)
    qat = quantize_model(float_model, config, progress=False)
    expected = float_model(X, training=False).numpy()
    # 16-bit weights: relative error ~1e-5 per weight.
    np.testing.assert_allclose(qat(X, training=False).numpy(), expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())


def test_weight_quantizer_starts_at_max_abs_of_the_folded_kernel():
    qat = quantize_model(bn_model(), QATConfig(weight_n_bits=4), [X], progress=False)
    found = _wrappers(qat)
    for name, attribute, axes in (
        ("conv", "kernel", (0, 1, 2)),
        ("up", "kernel", (0, 1, 3)),  # transposed: (3, 3, out, in)
        ("depthwise", "kernel", (0, 1, 3)),  # per input channel, as without folding
        ("separable_pointwise", "kernel", (0, 1, 2)),
        ("dense", "kernel", (0,)),
    ):
        kernel = getattr(found[name].layer, attribute).numpy()
        threshold = found[name].weights_quantizers[attribute].threshold.numpy()
        np.testing.assert_array_equal(threshold, np.abs(kernel).max(axis=axes), err_msg=name)


def test_depthwise_multiplier_channels_fold_in_input_major_order():
    float_model = bn_model()
    qat = quantize_model(float_model, QATConfig(), [X], progress=False)
    kernel = float_model.get_layer("depthwise").kernel.numpy()  # (3, 3, 5, 2)
    bn = float_model.get_layer("depthwise_bn")
    factor = (bn.gamma.numpy() / np.sqrt(bn.moving_variance.numpy() + bn.epsilon)).reshape(5, 2)
    folded = _wrappers(qat)["depthwise"].layer.kernel.numpy()
    np.testing.assert_allclose(folded, kernel * factor, rtol=1e-6)


def test_folding_off_keeps_every_batch_norm_and_the_layers_as_they_were():
    float_model = bn_model()
    qat = quantize_model(float_model, QATConfig(fold_batch_norm=False), [X], progress=False)
    assert _batch_norms(qat) == _batch_norms(float_model)
    for name, wrapper in _wrappers(qat).items():
        if name in SEPARABLE_PARTS:
            continue  # new layers, not in the float model: test_separable compares them with the separable one
        assert wrapper.layer.use_bias == float_model.get_layer(name).use_bias, name
        for mine, theirs in zip(wrapper.layer.get_weights(), float_model.get_layer(name).get_weights(), strict=True):
            np.testing.assert_array_equal(mine, theirs)


def test_sequential_model_folds_and_stays_sequential():
    float_model = tiny_sequential()
    qat = quantize_model(float_model, QATConfig(weight_n_bits=16, activation_n_bits=16), [X[..., :1]],
                         progress=False)
    assert isinstance(qat, keras.Sequential)
    assert "bn" not in [layer.name for layer in qat.layers]
    assert _wrappers(qat)["conv"].layer.use_bias


def test_folded_model_saves_reloads_and_converts_bit_identically(tmp_path):
    qat = quantize_model(bn_model(), QATConfig(weight_n_bits=4), [X], progress=False)
    expected = qat(X, training=False).numpy()
    qat.save(tmp_path / "folded.keras")
    reloaded = keras.models.load_model(tmp_path / "folded.keras")  # safe mode
    assert _batch_norms(reloaded) == sorted(KEPT)
    np.testing.assert_array_equal(reloaded(X, training=False).numpy(), expected)
    np.testing.assert_array_equal(convert_to_inferable(qat)(X).numpy(), expected)
    np.testing.assert_array_equal(convert_to_inferable(reloaded)(X).numpy(), expected)


@pytest.mark.parametrize("fold", [True, False])
def test_folded_model_trains(fold):
    qat = quantize_model(bn_model(), QATConfig(weight_n_bits=4, fold_batch_norm=fold), [X], progress=False)
    qat.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    history = qat.fit(X, np.zeros((len(X), 6), np.float32), batch_size=4, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
