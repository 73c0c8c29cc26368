"""Switches used mid-training: freeze quantizer parameters, freeze BatchNorm statistics, DQA's schedule."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from trainable_infra.common.dqa import set_temperature_schedules
from trainable_infra.common.enums import VariableGroup
from trainable_infra.common.errors import QuantizationConfigError
from trainable_infra.common.schedules import LinearAnnealing
from trainable_infra.pytorch_backend.base_quantizer import BasePytorchTrainableQuantizer
from trainable_infra.pytorch_backend.calibrate import check_model

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def quantizers_of(model: nn.Module) -> dict[str, BasePytorchTrainableQuantizer]:
    """Every trainable quantizer of `model`, by "<module>.<attribute>" (holders: "<module>.activation")."""
    check_model(model)
    found = {}
    for name, module in model.named_modules():
        for attribute, quantizer in getattr(module, "weights_quantizers", {}).items():
            if isinstance(quantizer, BasePytorchTrainableQuantizer):
                found[f"{name}.{attribute}"] = quantizer
        quantizer = getattr(module, "activation_holder_quantizer", None)
        if isinstance(quantizer, BasePytorchTrainableQuantizer):
            found[f"{name}.activation"] = quantizer
    return found


def _set_frozen(quantizer: BasePytorchTrainableQuantizer, frozen: bool) -> int:
    """Freeze or unfreeze one quantizer's parameters; returns how many parameters it has."""
    quantizer.freeze_quant_params = frozen
    learnable = getattr(quantizer, "learnable_params", True)
    count = 0
    for name, entry in quantizer.registered_variables().items():
        if entry.group is VariableGroup.QPARAMS:
            quantizer.get_quantizer_variable(name).requires_grad_(learnable and not frozen)
            count += 1
    return count


def _set_quantizers_frozen(model: nn.Module, frozen: bool) -> int:
    quantizers = quantizers_of(model)
    if not quantizers:
        raise QuantizationConfigError("model has no trainable quantizers; make it with quantize_model first")
    return sum(_set_frozen(quantizer, frozen) for quantizer in quantizers.values())


def freeze_quantizers(model: nn.Module) -> int:
    """Stop training the quantization parameters (thresholds, ranges); returns how many were frozen.

    In a model made by `quantize_model` the switch is part of `state_dict()`, so a model rebuilt and loaded from
    a checkpoint is frozen too.
    """
    return _set_quantizers_frozen(model, True)


def unfreeze_quantizers(model: nn.Module) -> int:
    """Train the quantization parameters of learnable (e.g. LSQ) quantizers again; returns how many."""
    return _set_quantizers_frozen(model, False)


def _keep_eval(module: nn.Module, args: tuple) -> None:
    module.training = False


def _is_frozen(module: nn.Module) -> bool:
    return any(hook is _keep_eval for hook in module._forward_pre_hooks.values())


def freeze_bn_stats(model: nn.Module) -> int:
    """Use and keep the running statistics of every BatchNorm, also after `model.train()`; returns the count.

    The layers normalize with their running mean and variance and stop updating them, as in inference; their
    affine weights still train. In a model made by `quantize_model` the switch is part of `state_dict()`.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, _BATCH_NORMS) and not _is_frozen(module):
            _freeze_bn(module)
            count += 1
    return count


def _freeze_bn(module: nn.Module) -> None:
    module.eval()
    module.register_forward_pre_hook(_keep_eval)


def unfreeze_bn_stats(model: nn.Module) -> int:
    """Undo `freeze_bn_stats`: BatchNorm layers follow `model.train()` / `model.eval()` again."""
    count = 0
    for module in model.modules():
        if _unfreeze_bn(module, model.training):
            count += 1
    return count


def _unfreeze_bn(module: nn.Module, training: bool) -> bool:
    keys = [key for key, hook in module._forward_pre_hooks.items() if hook is _keep_eval]
    for key in keys:
        del module._forward_pre_hooks[key]
    if keys:
        module.train(training)
    return bool(keys)


# --- the switches in state_dict -------------------------------------------------------------------------------
# A switch that is on is saved as a 0-d bool tensor under "<quantizer>_frozen" ("conv1.weight_frozen",
# "conv1_activation_quantizer.activation_frozen") or "<batch norm>.stats_frozen"; one that is off adds no key, so
# the state_dict of a model that was never frozen is unchanged. Only tensors: it loads with weights_only=True.


def _quantizers_by_owner(model: nn.Module) -> list[tuple[str, str, BasePytorchTrainableQuantizer]]:
    """(owning module name, key in state_dict, quantizer) of every trainable quantizer of `model`."""
    return [(name.rpartition(".")[0], f"{name}_frozen", quantizer) for name, quantizer in quantizers_of(model).items()]


def _save_switches(model: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for _, key, quantizer in _quantizers_by_owner(model):
        if quantizer.freeze_quant_params:
            state_dict[prefix + key] = torch.tensor(True)
    for name, module in model.named_modules():
        if isinstance(module, _BATCH_NORMS) and _is_frozen(module):
            state_dict[f"{prefix}{name}.stats_frozen"] = torch.tensor(True)


def _load_switches(model: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    # Runs before any module loads its own entries: the keys are taken out, so strict loading does not see them.
    def holds(owner: str) -> bool:  # whether the state_dict has the entries of module `owner`
        return any(k.startswith(f"{prefix}{owner}.") for k in state_dict)

    for owner, key, quantizer in _quantizers_by_owner(model):
        frozen = state_dict.pop(prefix + key, None)
        if frozen is not None or holds(owner):
            _set_frozen(quantizer, bool(frozen))
    for name, module in model.named_modules():
        if not isinstance(module, _BATCH_NORMS):
            continue
        frozen = state_dict.pop(f"{prefix}{name}.stats_frozen", None)
        if frozen is not None and not _is_frozen(module):
            _freeze_bn(module)
        elif frozen is None and holds(name):
            _unfreeze_bn(module, model.training)


def save_switches_in_state_dict(model: nn.Module) -> None:
    """Make `model.state_dict()` hold the switches of `freeze_quantizers` and `freeze_bn_stats`, and
    `model.load_state_dict` set them (`quantize_model` does this for the models it makes)."""
    model.register_state_dict_post_hook(_save_switches)
    model.register_load_state_dict_pre_hook(_load_switches)


def set_dqa_temperature_schedule(model: nn.Module, schedule: LinearAnnealing | dict) -> int:
    """Give every DQA quantizer of `model` the temperature `schedule` (steps count training-mode forward passes);
    returns how many quantizers there are.

    Example:
        >>> set_dqa_temperature_schedule(qat_model, LinearAnnealing(0, 300, 1.0, 0.0))  # doctest: +SKIP
    """
    return set_temperature_schedules(quantizers_of(model).values(), schedule)
