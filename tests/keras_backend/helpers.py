"""Configs and small models shared by the Keras backend tests."""

import keras

from trainable_infra import QuantizationMethod, TrainableQuantizerActivationConfig, TrainableQuantizerWeightsConfig
from trainable_infra.keras_backend import (
    KerasActivationQuantizationHolder,
    KerasTrainableQuantizationWrapper,
    LSQSymmetricActivationQuantizer,
    LSQSymmetricWeightQuantizer,
    STESymmetricActivationQuantizer,
    STESymmetricWeightQuantizer,
)

MIN_THRESHOLD = 2.0**-16


def weights_config(method=QuantizationMethod.SYMMETRIC, n_bits=8, params=None, axis=-1, per_channel=True,
                   enable=True):
    """A weights config; symmetric with threshold 1.0 unless told otherwise."""
    return TrainableQuantizerWeightsConfig(
        method, n_bits, {"threshold": 1.0} if params is None else params, enable, axis, per_channel, MIN_THRESHOLD
    )


def activation_config(method=QuantizationMethod.SYMMETRIC, n_bits=8, params=None, enable=True):
    """An activation config; unsigned symmetric with threshold 4.0 unless told otherwise."""
    return TrainableQuantizerActivationConfig(
        method, n_bits, {"threshold": 4.0, "is_signed": False} if params is None else params, enable, MIN_THRESHOLD
    )


def small_cnn(lsq: bool = False, n_bits: int = 4, input_shape=(8, 8, 1), classes: int = 10) -> keras.Model:
    """A Functional CNN with quantized convolution / dense kernels and quantized activations."""
    w_cls = LSQSymmetricWeightQuantizer if lsq else STESymmetricWeightQuantizer
    a_cls = LSQSymmetricActivationQuantizer if lsq else STESymmetricActivationQuantizer

    def wrap(layer, threshold):
        quantizer = w_cls(weights_config(n_bits=n_bits, params={"threshold": threshold}))
        return KerasTrainableQuantizationWrapper(layer, {"kernel": quantizer})

    def hold(threshold):
        params = {"threshold": threshold, "is_signed": False}
        return KerasActivationQuantizationHolder(a_cls(activation_config(n_bits=n_bits, params=params)))

    keras.utils.set_random_seed(0)
    inputs = keras.Input(input_shape)
    x = KerasActivationQuantizationHolder(
        a_cls(activation_config(n_bits=8, params={"threshold": 16.0, "is_signed": False}))
    )(inputs)
    x = wrap(keras.layers.Conv2D(8, 3, padding="same"), 0.5)(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = hold(4.0)(x)
    x = wrap(keras.layers.Conv2D(16, 3, strides=2, padding="same"), 0.25)(x)
    x = keras.layers.ReLU()(x)
    x = hold(4.0)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = wrap(keras.layers.Dense(classes), 0.5)(x)
    return keras.Model(inputs, outputs)


def compiled(model: keras.Model, **kwargs) -> keras.Model:
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        **kwargs,
    )
    return model
