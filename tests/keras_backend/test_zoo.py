"""The zoo's blocks of real architectures (`zoo.ZOO`) through the whole QAT flow: quantize_model with representative
data, two training steps, deterministic eval, a conversion bit-identical to the trained model's eval, `.keras`
reloads (safe mode, no custom_objects) identical to the saved models, and a full-integer TFLite export.

Oracles: the trained model's own eval output (for determinism, conversion and reloads) and the TFLite interpreter
(the export checks the file against the converted model; here it must run and agree on the argmax of most rows).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from tests.keras_backend.zoo import ZOO
from trainable_infra import QATConfig
from trainable_infra.keras_backend import (
    KerasActivationQuantizationHolder,
    KerasTrainableQuantizationWrapper,
    convert_to_inferable,
    export_tflite,
    quantization_coverage,
    quantize_model,
)

NAMES = list(ZOO)
WITH_DROPOUT = [name for name in NAMES if any(isinstance(layer, keras.layers.Dropout) for layer in ZOO[name]().layers)]


def _data(model: keras.Model, n: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, *model.inputs[0].shape[1:])).astype(np.float32), rng.integers(0, 10, n)


@pytest.fixture(scope="module", params=NAMES)
def trained(request):
    """(name, QAT model after two training steps, inputs): quantized W8A8 with representative data."""
    float_model = ZOO[request.param]()
    x, y = _data(float_model)
    qat = quantize_model(float_model, QATConfig(), x, progress=False)
    # Eager steps: tracing the training step would cost 2-3 s per model here; graph-mode fit of these blocks in
    # keras.applications models is what benchmarks/model_zoo_keras.py runs.
    qat.compile(optimizer=keras.optimizers.Adam(1e-3),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), run_eagerly=True)
    before = [w.numpy() for w in qat.trainable_weights]
    history = qat.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert any(not np.array_equal(b, w.numpy()) for b, w in zip(before, qat.trainable_weights, strict=True))
    return request.param, qat, x


@pytest.fixture(scope="module")
def converted(trained):
    _, qat, _ = trained
    return convert_to_inferable(qat)


def test_every_block_gets_weight_and_activation_quantizers(trained):
    _, qat, _ = trained
    assert any(isinstance(layer, KerasTrainableQuantizationWrapper) for layer in qat.layers)
    assert any(isinstance(layer, KerasActivationQuantizationHolder) for layer in qat.layers)


def test_eval_is_deterministic(trained):
    _, qat, x = trained
    np.testing.assert_array_equal(qat(x, training=False), qat(x, training=False))


@pytest.mark.parametrize("trained", WITH_DROPOUT, indirect=True)
def test_training_mode_drops_out_at_random(trained):
    _, qat, x = trained
    state = qat.get_weights()  # a training-mode call updates the moving statistics of unfolded BatchNormalizations
    try:
        first, second = qat(x, training=True), qat(x, training=True)
    finally:
        qat.set_weights(state)
    assert not np.array_equal(first, second)


def test_conversion_is_bit_identical_to_qat_eval(trained, converted):
    _, qat, x = trained
    np.testing.assert_array_equal(converted(x, training=False), qat(x, training=False))


@pytest.mark.parametrize("which", ["qat", "converted"])
def test_keras_file_reloads_identical_in_safe_mode(trained, converted, tmp_path, which):
    _, qat, x = trained
    model = qat if which == "qat" else converted
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(loaded(x, training=False), qat(x, training=False))


def test_tflite_export_runs(converted, trained, tmp_path):
    _, _, x = trained
    report = export_tflite(converted, tmp_path / "m.tflite", x)
    assert (tmp_path / "m.tflite").stat().st_size > 0
    assert np.isfinite(report.max_abs_diff)
    assert report.argmax_identical >= 0.75


def test_every_multiply_accumulate_runs_on_quantized_operands(trained):
    name, qat, x = trained
    coverage = quantization_coverage(qat, x[:4])
    assert coverage.rows, name
    assert coverage.quantized_share == 1.0, coverage.format()
    layers_with_kernels = {layer.name for layer in qat.layers if hasattr(layer, "kernel")}
    assert not layers_with_kernels & set(coverage.float_layers)
