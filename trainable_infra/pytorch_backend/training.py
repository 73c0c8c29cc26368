"""Switches used mid-training: freeze quantizer parameters, freeze BatchNorm statistics."""

from __future__ import annotations

from torch import nn

from trainable_infra.common.enums import VariableGroup
from trainable_infra.common.errors import QuantizationConfigError
from trainable_infra.pytorch_backend.base_quantizer import BasePytorchTrainableQuantizer

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def quantizers_of(model: nn.Module) -> dict[str, BasePytorchTrainableQuantizer]:
    """Every trainable quantizer of `model`, by "<module>.<attribute>" (holders: "<module>.activation")."""
    if not isinstance(model, nn.Module):
        raise QuantizationConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    found = {}
    for name, module in model.named_modules():
        for attribute, quantizer in getattr(module, "weights_quantizers", {}).items():
            if isinstance(quantizer, BasePytorchTrainableQuantizer):
                found[f"{name}.{attribute}"] = quantizer
        quantizer = getattr(module, "activation_holder_quantizer", None)
        if isinstance(quantizer, BasePytorchTrainableQuantizer):
            found[f"{name}.activation"] = quantizer
    return found


def _set_quantizers_frozen(model: nn.Module, frozen: bool) -> int:
    quantizers = quantizers_of(model)
    if not quantizers:
        raise QuantizationConfigError("model has no trainable quantizers; make it with quantize_model first")
    count = 0
    for quantizer in quantizers.values():
        quantizer.freeze_quant_params = frozen
        learnable = getattr(quantizer, "learnable_params", True)
        for entry in quantizer.quantizer_parameters.values():
            if entry.group is VariableGroup.QPARAMS:
                entry.variable.requires_grad_(learnable and not frozen)
                count += 1
    return count


def freeze_quantizers(model: nn.Module) -> int:
    """Stop training the quantization parameters (thresholds, ranges); returns how many were frozen."""
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
    affine weights still train.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, _BATCH_NORMS) and not _is_frozen(module):
            module.eval()
            module.register_forward_pre_hook(_keep_eval)
            count += 1
    return count


def unfreeze_bn_stats(model: nn.Module) -> int:
    """Undo `freeze_bn_stats`: BatchNorm layers follow `model.train()` / `model.eval()` again."""
    count = 0
    for module in model.modules():
        keys = [key for key, hook in module._forward_pre_hooks.items() if hook is _keep_eval]
        for key in keys:
            del module._forward_pre_hooks[key]
        if keys:
            module.train(model.training)
            count += 1
    return count
