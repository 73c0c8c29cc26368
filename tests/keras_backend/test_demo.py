"""The demo on Keras: the result lines, the saved files, and the accuracy promised for W4A8 and W2A8."""

from __future__ import annotations

import re

import keras
import pytest

from trainable_infra.__main__ import main
from trainable_infra.keras_backend import KerasInferableQuantizationWrapper, KerasTrainableQuantizationWrapper


def run_demo(capsys, tmp_path, *options: str) -> tuple[dict[str, float], str]:
    status = main(["demo", "--backend", "keras", "--no-progress", "--output", str(tmp_path), *options])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "reloaded (safe mode) predictions identical: True" in out
    assert "converted to mct-quantizers quantizers; predictions identical: True" in out
    assert re.search(r"^exported .*inferable_model\.keras; reloaded \(safe mode\) predictions identical: True$", out,
                     re.M), out
    deployed = re.search(r"^exported .*model\.tflite \([\d.]+ KB, int8 tflite\); .*: [\d.]+ ms for 450 images, "
                         r"identical logits ([\d.]+)%, identical predictions ([\d.]+)%$", out, re.M)
    assert deployed, out
    assert (tmp_path / "model.tflite").is_file()
    accuracy = {kind: float(value) for kind, value in re.findall(r"^(float|PTQ|QAT) accuracy: ([\d.]+)%$", out, re.M)}
    accuracy["TFLite identical logits"], accuracy["TFLite identical predictions"] = map(float, deployed.groups())
    return accuracy, out


def test_quick_run_prints_the_results_and_saves_loadable_models(capsys, tmp_path):
    accuracy, out = run_demo(capsys, tmp_path, "--epochs", "1", "--float-epochs", "1", "--method", "LSQ")
    assert list(accuracy) == ["float", "PTQ", "QAT", "TFLite identical logits", "TFLite identical predictions"]
    assert all(0.0 <= value <= 100.0 for value in accuracy.values())
    assert "conv1_activation_quantizer" in out
    assert "SQNR dB" in out
    qat = keras.models.load_model(tmp_path / "qat_model.keras")
    assert sum(isinstance(layer, KerasTrainableQuantizationWrapper) for layer in qat.layers) == 4
    inferable = keras.models.load_model(tmp_path / "inferable_model.keras")
    assert sum(isinstance(layer, KerasInferableQuantizationWrapper) for layer in inferable.layers) == 4


@pytest.mark.parametrize(
    ("options", "max_drop"),
    [(("--method", "STE"), 1.0), (("--method", "LSQ"), 1.0), (("--method", "LSQ", "--weight-bits", "2"), 3.0)],
    ids=["W4A8-STE", "W4A8-LSQ", "W2A8-LSQ"],
)
def test_qat_accuracy_is_close_to_float(capsys, tmp_path, options, max_drop):
    accuracy, _ = run_demo(capsys, tmp_path, *options)
    assert {"float", "PTQ", "QAT"} <= set(accuracy)
    assert accuracy["float"] > 95.0
    assert accuracy["QAT"] >= accuracy["float"] - max_drop, accuracy
    # The full-integer TFLite file computes what was trained (measured: 100.00% of the logits, TensorFlow 2.21).
    assert accuracy["TFLite identical logits"] >= 99.9, accuracy
    assert accuracy["TFLite identical predictions"] == 100.0, accuracy
