"""export_tflite: a full-integer .tflite file (int8 kernels at 2-8 bits), checked in the TFLite interpreter, written
atomically.

Oracles: the interpreter's operator list (`tflite_kernels`, read without delegates) for the int8 kernels, and the
converted Keras model for the outputs (calibrated models, no training: the export does not need it). Measured with
TensorFlow 2.21: the demo's and the ResNet-style model's logits are reproduced on 99.9-100% of the digits test set
at W8A8, W4A8, W4A4 and W2A2 (benchmarks/fidelity.py --backend keras has the trained models' table).
"""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest
from keras import layers

from tests.keras_backend.zoo import tiny_mobilenet, tiny_resnet
from trainable_infra import ExportValidationError, QATConfig, QuantizationConfigError, QuantizationMethod
from trainable_infra.common.digits import load_digits_split
from trainable_infra.keras_backend import convert_to_inferable, export_tflite, quantize_model
from trainable_infra.keras_backend.demo import float_cnn
from trainable_infra.keras_backend.export import int8_grid, tflite_kernels
from trainable_infra.keras_backend.inferable_wrappers import KerasInferableQuantizationWrapper

_x_train, _, _x_test, _ = load_digits_split(seed=0)
X_TRAIN, X_TEST = _x_train[..., None], _x_test[..., None]
# Float operations of the file: the input's quantizer written out in float (TensorFlow's fake-quant expression,
# so that ties round as in the Keras model) before the QUANTIZE op that stores it as int8.
INPUT_PRELUDE = {"MAXIMUM", "MINIMUM", "SUB", "MUL", "ADD", "FLOOR", "QUANTIZE"}
KERNELS = {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "ADD", "CONCATENATION", "MEAN", "AVERAGE_POOL_2D"}


def converted(model: keras.Model, weight_n_bits: int, activation_n_bits: int, **config) -> keras.Model:
    """`model` quantized, calibrated on 256 digits and converted."""
    keras.utils.set_random_seed(0)
    config = QATConfig(weight_n_bits=weight_n_bits, activation_n_bits=activation_n_bits, **config)
    return convert_to_inferable(quantize_model(model, config, X_TRAIN[:256], progress=False))


def integer_cnn(seed: int = 0) -> keras.Model:
    """Every kernel the export writes: convolution, depthwise convolution, residual addition, concatenation,
    global average pooling, a dense head. (Not a fidelity oracle: its addition puts many sums on rounding ties,
    which TFLite's fixed-point ADD and TensorFlow's float addition and fake-quant round differently.)"""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 1), name="x")
    x = layers.Conv2D(8, 3, padding="same", activation="relu", name="stem")(inputs)
    y = layers.DepthwiseConv2D(3, padding="same", activation="relu", name="depthwise")(x)
    x = layers.Add(name="add")([x, y])
    z = layers.Conv2D(4, 1, activation="relu", name="branch")(x)
    x = layers.Concatenate(name="cat")([x, z])
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, layers.Dense(10, name="head")(x), name="integer_cnn")


@pytest.fixture(scope="module")
def w8a8():
    return converted(float_cnn(), 8, 8)


@pytest.mark.parametrize(("weight_n_bits", "activation_n_bits"), [(8, 8), (4, 4), (2, 2)])
def test_every_quantized_layer_runs_on_int8_kernels(tmp_path, weight_n_bits, activation_n_bits):
    model = converted(integer_cnn(), weight_n_bits, activation_n_bits)
    report = export_tflite(model, tmp_path / "m.tflite", X_TEST[:32])
    kernels = tflite_kernels(report)
    end = kernels.index(("QUANTIZE", "float32")) + 1
    prelude, body = kernels[:end], kernels[end:]
    assert {op for op, _ in prelude} <= INPUT_PRELUDE, kernels
    assert all(dtype == "int8" for _, dtype in body), kernels  # int8 from the QUANTIZE to the DEQUANTIZE
    found = [op for op, _ in body if op in KERNELS]
    # stem, branch and the head (a 1x1 convolution) as CONV_2D; one of each merge and pooling.
    assert sorted(found) == ["ADD", "CONCATENATION", "CONV_2D", "CONV_2D", "CONV_2D", "DEPTHWISE_CONV_2D", "MEAN"]
    if activation_n_bits < 8:  # the n-bit clip of the int8 container, on int8
        assert ("MINIMUM", "int8") in kernels


