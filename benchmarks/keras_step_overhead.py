"""Training-step time of a QAT model relative to its float model (Keras 3, `model.fit`).

The model is a 7-layer CNN (convolutions 3→32→32→64→64→128→128, each with BatchNormalization and ReLU, then a
dense classifier) on 32x32x3 inputs, batch 64, SGD with momentum. Its QAT version quantizes every convolution /
dense kernel per-channel and every activation (input and after each ReLU) at 8 bits (W8A8). Both models train
with `model.fit` in one process; rounds of fit steps alternate between them, each step is timed by a callback
(first round discarded: tracing) and the medians are reported, with the median over rounds of the ratio of a
round's QAT and float medians (steadier when other work shares the machine).

    python benchmarks/keras_step_overhead.py --method STE --rounds 6 --steps 10
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

from trainable_infra import (
    QuantizationMethod,
    QuantizationTarget,
    TrainableQuantizerActivationConfig,
    TrainableQuantizerWeightsConfig,
    TrainingMethod,
    get_trainable_quantizer_class,
)
from trainable_infra.common import numerics
from trainable_infra.keras_backend import (
    BaseKerasTrainableQuantizer,
    KerasActivationQuantizationHolder,
    KerasTrainableQuantizationWrapper,
)

WIDTHS = (32, 32, 64, 64, 128, 128)


def float_cnn() -> keras.Sequential:
    """The float 7-layer CNN."""
    layers: list[keras.layers.Layer] = [keras.Input((32, 32, 3))]
    for i, width in enumerate(WIDTHS):
        layers += [
            keras.layers.Conv2D(width, 3, padding="same", strides=2 if i in (2, 4) else 1),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
        ]
    layers += [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10)]
    return keras.Sequential(layers)


def qat_cnn(model: keras.Sequential, method: TrainingMethod) -> keras.Sequential:
    """A W8A8 per-channel QAT model sharing `model`'s layers, its weight thresholds from their max |w|."""
    weight_cls = get_trainable_quantizer_class(
        QuantizationTarget.Weights, method, QuantizationMethod.SYMMETRIC, BaseKerasTrainableQuantizer
    )
    activation_cls = get_trainable_quantizer_class(
        QuantizationTarget.Activation, method, QuantizationMethod.SYMMETRIC, BaseKerasTrainableQuantizer
    )

    def holder(signed: bool) -> keras.layers.Layer:
        config = TrainableQuantizerActivationConfig(
            QuantizationMethod.SYMMETRIC, 8, {"threshold": 4.0, "is_signed": signed}, True, 2**-16
        )
        return KerasActivationQuantizationHolder(activation_cls(config))

    layers: list[keras.layers.Layer] = [keras.Input((32, 32, 3)), holder(True)]
    for layer in model.layers:
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            threshold = numerics.max_abs_threshold(layer.kernel.numpy(), channel_axis=-1)
            config = TrainableQuantizerWeightsConfig(
                QuantizationMethod.SYMMETRIC, 8, {"threshold": threshold}, True, -1, True, 2**-16
            )
            layers.append(KerasTrainableQuantizationWrapper(layer, {"kernel": weight_cls(config)}))
        else:
            layers.append(layer)
        if isinstance(layer, keras.layers.ReLU):
            layers.append(holder(False))
    return keras.Sequential(layers)


class StepTimer(keras.callbacks.Callback):
    """Wall time of each training batch, in milliseconds."""

    def __init__(self):
        super().__init__()
        self.times: list[float] = []

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append((time.perf_counter() - self._start) * 1e3)


def measure(method: TrainingMethod, rounds: int, steps: int, batch: int) -> dict:
    """Median step times (ms) of the float and the QAT model, from alternating rounds of `fit`."""
    keras.utils.set_random_seed(0)
    float_model = float_cnn()
    # The QAT model wraps copies of the float layers, so both start from the same weights and train separately.
    twin = keras.models.clone_model(float_model)
    twin.set_weights(float_model.get_weights())
    qat_model = qat_cnn(twin, method)
    models = {"float": float_model, "qat": qat_model}
    for model in models.values():
        model.compile(
            optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=False,
        )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch * steps, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, size=batch * steps)
    times: dict[str, list[float]] = {name: [] for name in models}
    round_ratios = []
    for round_index in range(rounds + 1):
        round_medians = {}
        for name, model in models.items():
            timer = StepTimer()
            model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0, callbacks=[timer])
            round_medians[name] = statistics.median(timer.times)
            if round_index > 0:  # the first round traces the step function
                times[name] += timer.times
        if round_index > 0:
            round_ratios.append(round_medians["qat"] / round_medians["float"])
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        **medians,
        "ratio": medians["qat"] / medians["float"],
        # Adjacent rounds see the same machine load: their ratio is steadier on a shared machine.
        "paired_ratio": statistics.median(round_ratios),
        "steps": len(times["qat"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=[m.name for m in TrainingMethod], default="STE")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=10, help="fit steps per round and model")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    result = measure(TrainingMethod[args.method], args.rounds, args.steps, args.batch)
    print(f"tensorflow {tf.__version__}, keras {keras.__version__}, {os.cpu_count()} CPUs, batch {args.batch}, "
          f"{args.method}, median of {result['steps']} fit steps per model")
    print(f"float {result['float']:.2f} ms/step | QAT {result['qat']:.2f} ms/step | ratio {result['ratio']:.3f}x "
          f"| median of per-round ratios {result['paired_ratio']:.3f}x")


if __name__ == "__main__":
    main()
