"""The per-layer quantization report of a Keras QAT model."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf

from trainable_infra.common.errors import QuantizationConfigError
from trainable_infra.common.report import format_report, report_row, sqnr_db
from trainable_infra.keras_backend.calibrate import all_layers, holders_of, observed, run_batches
from trainable_infra.keras_backend.training import quantizers_of
from trainable_infra.keras_backend.wrappers import KerasTrainableQuantizationWrapper


def _params(quantizer: Any, tensor: str) -> dict[str, np.ndarray]:
    # Registered as "<tensor>_threshold" and the like: the report names the parameter only.
    return {
        name.removeprefix(f"{tensor}_"): np.asarray(tf.convert_to_tensor(entry.variable))
        for name, entry in quantizer.quantizer_parameters.items()
    }


def _describe(quantizer: Any) -> tuple[int, Any, Any]:
    config = quantizer.quantization_config
    if hasattr(config, "weights_n_bits"):
        return config.weights_n_bits, config.weights_quantization_method, quantizer.identifier
    return config.activation_n_bits, config.activation_quantization_method, quantizer.identifier


def quantization_report(
    model: keras.Model, data: Any = None, num_batches: int = 1, *, print_table: bool = True
) -> list[dict]:
    """Rows (layer, kind, bits, method, training, parameters, sqnr_db) for every quantizer of a QAT model.

    Weight SQNR compares each kernel with its fake-quantized value; activation SQNR compares what reaches each
    holder with what leaves it, over `num_batches` batches of `data` (as `calibrate` takes it; None when no data
    is given). The table is printed unless `print_table` is False.
    """
    if not quantizers_of(model):
        raise QuantizationConfigError("model has no trainable quantizers; make it with quantize_model first")
    rows = []
    for layer in all_layers(model):
        if isinstance(layer, KerasTrainableQuantizationWrapper):
            for attribute, quantizer in layer.weights_quantizers.items():
                if not quantizer.weights_quantization():
                    continue
                kernel = tf.convert_to_tensor(getattr(layer.layer, attribute))
                quantized = quantizer(kernel, False)
                bits, method, training = _describe(quantizer)
                rows.append(report_row(
                    f"{layer.name}.{attribute}", "weights", bits, method, training, _params(quantizer, attribute),
                    sqnr_db(kernel.numpy(), keras.ops.convert_to_numpy(quantized)),
                ))
    holders = holders_of(model)
    signal = dict.fromkeys(holders, 0.0)
    noise = dict.fromkeys(holders, 0.0)
    if data is not None and holders:

        def measure(name: str, holder: Any) -> Any:
            def quantize(inputs: Any) -> Any:
                outputs = holder.activation_quantizer(inputs, False)
                reference = keras.ops.convert_to_numpy(keras.ops.cast(inputs, "float32")).astype(np.float64)
                error = reference - keras.ops.convert_to_numpy(keras.ops.cast(outputs, "float32"))
                signal[name] += float(np.sum(reference**2))
                noise[name] += float(np.sum(error**2))
                return outputs
            return quantize

        with observed(holders, {name: measure(name, holder) for name, holder in holders.items()}):
            run_batches(model, data, num_batches, False, "report")
    for name, holder in holders.items():
        quantizer = holder.activation_quantizer
        bits, method, training = _describe(quantizer)
        sqnr = None
        if data is not None:
            sqnr = float("inf") if noise[name] == 0 else 10 * np.log10(max(signal[name], 1e-300) / noise[name])
        rows.append(report_row(name, "activation", bits, method, training, _params(quantizer, "activation"), sqnr))
    if print_table:
        print(format_report(rows))
    return rows
