"""Forward+backward time per element of each built-in Keras quantizer, beside TensorFlow's fused fake-quant op.

Each quantizer kind (STE / LSQ × symmetric / uniform, weights per-channel on the last axis, activations
per-tensor) runs in training mode inside a `tf.function` (as `model.fit` runs it, no XLA) on tensors of 1M and 16M
elements, with the gradients of the input and of the quantizer's trainable variables; the baseline is
`tf.quantization.fake_quant_with_min_max_vars` (or `_per_channel`) with its registered gradient (input, min and
max) on the same tensor. Times are medians of `--repeats` runs.

    python benchmarks/keras_quantizer_kernels.py --sizes 1M 16M
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
from kernel_cases import CHANNELS, SIZES, quantizers

from trainable_infra import TrainingMethod
from trainable_infra.keras_backend import BaseKerasTrainableQuantizer


def timed(fn, repeats: int) -> float:
    """Median wall time of `fn()` (which returns tensors, read back so that the work is done)."""
    for _ in range(2):
        [t.numpy() for t in fn()]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        [t.numpy() for t in fn()]
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def step(forward, variables: list) -> tf.types.experimental.PolymorphicFunction:
    """A traced forward+backward of `forward(x)` against an upstream gradient, returning the gradients' sums."""

    @tf.function(jit_compile=False)
    def run(x, upstream):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = forward(x)
        grads = tape.gradient(y, [x, *variables], output_gradients=upstream)
        # Reduced on the device side: reading a 16M-element gradient back would dominate the time.
        return [tf.reduce_sum(g) for g in grads]

    return run


def run_size(size_name: str, repeats: int) -> None:
    """Time every quantizer kind and the fused ops on one tensor size and print the rows."""
    n = SIZES[size_name]
    rng = np.random.default_rng(0)
    x = tf.constant((rng.normal(size=(n // CHANNELS, CHANNELS)) * 2).astype(np.float32))
    upstream = tf.constant(rng.normal(size=(n // CHANNELS, CHANNELS)).astype(np.float32))
    low, high = tf.Variable(np.full(CHANNELS, -3.0, np.float32)), tf.Variable(np.full(CHANNELS, 3.0, np.float32))

    per_channel = step(
        lambda t: tf.quantization.fake_quant_with_min_max_vars_per_channel(t, low, high, num_bits=8), [low, high]
    )
    per_tensor = step(
        lambda t: tf.quantization.fake_quant_with_min_max_vars(t, low[0], high[0], num_bits=8), [low, high]
    )
    baselines = {True: timed(lambda: per_channel(x, upstream), repeats),
                 False: timed(lambda: per_tensor(x, upstream), repeats)}
    for method in TrainingMethod:
        for kind, (quantizer, is_weight) in quantizers(method, BaseKerasTrainableQuantizer, -1).items():
            layer = keras.layers.Layer()
            quantizer.initialize_quantization(tuple(x.shape) if is_weight else (None, CHANNELS), "t", layer)
            ours_step = step(lambda t, q=quantizer: q(t, True), list(layer.trainable_variables))
            ours = timed(lambda s=ours_step: s(x, upstream), repeats)
            base = baselines[is_weight]
            print(f"{method.name + ' ' + kind:44s} {size_name:>5s} {ours / n * 1e9:8.3f} {base / n * 1e9:9.3f}"
                  f" {ours / base:7.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["1M", "16M"])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(f"tensorflow {tf.__version__}, keras {keras.__version__}, {os.cpu_count()} CPUs; "
          "ns per element, forward+backward, training mode")
    print(f"{'quantizer':44s} {'size':>5s} {'ours':>8s} {'fused op':>9s} {'ratio':>7s}")
    for size_name in args.sizes:
        run_size(size_name, args.repeats)


if __name__ == "__main__":
    main()
