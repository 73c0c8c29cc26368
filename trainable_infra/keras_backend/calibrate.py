"""Activation parameters from representative data."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from trainable_infra.common.calibration import ActivationObserver
from trainable_infra.common.errors import QuantizationConfigError
from trainable_infra.common.model_plan import check_calibrate_arguments
from trainable_infra.keras_backend.attention import QuantizedAttentionBase
from trainable_infra.keras_backend.wrappers import KerasActivationQuantizationHolder

# A single array of samples is split into batches of this size, Keras' default for `predict`.
CALIBRATION_BATCH_SIZE = 32


def _is_array(value: Any) -> bool:
    return isinstance(value, (np.ndarray, tf.Tensor)) or keras.ops.is_tensor(value)


def _is_inputs(value: Any) -> bool:
    """An array, or a list / tuple / dict of arrays (the inputs of a multi-input model)."""
    if _is_array(value):
        return True
    if isinstance(value, dict):
        return bool(value) and all(_is_array(v) for v in value.values())
    return isinstance(value, (list, tuple)) and bool(value) and all(_is_array(v) for v in value)


def model_inputs(batch: Any) -> Any:
    """The model inputs of one batch: an array / tensor, or the first item of (inputs, targets[, weights])
    as `model.fit` takes them (inputs may be a list, tuple or dict of arrays for a multi-input model)."""
    if _is_array(batch) or isinstance(batch, dict):
        inputs = batch
    elif isinstance(batch, tuple) and 1 <= len(batch) <= 3:
        inputs = batch[0]
    elif isinstance(batch, list):
        inputs = batch
    else:
        inputs = None
    if inputs is None or not _is_inputs(inputs):
        raise QuantizationConfigError(
            "each batch of representative data must be an array or tensor, or an (inputs, targets) tuple, got "
            f"{type(batch).__name__}"
        )
    return inputs


def check_data(name: str, data: Any) -> Any:
    """Return `data` if it is an array of samples or an iterable of batches, else raise naming the argument `name`."""
    if _is_array(data):
        if not tuple(keras.ops.shape(data)):
            raise QuantizationConfigError(
                f"representative data is a scalar {type(data).__name__}; give samples: got {name}={data!r}"
            )
        return data
    if isinstance(data, (str, bytes, dict)) or not isinstance(data, Iterable):
        raise QuantizationConfigError(
            "representative data must be an array of samples or an iterable of batches (a list, a generator, a "
            f"tf.data.Dataset), got {name}={data!r} of type {type(data).__name__}"
        )
    return data


def check_model(model: Any) -> keras.Model:
    """Return `model` if it is a Keras 3 model, else raise."""
    if not isinstance(model, keras.Model):
        raise QuantizationConfigError(f"model must be a Keras 3 model, got {type(model).__name__} {model!r}")
    return model


def batches_of(data: Any, name: str = "data") -> Iterable[Any]:
    """`data` as batches: an array or tensor of samples is split into batches of CALIBRATION_BATCH_SIZE; anything
    else (a list of batches, a generator, a `tf.data.Dataset`) is iterated as it is."""
    check_data(name, data)
    if _is_array(data):
        size = int(keras.ops.shape(data)[0])
        return [data[i:i + CALIBRATION_BATCH_SIZE] for i in range(0, size, CALIBRATION_BATCH_SIZE)]
    return data


def _length(data: Any) -> int | None:
    try:
        return len(data)
    except TypeError:  # a generator, or a tf.data.Dataset of unknown size
        return None


def _shapes(inputs: Any) -> list[tuple]:
    return [tuple(keras.ops.shape(t)) for t in keras.tree.flatten(inputs)]


def all_layers(model: keras.Model) -> Iterator[keras.layers.Layer]:
    """The layers of `model` and of the models nested in it, depth first, with the quantization layers inside its
    quantized attention layers (their projection wrappers and holders) after each of them."""
    check_model(model)
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from all_layers(layer)
        elif isinstance(layer, QuantizedAttentionBase):
            yield from layer.quantization_layers()


def holders_of(model: keras.Model) -> dict[str, KerasActivationQuantizationHolder]:
    """The trainable activation holders of `model` (nested models included) by layer name, enabled ones only."""
    return {
        layer.name: layer for layer in all_layers(model)
        if isinstance(layer, KerasActivationQuantizationHolder)
        and layer.activation_holder_quantizer.activation_quantization()
    }


@contextlib.contextmanager
def observed(holders: dict[str, KerasActivationQuantizationHolder],
             observers: dict[str, Callable[[Any], Any]]) -> Iterator[None]:
    """Within the block, eager calls of each holder return `observers[name](inputs)` instead of quantizing."""
    try:
        for name, holder in holders.items():
            holder._observer = observers[name]
        yield
    finally:
        for holder in holders.values():
            holder._observer = None


def run_batches(model: keras.Model, data: Any, num_batches: int | None, progress: bool, desc: str) -> int:
    """Call `model` eagerly in inference mode on each batch of `data` (at most `num_batches`); return how many ran."""
    data = batches_of(data)
    total = num_batches if num_batches is not None else _length(data)
    batches = 0
    for index, batch in enumerate(tqdm(data, total=total, desc=desc, disable=not progress)):
        if num_batches is not None and index >= num_batches:
            break
        inputs = model_inputs(batch)
        batches += 1
        try:
            model(inputs, training=False)
        except (ValueError, TypeError, tf.errors.InvalidArgumentError) as exc:
            if isinstance(exc, QuantizationConfigError):
                raise
            raise QuantizationConfigError(
                f"representative data batch {index} (input shapes {_shapes(inputs)}) does not run through the "
                f"model, whose inputs are {[tuple(t.shape) for t in model.inputs]}: {str(exc).strip().splitlines()[0]}"
            ) from exc
    return batches


def observe_holders(
    model: keras.Model, data: Any, num_batches: int | None, calibration: str, progress: bool
) -> dict[str, ActivationObserver]:
    """Run `data` through `model` in inference mode with every holder passing its input through unquantized, and
    return what each holder saw."""
    holders = holders_of(model)
    observers = {name: ActivationObserver(calibration) for name in holders}

    def observe(observer: ActivationObserver) -> Callable[[Any], Any]:
        def identity(inputs: Any) -> Any:
            observer.update(keras.ops.convert_to_numpy(keras.ops.cast(inputs, "float32")))
            return inputs
        return identity

    with observed(holders, {name: observe(observer) for name, observer in observers.items()}):
        batches = run_batches(model, data, num_batches, progress, "calibration")
    if batches == 0:
        raise QuantizationConfigError("representative data is empty: no batch reached the activation quantizers")
    unseen = [name for name, observer in observers.items() if observer.count == 0]
    if unseen:
        raise QuantizationConfigError(
            f"the activation quantizers {unseen} saw no finite value in {batches} "
            f"batch{'es' if batches != 1 else ''} of representative data "
            "(only NaN or ±Inf, or empty arrays)"
        )
    return observers


def calibrate(
    model: keras.Model,
    data: Any,
    num_batches: int | None = None,
    calibration: str = "minmax",
    *,
    progress: bool = True,
) -> dict[str, dict]:
    """Set the activation quantizers' parameters of a QAT model from data, in place.

    Each holder's threshold (or range) is fitted to the values that reach it, with activation quantization
    switched off while observing (the model runs eagerly, in inference mode). The quantizers keep their
    signedness; a warning names any unsigned one that saw negative values. Returns {holder name: new parameters}.

    Args:
        model: a model made by `quantize_model` (or any model with `KerasActivationQuantizationHolder`s).
        data: an array of samples (split into batches of 32), or batches: arrays, `(inputs, targets)` tuples, or a
            batched `tf.data.Dataset`.
        num_batches: how many batches to use (None: all).
        calibration: "minmax" or "mse" (see `QATConfig.activation_calibration`).
        progress: show a progress bar.
    """
    check_model(model)
    check_data("data", data)
    num_batches = check_calibrate_arguments(num_batches, calibration, progress)
    holders = holders_of(model)
    if not holders:
        raise QuantizationConfigError(
            f"model has no trainable activation quantizers ({model.name!r} holds no enabled "
            "KerasActivationQuantizationHolder); make it with quantize_model first"
        )
    observers = observe_holders(model, data, num_batches, calibration, progress)
    updated = {}
    for name, holder in holders.items():
        quantizer = holder.activation_holder_quantizer
        config = quantizer.quantization_config
        new = observers[name].quant_params(
            config.activation_quantization_method, config.activation_n_bits, config.min_threshold
        )
        # Parameters are found by their registered names (threshold, range_min, range_max), so quantizers
        # written outside the library calibrate too.
        variables = {key: quantizer.parameter_variable(key) for key in new if key != "is_signed"}
        variables = {key: variable for key, variable in variables.items() if variable is not None}
        if not variables:
            warnings.warn(f"{name}: {type(quantizer).__name__} registers no threshold, range_min or range_max "
                          "variable; not calibrated", stacklevel=2)
            continue
        new = {key: value for key, value in new.items() if key == "is_signed" or key in variables}
        for key, variable in variables.items():
            variable.assign(np.full(variable.shape, new[key], dtype=np.float32))
        # The config describes the quantizer as calibrated (get_config, from_config and repr read it).
        quantizer.quantization_config = quantizer.current_quantization_config()
        if new.get("is_signed") and not config.activation_quantization_params.get("is_signed", True):
            warnings.warn(
                f"{name} quantizes unsigned but saw values down to {observers[name].minimum:.4g}; they clip at 0",
                stacklevel=2,
            )
        updated[name] = new
    return updated
