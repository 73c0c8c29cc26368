"""Conversion of a trained QAT model to an inference model built from mct-quantizers modules."""

from __future__ import annotations

import copy

from mct_quantizers import PytorchActivationQuantizationHolder, PytorchQuantizationWrapper
from torch import nn

from trainable_infra.common.errors import QuantizationConfigError
from trainable_infra.pytorch_backend.wrappers import (
    PytorchTrainableActivationQuantizationHolder,
    PytorchTrainableQuantizationWrapper,
)


def _convert(module: nn.Module) -> nn.Module:
    if isinstance(module, PytorchTrainableQuantizationWrapper):
        inferable = {name: q.convert2inferable() for name, q in module.weights_quantizers.items()}
        return PytorchQuantizationWrapper(_convert(module.module), inferable)
    if isinstance(module, PytorchTrainableActivationQuantizationHolder):
        return PytorchActivationQuantizationHolder(module.activation_holder_quantizer.convert2inferable())
    for name, child in module.named_children():
        converted = _convert(child)
        if converted is not child:
            setattr(module, name, converted)
    return module


def convert_to_inferable(model: nn.Module) -> nn.Module:
    """Return an inference copy of `model` in which every trainable wrapper and holder is replaced.

    Trainable wrappers become mct-quantizers `PytorchQuantizationWrapper`s and holders become
    `PytorchActivationQuantizationHolder`s, each holding the inferable quantizer of the trained one. The copy is
    in eval mode; `model` itself is not changed.
    """
    if not isinstance(model, nn.Module):
        raise QuantizationConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    trainable = (PytorchTrainableQuantizationWrapper, PytorchTrainableActivationQuantizationHolder)
    if not any(isinstance(m, trainable) for m in model.modules()):
        raise QuantizationConfigError(
            f"{type(model).__name__} has no trainable quantization wrapper or holder: quantize it with "
            "quantize_model (or wrap its layers) and train it before converting"
        )
    return _convert(copy.deepcopy(model)).eval()
