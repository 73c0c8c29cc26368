"""QAT under `tf.distribute.MirroredStrategy` on 2 logical CPU devices; run by test_distributed.py.

Usage: `python distributed_script.py OUT_DIR`. The logical devices must be configured before TensorFlow
initializes its devices, hence a fresh interpreter. The script builds, quantizes, compiles and fits a small CNN
inside `strategy.scope()`, fits the same model on one device, saves the mirrored one as `.keras` and reloads it,
then writes what the test checks: `OUT_DIR/variables.json` (replica count, each variable's type) and
`OUT_DIR/arrays.npz` (each variable on each replica, after single-device training and before training, and
the predictions before and after the reload). Any failure raises, so the process exits non-zero with a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import tensorflow as tf

REPLICAS = 2
# Configured before anything touches a device: afterwards TensorFlow refuses the change.
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * REPLICAS
)

import keras  # noqa: E402 - after the device configuration, see above

from trainable_infra import QATConfig, TrainingMethod  # noqa: E402
from trainable_infra.keras_backend import keras_load_quantized_model, quantize_model  # noqa: E402

GLOBAL_BATCH = 16  # 8 samples per replica
EPOCHS = 2


def data() -> tuple[np.ndarray, np.ndarray]:
    """32 fixed (8, 8, 1) samples and 10-class labels: 2 steps per epoch."""
    rng = np.random.default_rng(0)
    return rng.normal(size=(32, 8, 8, 1)).astype("float32"), rng.integers(0, 10, 32).astype("int32")


def qat_model() -> keras.Model:
    """conv + synchronized BN (not folded) + ReLU + dense, W4A8; LSQ conv weights and dense activations, STE
    elsewhere."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv")(inputs)
    # Synchronized: the batch statistics of the global batch, as on one device (per replica otherwise).
    x = keras.layers.BatchNormalization(synchronized=True)(x)
    x = keras.layers.ReLU()(x)
    outputs = keras.layers.Dense(10, name="dense")(keras.layers.Flatten()(x))
    config = QATConfig(
        weight_training_method=TrainingMethod.LSQ,
        activation_training_method=TrainingMethod.STE,
        weight_n_bits=4,
        # The BatchNormalization stays: its synchronized batch statistics are part of what is checked.
        fold_batch_norm=False,
        overrides={
            "dense": {"weight_training_method": TrainingMethod.STE, "activation_training_method": TrainingMethod.LSQ}
        },
    )
    model = quantize_model(keras.Model(inputs, outputs), config, representative_data=[data()[0]], progress=False)
    model.compile(
        optimizer=keras.optimizers.SGD(0.5, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def fit(model: keras.Model) -> None:
    x, y = data()
    model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=EPOCHS, shuffle=False, verbose=0)


def main(out_dir: Path) -> None:
    devices = [device.name for device in tf.config.list_logical_devices("CPU")]
    if len(devices) != REPLICAS:
        raise RuntimeError(f"expected {REPLICAS} logical CPU devices, TensorFlow has {devices}")
    strategy = tf.distribute.MirroredStrategy(devices)
    with strategy.scope():
        mirrored = qat_model()
        initial = [keras.ops.convert_to_numpy(v) for v in mirrored.weights]
        fit(mirrored)
    single = qat_model()
    fit(single)

    arrays, kinds = {}, {}
    for index, variable in enumerate(mirrored.weights):
        value = variable.value  # the backend variable, a tf.distribute value when created in the scope
        kinds[variable.path] = {
            "type": type(value).__name__,
            "distributed": isinstance(value, tf.distribute.DistributedValues),
        }
        replicas = value.values if isinstance(value, tf.distribute.DistributedValues) else (value,)
        for replica, per_replica in enumerate(replicas):
            arrays[f"replica{replica}:{variable.path}"] = per_replica.numpy()
        arrays[f"single:{variable.path}"] = keras.ops.convert_to_numpy(single.weights[index])
        arrays[f"initial:{variable.path}"] = initial[index]

    path = out_dir / "mirrored.keras"
    mirrored.save(path)
    x = data()[0]
    arrays["predictions:trained"] = mirrored.predict(x, verbose=0)
    arrays["predictions:reloaded"] = keras_load_quantized_model(path).predict(x, verbose=0)
    np.savez(out_dir / "arrays.npz", **arrays)
    summary = {"replicas": strategy.num_replicas_in_sync, "variables": kinds}
    (out_dir / "variables.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
