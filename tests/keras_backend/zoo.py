"""Float Functional models written here (no keras.applications) for the model-level tests: residual adds,
depthwise and separable convolutions, concatenation, transposed convolutions."""

from __future__ import annotations

import keras
from keras import layers


def _conv_bn(x, filters: int, kernel: int, name: str, stride: int = 1, relu: bool = True):
    x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=name)(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x) if relu else x


def _basic_block(x, channels: int, stride: int, name: str):
    out = channels * stride
    y = _conv_bn(x, out, 3, f"{name}_conv1", stride)
    y = _conv_bn(y, out, 3, f"{name}_conv2", relu=False)
    shortcut = _conv_bn(x, out, 1, f"{name}_shortcut", stride, relu=False) if stride != 1 else x
    y = layers.Add(name=f"{name}_add")([y, shortcut])
    return layers.ReLU(name=f"{name}_out")(y)


def tiny_resnet(classes: int = 10, seed: int = 0) -> keras.Model:
    """ResNet-style: stem, two basic blocks (one downsampling, with a 1x1 shortcut), pooled dense head."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 1), name="x")
    x = _conv_bn(inputs, 8, 3, "stem")
    x = _basic_block(x, 8, 1, "layer1")
    x = _basic_block(x, 8, 2, "layer2")
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, layers.Dense(classes, name="fc")(x), name="tiny_resnet")


def tiny_mobilenet(classes: int = 10, seed: int = 0) -> keras.Model:
    """MobileNet-style: an inverted residual with a depthwise convolution, two branches (a convolution with its own
    ReLU, a separable convolution) concatenated, a pooled dense head."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 1), name="x")
    x = layers.Conv2D(8, 3, padding="same", use_bias=False, name="stem")(inputs)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.ReLU(max_value=6.0, name="stem_relu6")(x)
    y = layers.Conv2D(16, 1, use_bias=False, name="expand")(x)
    y = layers.BatchNormalization(name="expand_bn")(y)
    y = layers.ReLU(max_value=6.0, name="expand_relu6")(y)
    y = layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="depthwise")(y)
    y = layers.BatchNormalization(name="depthwise_bn")(y)
    y = layers.Activation("relu6", name="depthwise_relu6")(y)
    y = layers.Conv2D(8, 1, use_bias=False, name="project")(y)
    y = layers.BatchNormalization(name="project_bn")(y)
    x = layers.Add(name="add")([x, y])
    a = layers.Conv2D(4, 1, activation="relu", name="branch_a")(x)
    b = layers.SeparableConv2D(4, 3, padding="same", name="branch_b")(x)
    b = layers.ReLU(name="branch_b_relu")(b)
    x = layers.Concatenate(name="cat")([a, b])
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, layers.Dense(classes, name="head")(x), name="tiny_mobilenet")


def tiny_decoder(seed: int = 0) -> keras.Model:
    """Transposed and 1-D convolutions: an upsampling Conv2DTranspose, then rows read as sequences by a Conv1D."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 1), name="x")
    x = layers.Conv2DTranspose(6, 3, strides=2, padding="same", activation="relu", name="up")(inputs)
    x = layers.Reshape((16, 16 * 6), name="rows")(x)
    x = layers.Conv1D(5, 3, padding="same", name="seq")(x)
    x = layers.Activation("tanh", name="seq_tanh")(x)
    x = layers.GlobalAveragePooling1D(name="pool")(x)
    return keras.Model(inputs, layers.Dense(10, name="fc")(x), name="tiny_decoder")


def tiny_sequential(seed: int = 0) -> keras.Sequential:
    """The demo's kind of model as a Sequential: convolution, BatchNormalization, ReLU, pooled dense head."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((8, 8, 1), name="image"),
        layers.Conv2D(8, 3, padding="same", name="conv"),
        layers.BatchNormalization(name="bn"),
        layers.ReLU(name="relu"),
        layers.GlobalAveragePooling2D(name="pool"),
        layers.Dense(10, name="fc"),
    ], name="tiny_sequential")


class Subclassed(keras.Model):
    """A subclassed model: its layer graph exists only in `call`."""

    def __init__(self):
        super().__init__()
        self.conv = layers.Conv2D(4, 3)
        self.pool = layers.GlobalAveragePooling2D()
        self.fc = layers.Dense(10)

    def call(self, x):
        return self.fc(self.pool(self.conv(x)))
