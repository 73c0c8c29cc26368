"""QAT under `tf.distribute.MirroredStrategy` over 2 logical CPU devices.

The run happens in a fresh interpreter (tests/keras_backend/distributed_script.py): logical devices must be
configured before TensorFlow initializes its devices, which in this test session has already happened.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="needs tensorflow")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("distributed_script.py")
# Fake quantization is discontinuous: a last-bit difference in a weight next to a rounding boundary moves its
# quantized value a whole step, and later steps carry that on. Measured here: at most 4.8e-7 between the
# mirrored and the single-device fit (up to 3e-5 with other learning rates and bit widths), while LSQ moves
# every threshold it trains by more than 6e-3, and averaging the replicas' gradients wrongly would too.
ATOL = 1e-4


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[dict, dict[str, np.ndarray]]:
    """(variables.json, arrays.npz) written by the script."""
    out_dir = tmp_path_factory.mktemp("mirrored")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(out_dir)], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env
    )
    if result.returncode != 0:
        pytest.fail(f"{SCRIPT.name} exited with {result.returncode}:\n{result.stderr[-6000:]}")
    with np.load(out_dir / "arrays.npz") as arrays:
        return json.loads((out_dir / "variables.json").read_text()), dict(arrays)


def arrays_of(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {key.split(":", 1)[1]: value for key, value in arrays.items() if key.startswith(f"{prefix}:")}


def test_quantizer_variables_are_mirrored_and_equal_across_replicas_after_fit(run):
    summary, arrays = run
    assert summary["replicas"] == 2
    variables = summary["variables"]
    quantizer_variables = [path for path in variables if path.endswith("_threshold")]
    assert len(quantizer_variables) == 5  # the input's, conv's and dense's activations, conv's and dense's kernels
    assert {path: kind["type"] for path, kind in variables.items() if not kind["distributed"]} == {}
    assert {kind["type"] for kind in variables.values()} == {"MirroredVariable"}
    first, second = arrays_of(arrays, "replica0"), arrays_of(arrays, "replica1")
    assert first.keys() == second.keys() == variables.keys()
    for path in variables:
        np.testing.assert_array_equal(first[path], second[path], err_msg=path)


def test_mirrored_fit_matches_single_device_fit(run):
    _, arrays = run
    mirrored, single, initial = (arrays_of(arrays, prefix) for prefix in ("replica0", "single", "initial"))
    for path, expected in single.items():
        np.testing.assert_allclose(mirrored[path], expected, rtol=0, atol=ATOL, err_msg=path)
    moved = {path for path in single if path.endswith("_threshold") and
             np.abs(single[path] - initial[path]).min() > 10 * ATOL}
    # LSQ trains conv's kernel threshold and dense's activation threshold; STE keeps the others.
    assert moved == {"conv/kernel_threshold", "dense_activation_quantizer/activation_threshold"}


def test_mirrored_model_saved_as_keras_reloads_with_identical_predictions(run):
    _, arrays = run
    np.testing.assert_array_equal(arrays["predictions:reloaded"], arrays["predictions:trained"])
