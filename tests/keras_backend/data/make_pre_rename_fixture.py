"""How `pre_rename_qat.keras`, `pre_rename_inferable.keras` and `pre_rename_expected.npz` were made.

They were written by the library as it was before the holders' quantizer attribute was renamed from
`activation_quantizer` to `activation_holder_quantizer` (commit d61d794), so that `test_save_load` can check that
files saved before the rename still load and compute the same outputs. Not run by the tests: running it again
with the current code would no longer make a file from before the rename.

Run from the repository root: `python tests/keras_backend/data/make_pre_rename_fixture.py`.
"""

from pathlib import Path

import keras
import numpy as np

from trainable_infra import QATConfig, QuantizationMethod, TrainingMethod
from trainable_infra.keras_backend import convert_to_inferable, quantize_model

HERE = Path(__file__).parent


def main() -> None:
    """Quantize and calibrate a tiny CNN, convert it, save both, and record their outputs on a fixed input."""
    keras.utils.set_random_seed(7)
    inputs = keras.Input((8, 8, 1), name="x")
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    model = keras.Model(inputs, keras.layers.Dense(3, name="dense")(x))

    rng = np.random.default_rng(7)
    representative = rng.normal(size=(64, 8, 8, 1)).astype(np.float32)
    fixed_input = rng.normal(size=(16, 8, 8, 1)).astype(np.float32)
    # LSQ so that the holders' thresholds are variables; uniform activations so that they have range variables
    # too. Calibration replaces the placeholder threshold, so the loaded values must really come from the file.
    config = QATConfig(
        weight_training_method=TrainingMethod.LSQ,
        activation_training_method=TrainingMethod.LSQ,
        activation_quantization_method=QuantizationMethod.UNIFORM,
        weight_n_bits=4,
    )
    qat = quantize_model(model, config, representative, progress=False)
    inferable = convert_to_inferable(qat)

    qat.save(HERE / "pre_rename_qat.keras")
    inferable.save(HERE / "pre_rename_inferable.keras")
    np.savez(
        HERE / "pre_rename_expected.npz",
        x=fixed_input,
        qat=keras.ops.convert_to_numpy(qat(fixed_input, training=False)),
        inferable=keras.ops.convert_to_numpy(inferable(fixed_input, training=False)),
    )


if __name__ == "__main__":
    main()
