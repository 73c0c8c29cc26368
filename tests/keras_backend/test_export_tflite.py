"""export_tflite: the converted demo model as a .tflite file, checked in the TFLite interpreter, written atomically.

Tolerance (measured on the demo's model, W8A8, calibrated, 0 epochs, TensorFlow 2.21): the converter
re-quantizes the average-pooled features to the grid of the quantizer before the pooling, and TFLite rounds ties
away from zero, so the logits differ from Keras' by at most two steps of the logits quantizer, on about 30% of
them; the predicted classes agree on 98.7% of the test images. Below 8 bits the TFLite interpreter cannot run
the converted file.
"""

from __future__ import annotations

import importlib.util
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainable_infra import ExportValidationError, QATConfig, QuantizationConfigError
from trainable_infra.common.digits import load_digits_split
from trainable_infra.keras_backend import convert_to_inferable, export_tflite, quantize_model
from trainable_infra.keras_backend.demo import float_cnn

_x_train, _, _x_test, _ = load_digits_split(seed=0)
X_TRAIN, X_TEST = _x_train[..., None], _x_test[..., None]


def converted_demo_model(weight_n_bits: int, activation_n_bits: int) -> keras.Model:
    """The demo's network, calibrated on 256 digits and converted (no training: the export does not need it)."""
    keras.utils.set_random_seed(0)
    config = QATConfig(weight_n_bits=weight_n_bits, activation_n_bits=activation_n_bits)
    return convert_to_inferable(quantize_model(float_cnn(), config, X_TRAIN[:256], progress=False))


@pytest.fixture(scope="module")
def w8a8():
    return converted_demo_model(8, 8)


def logits_step(model: keras.Model) -> float:
    config = model.get_layer("fc_activation_quantizer").activation_quantizer.get_config()
    return config["threshold"][0] / 2 ** (config["num_bits"] - int(config["signed"]))


@pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated:UserWarning")
def test_w8a8_demo_model_runs_in_tflite_within_two_output_steps(w8a8, tmp_path):
    report = export_tflite(w8a8, tmp_path / "demo.tflite", X_TEST)
    assert (report.path, report.format) == (str(tmp_path / "demo.tflite"), "tflite")
    assert os.listdir(tmp_path) == ["demo.tflite"]
    runner = tf.lite.Interpreter(model_path=report.path).get_signature_runner()  # a run of its own
    (tflite_out,) = runner(**{next(iter(runner.get_input_details())): X_TEST.astype(np.float32)}).values()
    keras_out = keras.ops.convert_to_numpy(w8a8(X_TEST, training=False))
    difference = np.abs(tflite_out.astype(np.float64) - keras_out)
    assert report.max_abs_diff == difference.max()
    assert 0 < report.max_abs_diff <= 2 * logits_step(w8a8) * (1 + 1e-4)
    assert np.mean(difference > 1e-6) < 0.4
    assert np.mean(tflite_out.argmax(1) == keras_out.argmax(1)) >= 0.98


@pytest.mark.skipif(importlib.util.find_spec("ai_edge_litert") is not None, reason="pins tf.lite.Interpreter's error")
def test_below_8_bits_the_interpreter_refuses_the_file_and_the_old_file_stays(tmp_path):
    path = tmp_path / "demo.tflite"
    path.write_bytes(b"previous model")
    message = (
        r"the TFLite interpreter could not run the exported file: tensorflow/lite/kernels/dequantize\.cc:\d+ "
        r"op_context\.input->type == kTfLiteInt2 \|\| op_context\.input->type == kTfLiteInt4 .* was not true\."
        r"Node number \d+ \(DEQUANTIZE\) failed to prepare\. \(the model has 4-bit quantizers: TFLite's converter "
        r"stores them as UINT4 / UINT2 tensors"
    )
    with pytest.raises(ExportValidationError, match=message):
        export_tflite(converted_demo_model(4, 8), path, X_TEST[:4])
    assert path.read_bytes() == b"previous model"
    assert os.listdir(tmp_path) == ["demo.tflite"]


def test_a_failed_comparison_writes_nothing(w8a8, tmp_path):
    with pytest.raises(ExportValidationError, match=r"differ from the model's by up to .*, more than atol=0"):
        export_tflite(w8a8, tmp_path / "demo.tflite", X_TEST[:64], atol=0)
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
