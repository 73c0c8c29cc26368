"""Float Functional models written here (no keras.applications) for the model-level tests: residual adds,
depthwise and separable convolutions, concatenation, transposed convolutions, and small versions of the blocks of
real architectures (`ZOO`): MobileNetV3's inverted residual with squeeze-excitation and hard-swish, ShuffleNet's
channel shuffle, DenseNet's dense concatenation, Inception's branches and a ConvNeXt block."""

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


# --- blocks of real architectures (the zoo test runs each through the whole QAT flow) ----------------------------


@keras.saving.register_keras_serializable(package="trainable_infra_tests")
class LayerScale(layers.Layer):
    """ConvNeXt's layer scale: the input times a learned per-channel factor (a float layer with weights that
    quantize_model leaves as it is)."""

    def __init__(self, init_value: float = 1e-6, **kwargs):
        super().__init__(**kwargs)
        self.init_value = init_value

    def build(self, input_shape):
        self.gamma = self.add_weight(shape=(input_shape[-1],), initializer=keras.initializers.Constant(self.init_value),
                                     name="gamma")

    def call(self, x):
        return x * self.gamma

    def get_config(self):
        return {**super().get_config(), "init_value": self.init_value}


def _hard_sigmoid(x):
    # keras.applications' MobileNetV3 form: the `+ 3.0` and `* (1 / 6)` are keras.ops operations, not layers.
    return layers.ReLU(6.0)(x + 3.0) * (1.0 / 6.0)


def tiny_mobilenet_v3(classes: int = 10, seed: int = 0) -> keras.Model:
    """MobileNetV3-style: a hard-swish stem written as `x * hard_sigmoid(x)`, an inverted residual with a
    `hard_swish` activation layer, a depthwise convolution, squeeze-excitation (pooling, two 1x1 convolutions, the
    hard sigmoid, a `Multiply` layer), a projection and a residual `Add` layer; a dropout before the dense head."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3), name="x")
    x = layers.Conv2D(8, 3, padding="same", use_bias=False, name="stem")(inputs)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = x * _hard_sigmoid(x)
    y = layers.Conv2D(16, 1, use_bias=False, name="expand")(x)
    y = layers.BatchNormalization(name="expand_bn")(y)
    y = layers.Activation("hard_swish", name="expand_hard_swish")(y)
    y = layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="depthwise")(y)
    y = layers.BatchNormalization(name="depthwise_bn")(y)
    y = layers.ReLU(name="depthwise_relu")(y)
    se = layers.GlobalAveragePooling2D(keepdims=True, name="se_pool")(y)
    se = layers.Conv2D(4, 1, activation="relu", name="se_reduce")(se)
    se = _hard_sigmoid(layers.Conv2D(16, 1, name="se_expand")(se))
    y = layers.Multiply(name="se_mul")([y, se])
    y = layers.Conv2D(8, 1, use_bias=False, name="project")(y)
    y = layers.BatchNormalization(name="project_bn")(y)
    x = layers.Add(name="residual")([x, y])
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dropout(0.2, name="dropout")(x)
    return keras.Model(inputs, layers.Dense(classes, name="head")(x), name="tiny_mobilenet_v3")


def _channel_shuffle(x, groups: int, name: str):
    height, width, channels = x.shape[1:]
    x = layers.Reshape((height, width, groups, channels // groups), name=f"{name}_group")(x)
    x = layers.Permute((1, 2, 4, 3), name=f"{name}_transpose")(x)
    return layers.Reshape((height, width, channels), name=f"{name}_flatten")(x)


def tiny_shufflenet(classes: int = 10, seed: int = 0) -> keras.Model:
    """ShuffleNetV2-style: a unit that splits the channels by slicing (`x[..., :4]`, keras.ops), runs one half
    through a 1x1 / depthwise 3x3 / 1x1 branch, concatenates the halves and shuffles the channels (Reshape, Permute,
    Reshape)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3), name="x")
    x = layers.Conv2D(8, 3, padding="same", use_bias=False, name="stem")(inputs)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    kept, branch = x[..., :4], x[..., 4:]
    branch = layers.Conv2D(4, 1, use_bias=False, name="unit_pw1")(branch)
    branch = layers.BatchNormalization(name="unit_pw1_bn")(branch)
    branch = layers.ReLU(name="unit_pw1_relu")(branch)
    branch = layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="unit_dw")(branch)
    branch = layers.BatchNormalization(name="unit_dw_bn")(branch)
    branch = layers.Conv2D(4, 1, use_bias=False, name="unit_pw2")(branch)
    branch = layers.BatchNormalization(name="unit_pw2_bn")(branch)
    branch = layers.ReLU(name="unit_pw2_relu")(branch)
    x = layers.Concatenate(name="unit_cat")([kept, branch])
    x = _channel_shuffle(x, 2, "unit_shuffle")
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, layers.Dense(classes, name="fc")(x), name="tiny_shufflenet")


