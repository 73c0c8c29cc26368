"""Activation parameters from representative data."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from trainable_infra.common.calibration import ActivationObserver
from trainable_infra.common.errors import QuantizationConfigError
from trainable_infra.common.model_plan import check_calibrate_arguments
from trainable_infra.pytorch_backend.integer import float_arithmetic
from trainable_infra.pytorch_backend.wrappers import PytorchTrainableActivationQuantizationHolder


def model_inputs(batch: Any) -> tuple[torch.Tensor, ...]:
    """The model inputs of one batch: a tensor, a tuple of tensors, or the first item of (inputs, targets)."""
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)) and batch:
        first = batch[0]
        if isinstance(first, torch.Tensor):
            return (first,)
        if isinstance(first, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in first):
            return tuple(first)
    raise QuantizationConfigError(
        f"each batch of representative data must be a tensor or an (inputs, targets) pair, got {type(batch).__name__}"
    )


def check_data(name: str, data: Any) -> Iterable[Any]:
    """Return `data` if it can be iterated as batches, else raise naming the argument `name`."""
    if isinstance(data, (str, bytes, Mapping)) or not isinstance(data, Iterable):
        raise QuantizationConfigError(
            "representative data must be an iterable of batches (a DataLoader, or a list of tensors or (inputs, "
            f"targets) pairs), got {name}={data!r} of type {type(data).__name__}"
        )
    return data


def check_model(model: Any) -> nn.Module:
    """Return `model` if it is a `torch.nn.Module`, else raise."""
    if not isinstance(model, nn.Module):
        raise QuantizationConfigError(f"model must be a torch.nn.Module, got {type(model).__name__} {model!r}")
    return model


def holders_of(model: nn.Module) -> dict[str, PytorchTrainableActivationQuantizationHolder]:
    """The trainable activation holders of `model` by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, PytorchTrainableActivationQuantizationHolder)}


@torch.no_grad()
def observe_holders(
    model: nn.Module, data: Iterable[Any], num_batches: int | None, calibration: str, progress: bool
) -> dict[str, ActivationObserver]:
    """Run `data` through `model` in eval mode with every holder passing its input through unquantized, and
    return what each holder saw."""
    holders = holders_of(model)
    observers = {name: ActivationObserver(calibration) for name in holders}
    handles = []
    for name, holder in holders.items():
        handles.append(holder.register_forward_pre_hook(
            lambda module, args, observer=observers[name]: observer.update(args[0].detach().float().cpu().numpy())
        ))
        # Returning the input from a forward hook makes the holder an identity while calibrating.
        handles.append(holder.register_forward_hook(lambda module, args, output: args[0]))
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    batches = 0
    try:
        total = num_batches if num_batches is not None else (len(data) if hasattr(data, "__len__") else None)
        for index, batch in enumerate(tqdm(data, total=total, desc="calibration", disable=not progress)):
            if num_batches is not None and index >= num_batches:
                break
            inputs = tuple(t.to(device) for t in model_inputs(batch))
            batches += 1
            try:
                # The holders pass values through unquantized: the integer layers must not assume them on a grid.
                with float_arithmetic(model):
                    model(*inputs)
            except (RuntimeError, TypeError, ValueError) as exc:
                shapes = [tuple(t.shape) for t in inputs]
                raise QuantizationConfigError(
                    f"representative data batch {index} (input shapes {shapes}) does not run through the model: "
                    f"{str(exc).splitlines()[0]}"
                ) from exc
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if batches == 0:
        raise QuantizationConfigError("representative data is empty: no batch reached the activation quantizers")
    unseen = [name for name, observer in observers.items() if observer.count == 0]
    if unseen:
        raise QuantizationConfigError(
            f"the activation quantizers {unseen} saw no finite value in {batches} "
            f"batch{'es' if batches != 1 else ''} of representative data "
            "(only NaN or ±Inf, or empty tensors)"
        )
    return observers


def calibrate(
    model: nn.Module,
    data: Iterable[Any],
    num_batches: int | None = None,
    calibration: str = "minmax",
    *,
    progress: bool = True,
) -> dict[str, dict]:
    """Set the activation quantizers' parameters of a QAT model from data, in place.

    Each holder's threshold (or range) is fitted to the values that reach it, with activation quantization
    switched off while observing. The quantizers keep their signedness; a warning names any unsigned one that
    saw negative values. Returns {holder name: new parameters}.

    Args:
        model: a model made by `quantize_model`.
        data: batches (tensors or (inputs, targets) pairs).
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
            f"model has no trainable activation quantizers (this {type(model).__name__} holds no "
            "PytorchTrainableActivationQuantizationHolder); make it with quantize_model first"
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
        with torch.no_grad():
            for key, variable in variables.items():
                variable.fill_(new[key])
        if hasattr(quantizer, "forget_grid"):
            quantizer.forget_grid()  # the filled tensor may be a sharded copy of the one the grid was kept for
        # The config describes the quantizer as calibrated (get_config, from_config and repr read it).
        quantizer.quantization_config = quantizer.current_quantization_config()
        if new.get("is_signed") and not config.activation_quantization_params.get("is_signed", True):
            warnings.warn(
                f"{name} quantizes unsigned but saw values down to {observers[name].minimum:.4g}; they clip at 0",
                stacklevel=2,
            )
        updated[name] = new
    return updated