@pytest.mark.parametrize(
    ("architecture", "weight_n_bits", "activation_n_bits"),
    [(float_cnn, 8, 8), (float_cnn, 4, 8), (float_cnn, 4, 4), (tiny_resnet, 4, 4)],
    ids=["demo-W8A8", "demo-W4A8", "demo-W4A4", "resnet-W4A4"],
)
def test_the_interpreter_reproduces_the_converted_model(tmp_path, architecture, weight_n_bits, activation_n_bits):
    model = converted(architecture(), weight_n_bits, activation_n_bits)
    report = export_tflite(model, tmp_path / "m.tflite", X_TEST, require_identical=0.999)
    assert (report.path, report.format) == (str(tmp_path / "m.tflite"), "tflite")
    assert os.listdir(tmp_path) == ["m.tflite"]
    assert report.argmax_identical == 1.0


def test_weights_are_stored_as_int8_on_their_own_grid(w8a8, tmp_path):
    import tensorflow as tf

    report = export_tflite(converted(float_cnn(), 4, 8), tmp_path / "w4.tflite", X_TEST[:8])
    interpreter = tf.lite.Interpreter(
        model_path=report.path,
        experimental_op_resolver_type=tf.lite.experimental.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    interpreter.allocate_tensors()
    weights = [d for d in interpreter.get_tensor_details() if d["dtype"] == np.int8 and len(d["shape"]) == 4
               and len(d["quantization_parameters"]["scales"]) > 1]
    assert len(weights) == 4  # three convolutions and the dense head
    for detail in weights:
        values = interpreter.get_tensor(detail["index"])
        assert values.min() >= -8  # 4-bit integers in an int8 container
        assert values.max() <= 7
        assert not detail["quantization_parameters"]["zero_points"].any()


def test_int8_grid_keeps_the_step_and_puts_weights_at_zero_point_0(w8a8):
    wrapper = next(layer for layer in w8a8.layers if isinstance(layer, KerasInferableQuantizationWrapper))
    quantizer = wrapper.weights_quantizers["kernel"]
    grid = int8_grid(quantizer, weights=True, owner="conv1")
    np.testing.assert_array_equal(grid.low8, -128 * grid.step)
    np.testing.assert_array_equal(grid.high8, 127 * grid.step)
    np.testing.assert_array_equal(grid.low, -128 * grid.step)


@pytest.fixture(scope="module")
def float_separable():
    """The MobileNet-style model: its separable convolution stays a float kernel in TFLite (its pointwise input is
    on no grid) and its ReLU6 layers keep the float path in Keras, so the file reproduces fewer than all logits."""
    return converted(tiny_mobilenet(), 8, 8)


def test_require_identical_fails_cleanly_and_keeps_the_old_file(float_separable, tmp_path):
    path = tmp_path / "m.tflite"
    path.write_bytes(b"previous model")
    with pytest.raises(ExportValidationError, match=r"reproduces .*% of the model's output values bit for bit, "
                                                    r"fewer than require_identical=1\.0"):
        export_tflite(float_separable, path, X_TEST, require_identical=1.0)
    assert path.read_bytes() == b"previous model"
    assert os.listdir(tmp_path) == ["m.tflite"]


def test_a_failed_comparison_writes_nothing(float_separable, tmp_path):
    with pytest.raises(ExportValidationError, match=r"differ from the model's by up to .*, more than atol=0"):
        export_tflite(float_separable, tmp_path / "m.tflite", X_TEST, atol=0)
    assert os.listdir(tmp_path) == []


def test_8_bit_uniform_weights_are_refused_before_writing(tmp_path):
    model = converted(float_cnn(), 8, 8, weight_quantization_method=QuantizationMethod.UNIFORM)
    with pytest.raises(QuantizationConfigError, match=r"layer 'conv1', 'kernel': 8-bit weights with zero points "
                                                      r".*TFLite's int8 weights have the zero point 0"):
        export_tflite(model, tmp_path / "m.tflite", X_TEST[:2])
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("model", "inputs", "message"),
    [
        (lambda m: float_cnn(), X_TEST[:2], "pass the model returned by convert_to_inferable"),
        (lambda m: m, [X_TEST[:2], X_TEST[:2]], r"one array per model input \(1\), got 2"),
        (lambda m: m, X_TEST[0], r"shaped like the model input \(None, 8, 8, 1\) \(batch first\), got float32"),
        (lambda m: m, X_TEST[:2], r"atol must be None or a number >= 0, got -1"),
    ],
    ids=["float model", "two inputs", "no batch axis", "negative atol"],
)
def test_bad_arguments_are_refused_before_writing(w8a8, tmp_path, model, inputs, message):
    atol = -1 if "atol" in message else None
    with pytest.raises(QuantizationConfigError, match=message):
        export_tflite(model(w8a8), tmp_path / "m.tflite", inputs, atol=atol)
    assert os.listdir(tmp_path) == []
