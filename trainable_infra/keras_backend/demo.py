"""The demo on Keras 3: float training, PTQ, QAT, `.keras` save and reload, conversion, per-layer report."""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from trainable_infra.common.digits import accuracy_line, load_digits_split
from trainable_infra.common.dqa import temperature_schedule_for
from trainable_infra.common.enums import TrainingMethod
from trainable_infra.common.qat_config import QATConfig
from trainable_infra.keras_backend.convert import convert_to_inferable
from trainable_infra.keras_backend.export import export_tflite, tflite_interpreter
from trainable_infra.keras_backend.quantize import quantize_model
from trainable_infra.keras_backend.report import quantization_report
from trainable_infra.keras_backend.training import set_dqa_temperature_schedule

BATCH = 32


def float_cnn() -> keras.Sequential:
    """The demo's float model: three convolutions with BatchNormalization and ReLU, global pooling, a dense head."""
    layers = [keras.Input((8, 8, 1), name="image")]
    for index, (filters, stride) in enumerate(((16, 1), (32, 2), (64, 2)), start=1):
        layers += [
            keras.layers.Conv2D(filters, 3, strides=stride, padding="same", name=f"conv{index}"),
            # PyTorch's BatchNorm defaults (momentum 0.1, eps 1e-5), so both demos train the same network.
            keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=f"bn{index}"),
            keras.layers.ReLU(name=f"relu{index}"),
        ]
    layers += [keras.layers.GlobalAveragePooling2D(name="pool"), keras.layers.Dense(10, name="fc")]
    return keras.Sequential(layers, name="digits_cnn")


class EpochBar(keras.callbacks.Callback):
    """A tqdm bar over the epochs of `fit`, showing the loss."""

    def __init__(self, epochs: int, label: str, enabled: bool):
        super().__init__()
        self.bar = tqdm(total=epochs, desc=label, disable=not enabled, unit="epoch")

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.bar.set_postfix(loss=f"{(logs or {}).get('loss', float('nan')):.4f}")
        self.bar.update(1)

    def on_train_end(self, logs: dict | None = None) -> None:
        self.bar.close()


def train(model: keras.Model, x: np.ndarray, y: np.ndarray, epochs: int, lr: float, label: str,
          progress: bool) -> None:
    """Adam with cosine decay, cross-entropy, shuffled batches."""
    steps = max(epochs * -(-len(x) // BATCH), 1)
    model.compile(
        optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(lr, steps)),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    if epochs > 0:
        model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=True, verbose=0,
                  callbacks=[EpochBar(epochs, label, progress)])


def predict(model: keras.Model, x: np.ndarray) -> np.ndarray:
    # One eager call in inference mode: the test split is small, and no predict function is traced per model.
    return keras.ops.convert_to_numpy(model(x, training=False))


def accuracy(model: keras.Model, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(predict(model, x).argmax(1) == y))


def run(args: argparse.Namespace) -> int:
    """Run the demo with the options of `python -m trainable_infra demo`; returns the exit status."""
    start = time.perf_counter()
    keras.utils.set_random_seed(args.seed)
    progress = not args.no_progress
    x_train, y_train, x_test, y_test = load_digits_split(seed=args.seed)
    x_train, x_test = x_train[..., None], x_test[..., None]
    method = TrainingMethod[args.method]
    print(f"Keras {keras.__version__} (TensorFlow {tf.__version__}): digits, {len(x_train)} train / {len(x_test)} "
          f"test images, W{args.weight_bits}A{args.activation_bits} {method.name}")

    float_model = float_cnn()
    train(float_model, x_train, y_train, args.float_epochs, 3e-3, "float training", progress)
    print(accuracy_line("float", accuracy(float_model, x_test, y_test)))

    config = QATConfig(
        weight_training_method=method, activation_training_method=method,
        weight_n_bits=args.weight_bits, activation_n_bits=args.activation_bits,
        fold_batch_norm=getattr(args, "fold_batch_norm", True),
    )
    representative = [(x_train[i:i + 256], y_train[i:i + 256]) for i in range(0, len(x_train), 256)]
    qat_model = quantize_model(float_model, config, representative, progress=progress)
    print(accuracy_line("PTQ", accuracy(qat_model, x_test, y_test)))
    if method is TrainingMethod.DQA:
        # The temperature reaches 0 after 70% of the QAT steps; the rest trains the b-bit quantizers alone.
        set_dqa_temperature_schedule(qat_model, temperature_schedule_for(args.epochs * -(-len(x_train) // BATCH)))
    keras.utils.set_random_seed(args.seed + 1)
    train(qat_model, x_train, y_train, args.epochs, 1e-3, "QAT training", progress)
    print(accuracy_line("QAT", accuracy(qat_model, x_test, y_test)))

    output = Path(args.output) if args.output else Path(tempfile.mkdtemp(prefix="trainable_infra_demo_"))
    output.mkdir(parents=True, exist_ok=True)
    expected = predict(qat_model, x_test)
    checkpoint = output / "qat_model.keras"
    qat_model.save(checkpoint)
    reloaded = keras.models.load_model(checkpoint, safe_mode=True)  # the library's classes need no custom_objects
    same = np.array_equal(predict(reloaded, x_test), expected)
    print(f"saved {checkpoint}; reloaded (safe mode) predictions identical: {same}")

    converted = convert_to_inferable(qat_model)
    converted_same = np.array_equal(predict(converted, x_test), expected)
    print(f"converted to mct-quantizers quantizers; predictions identical: {converted_same}")
    exported = output / "inferable_model.keras"
    converted.save(exported)
    exported_same = np.array_equal(predict(keras.models.load_model(exported, safe_mode=True), x_test), expected)
    print(f"exported {exported}; reloaded (safe mode) predictions identical: {exported_same}")
    print(_deployment_line(converted, output / "model.tflite", x_test))

    print()
    quantization_report(qat_model, [(x_test, y_test)])
    print(f"\ndone in {time.perf_counter() - start:.1f} s")
    return 0 if same and converted_same and exported_same else 1


def _deployment_line(model: keras.Model, path: Path, x: np.ndarray) -> str:
    """Export to a full-integer TFLite file; say what the TFLite interpreter makes of it: size, latency, identical
    outputs."""
    report = export_tflite(model, path, x)
    runner = tflite_interpreter(report.path).get_signature_runner()
    feed = {next(iter(runner.get_input_details())): x.astype(np.float32)}
    times = []
    for _ in range(7):
        begin = time.perf_counter()
        runner(**feed)
        times.append(time.perf_counter() - begin)
    return (f"exported {report.path} ({os.path.getsize(report.path) / 1024:.1f} KB, int8 {report.format}); "
            f"{report.runtime}: {1000 * float(np.median(times)):.2f} ms for {len(x)} images, identical logits "
            f"{100 * report.identical:.2f}%, identical predictions {100 * report.argmax_identical:.2f}%")