def tiny_densenet(classes: int = 10, seed: int = 0) -> keras.Model:
    """DenseNet-style: a dense block of two pre-activation layers (BatchNormalization, ReLU, convolution; the
    BatchNormalization reads a concatenation, so it is not folded), each concatenated to its input, a transition
    (1x1 convolution, average pooling) and a dense head."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 1), name="x")
    x = layers.Conv2D(8, 3, padding="same", use_bias=False, name="stem")(inputs)
    for index in (1, 2):
        y = layers.BatchNormalization(name=f"dense{index}_bn")(x)
        y = layers.ReLU(name=f"dense{index}_relu")(y)
        y = layers.Conv2D(4, 3, padding="same", use_bias=False, name=f"dense{index}_conv")(y)
        x = layers.Concatenate(name=f"dense{index}_cat")([x, y])
    x = layers.BatchNormalization(name="transition_bn")(x)
    x = layers.ReLU(name="transition_relu")(x)
    x = layers.Conv2D(8, 1, use_bias=False, name="transition_conv")(x)
    x = layers.AveragePooling2D(2, name="transition_pool")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, layers.Dense(classes, name="fc")(x), name="tiny_densenet")


def tiny_inception(classes: int = 10, seed: int = 0) -> keras.Model:
    """Inception-style: four branches (1x1; 1x1 then 3x3; average pooling then 1x1; max pooling) concatenated."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3), name="x")
    x = layers.Conv2D(8, 3, padding="same", activation="relu", name="stem")(inputs)
    a = layers.Conv2D(4, 1, activation="relu", name="branch1x1")(x)
    b = layers.Conv2D(4, 1, activation="relu", name="branch3x3_reduce")(x)
    b = layers.Conv2D(4, 3, padding="same", activation="relu", name="branch3x3")(b)
    c = layers.AveragePooling2D(3, strides=1, padding="same", name="branch_pool")(x)
    c = layers.Conv2D(4, 1, activation="relu", name="branch_pool_proj")(c)
    d = layers.MaxPooling2D(3, strides=1, padding="same", name="branch_max")(x)
    x = layers.Concatenate(name="mixed")([a, b, c, d])
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, layers.Dense(classes, name="fc")(x), name="tiny_inception")


def tiny_convnext(classes: int = 10, seed: int = 0) -> keras.Model:
    """ConvNeXt-style: a patchify stem with LayerNormalization, then a block (depthwise 7x7 convolution,
    LayerNormalization, Dense 4x expansion with GELU, Dense projection, layer scale) added to its input as
    keras.applications writes it, `inputs + x`; a pooled, normalized dense head with dropout."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((16, 16, 3), name="x")
    x = layers.Conv2D(8, 2, strides=2, name="stem")(inputs)
    x = layers.LayerNormalization(epsilon=1e-6, name="stem_ln")(x)
    y = layers.DepthwiseConv2D(7, padding="same", name="block_dw")(x)
    y = layers.LayerNormalization(epsilon=1e-6, name="block_ln")(y)
    y = layers.Dense(32, activation="gelu", name="block_pw1")(y)
    y = layers.Dense(8, name="block_pw2")(y)
    # A larger start than ConvNeXt's 1e-6, so that the block's branch shows in the sum of a 2-step training run.
    y = LayerScale(0.1, name="block_layer_scale")(y)
    x = x + y
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.LayerNormalization(epsilon=1e-6, name="head_ln")(x)
    x = layers.Dropout(0.2, name="dropout")(x)
    return keras.Model(inputs, layers.Dense(classes, name="head")(x), name="tiny_convnext")


# name -> builder of the zoo's float models (each takes `classes` and `seed`)
ZOO = {
    "residual": tiny_resnet,
    "inverted_residual_se": tiny_mobilenet_v3,
    "channel_shuffle": tiny_shufflenet,
    "dense_concat": tiny_densenet,
    "inception": tiny_inception,
    "convnext": tiny_convnext,
}
