"""Switches used mid-training: freeze quantizer parameters, freeze BatchNormalization statistics, and a callback
that applies them at a given epoch of `fit`, and DQA's temperature schedule."""

from __future__ import annotations

from typing import Any

import keras

from trainable_infra.common.dqa import set_temperature_schedules
from trainable_infra.common.enums import VariableGroup
from trainable_infra.common.errors import QuantizationConfigError
from trainable_infra.common.schedules import LinearAnnealing
from trainable_infra.keras_backend.base_quantizer import BaseKerasTrainableQuantizer
from trainable_infra.keras_backend.calibrate import all_layers

# Set on a quantizer by freeze_quantizers: the variables it made non-trainable, which unfreeze_quantizers restores.
_FROZEN = "_frozen_quantizer_variables"


def quantizers_of(model: keras.Model) -> dict[str, BaseKerasTrainableQuantizer]:
    """Every trainable quantizer of `model`, by "<layer>.<attribute>" (holders: "<layer>.activation")."""
    found = {}
    for layer in all_layers(model):
        for attribute, quantizer in getattr(layer, "weights_quantizers", {}).items():
            if isinstance(quantizer, BaseKerasTrainableQuantizer):
                found[f"{layer.name}.{attribute}"] = quantizer
        quantizer = getattr(layer, "activation_holder_quantizer", None)
        if isinstance(quantizer, BaseKerasTrainableQuantizer):
            found[f"{layer.name}.activation"] = quantizer
    return found


def _retrace(model: keras.Model) -> None:
    # Keras traces `trainable` into the train step: a changed flag needs a new step function (see Layer.trainable).
    if getattr(model, "train_function", None) is not None:
        model.make_train_function(force=True)


def _build_optimizer(model: keras.Model) -> None:
    # A Keras optimizer makes its state for the variables trainable when it is built and can update no others
    # ("Unknown variable"): build it before freezing, so that unfreezing later, and a saved model's optimizer
    # state, cover every variable, as when freezing after the first step.
    optimizer = getattr(model, "optimizer", None)
    if isinstance(optimizer, keras.optimizers.Optimizer) and not optimizer.built and model.built:
        optimizer.build(model.trainable_variables)


def _quantizers(model: Any) -> dict[str, BaseKerasTrainableQuantizer]:
    quantizers = quantizers_of(model)
    if not quantizers:
        raise QuantizationConfigError("model has no trainable quantizers; make it with quantize_model first")
    return quantizers


def freeze_quantizers(model: keras.Model) -> int:
    """Stop training the quantization parameters (thresholds, ranges); returns how many variables were frozen.

    Works mid-training (between `fit` calls, or from a callback such as `QuantizerFreezeCallback`); the state is
    not saved in `.keras` files: call it again after loading.
    """
    quantizers = _quantizers(model)
    _build_optimizer(model)
    count = 0
    for quantizer in quantizers.values():
        quantizer.freeze_quant_params = True
        frozen = getattr(quantizer, _FROZEN, [])
        for entry in quantizer.registered_variables().values():
            if entry.group is VariableGroup.QPARAMS and entry.variable.trainable:
                entry.variable.trainable = False
                frozen.append(entry.variable)
                count += 1
        setattr(quantizer, _FROZEN, frozen)
    if count:
        _retrace(model)
    return count


def unfreeze_quantizers(model: keras.Model) -> int:
    """Train the quantization parameters that `freeze_quantizers` froze again; returns how many.

    Fixed parameters (STE quantizers, or a quantizer built with `freeze_quant_params=True`) stay fixed.
    """
    count = 0
    for quantizer in _quantizers(model).values():
        frozen = getattr(quantizer, _FROZEN, [])
        for variable in frozen:
            variable.trainable = True
            count += 1
        if frozen:
            quantizer.freeze_quant_params = False
        setattr(quantizer, _FROZEN, [])
    if count:
        _retrace(model)
    return count


def _batch_norms(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    return [layer for layer in all_layers(model) if isinstance(layer, keras.layers.BatchNormalization)]


def freeze_bn_stats(model: keras.Model) -> int:
    """Set `trainable=False` on every BatchNormalization layer; returns how many changed.

    In Keras this makes the layer normalize with its moving mean and variance, also in training, and stop
    updating them, as in inference; unlike PyTorch it also stops training its scale and offset (Keras ties both
    to `trainable`). The flag is part of the layer's config, so it is saved in `.keras` files; load such a file
    with `keras_load_quantized_model`, which also restores the optimizer state that `keras.models.load_model`
    skips once the trainable variables differ from those the optimizer was built for.
    """
    layers = _batch_norms(model)
    _build_optimizer(model)
    count = 0
    for layer in layers:
        if layer.trainable:
            layer.trainable = False
            count += 1
    if count:
        _retrace(model)
    return count


def unfreeze_bn_stats(model: keras.Model) -> int:
    """Set `trainable=True` on every BatchNormalization layer again; returns how many changed."""
    count = 0
    for layer in _batch_norms(model):
        if not layer.trainable:
            layer.trainable = True
            count += 1
    if count:
        _retrace(model)
    return count


def _check_epoch(name: str, value: Any) -> int | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    raise QuantizationConfigError(f"{name} must be an epoch index >= 0 or None (never), got {value!r}")


class QuantizerFreezeCallback(keras.callbacks.Callback):
    """Freezes quantizer parameters and / or BatchNormalization statistics from a given epoch of `fit` on.

    Args:
        freeze_quantizers_at: epoch index (0-based, as `fit` counts) at whose start `freeze_quantizers` is applied;
            None: never.
        freeze_bn_stats_at: epoch index at whose start `freeze_bn_stats` is applied; None: never.

    The switch is applied at the start of every epoch from that index on (a no-op once done), so a training
    resumed with `initial_epoch` past it, or a reloaded model, is frozen too.

    Example:
        >>> model.fit(x, y, epochs=10, callbacks=[QuantizerFreezeCallback(freeze_bn_stats_at=6,  # doctest: +SKIP
        ...                                                                freeze_quantizers_at=8)])
    """

    def __init__(self, freeze_quantizers_at: int | None = None, freeze_bn_stats_at: int | None = None):
        super().__init__()
        self.freeze_quantizers_at = _check_epoch("freeze_quantizers_at", freeze_quantizers_at)
        self.freeze_bn_stats_at = _check_epoch("freeze_bn_stats_at", freeze_bn_stats_at)
        if freeze_quantizers_at is None and freeze_bn_stats_at is None:
            raise QuantizationConfigError(
                "QuantizerFreezeCallback needs freeze_quantizers_at or freeze_bn_stats_at (an epoch index); "
                "both are None"
            )

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        if self.freeze_quantizers_at is not None and epoch >= self.freeze_quantizers_at:
            freeze_quantizers(self.model)
        if self.freeze_bn_stats_at is not None and epoch >= self.freeze_bn_stats_at:
            freeze_bn_stats(self.model)


def set_dqa_temperature_schedule(model: keras.Model, schedule: LinearAnnealing | dict) -> int:
    """Give every DQA quantizer of `model` the temperature `schedule` (steps count training steps); returns how many
    quantizers there are.

    The schedule is part of each quantizer's config, so `.keras` files keep it; a train step `fit` traced before
    is traced again.

    Example:
        >>> set_dqa_temperature_schedule(qat_model, LinearAnnealing(0, 300, 1.0, 0.0))  # doctest: +SKIP
    """
    count = set_temperature_schedules(quantizers_of(model).values(), schedule)
    _retrace(model)
    return count
