"""Conversion of a trained QAT model to an inference model built from mct-quantizers modules."""

from __future__ import annotations

import copy

import torch
from mct_quantizers import PytorchActivationQuantizationHolder, PytorchQuantizationWrapper
from mct_quantizers.pytorch.quantizers import BasePyTorchInferableQuantizer
from torch import nn

from trainable_infra.common.errors import QuantizationConfigError, QuantizerDefinitionError
from trainable_infra.pytorch_backend.base_quantizer import BasePytorchTrainableQuantizer
from trainable_infra.pytorch_backend.calibrate import check_model
from trainable_infra.pytorch_backend.integer import (
    IntegerGlobalAveragePool,
    IntegerMerge,
    IntegerQuantizationWrapper,
    holder_grid,
    integer_bias,
)
from trainable_infra.pytorch_backend.wrappers import (
    PytorchTrainableActivationQuantizationHolder,
    PytorchTrainableQuantizationWrapper,
)


def inferable_of(quantizer: BasePytorchTrainableQuantizer) -> BasePyTorchInferableQuantizer:
    """`quantizer.convert2inferable()`, checked to be an mct-quantizers PyTorch inferable quantizer."""
    inferable = quantizer.convert2inferable()
    if not isinstance(inferable, BasePyTorchInferableQuantizer):
        raise QuantizerDefinitionError(
            f"{type(quantizer).__name__}.convert2inferable() must return an mct-quantizers PyTorch inferable "
            f"quantizer (a BasePyTorchInferableQuantizer), got {inferable!r} of type {type(inferable).__name__}"
        )
    return inferable


def _inferable(quantizer: BasePytorchTrainableQuantizer, where: str) -> BasePyTorchInferableQuantizer:
    try:
        return inferable_of(quantizer)
    except Exception as exc:
        # The error keeps its type and message; the note says which quantizer failed.
        exc.add_note(f"raised while converting {where} ({type(quantizer).__name__}); the input model is unchanged")
        raise


def _convert(module: nn.Module, path: str = "") -> nn.Module:
    if isinstance(module, PytorchTrainableQuantizationWrapper):
        inferable = {
            name: _inferable(q, f"the {name!r} quantizer of {path!r}") for name, q in module.weights_quantizers.items()
        }
        layer = _convert(module.module, f"{path}.module")
        holder = module.input_holder
        if holder is None:
            return PytorchQuantizationWrapper(layer, inferable)
        x_step, w_step, scale = module._integer_grid()
        b_int = None
        if layer.bias is not None:
            # The layer keeps the bias it trained with: b_int·s, as the runtime's DequantizeLinear gives it.
            b_int = integer_bias(layer.bias, scale)
            with torch.no_grad():
                layer.bias.copy_((b_int.float() * scale).to(layer.bias.dtype))
        input_quantizer = _inferable(holder.activation_holder_quantizer, f"the input holder of {path!r}")
        converted = IntegerQuantizationWrapper(layer, inferable, input_quantizer, x_step, w_step, b_int,
                                               module._acc_dtype)
        if module.output_holder is not None:
            converted.output_grid = torch.stack(holder_grid(module.output_holder))
            converted.output_clip = module._output_clip
        return converted
    if isinstance(module, IntegerGlobalAveragePool):
        if module.grid is None and module._holders is not None:
            module.freeze()
        return module
    if isinstance(module, IntegerMerge):
        if module.grids is None and module._holders is not None:
            module.freeze()
        return module
    if isinstance(module, PytorchTrainableActivationQuantizationHolder):
        return PytorchActivationQuantizationHolder(
            _inferable(module.activation_holder_quantizer, f"the activation holder {path!r}")
        )
    for name, child in module.named_children():
        converted = _convert(child, f"{path}.{name}" if path else name)
        if converted is not child:
            setattr(module, name, converted)
    return module


def convert_to_inferable(model: nn.Module) -> nn.Module:
    """Return an inference copy of `model` in which every trainable wrapper and holder is replaced.

    Trainable wrappers become mct-quantizers `PytorchQuantizationWrapper`s and holders become
    `PytorchActivationQuantizationHolder`s, each holding the inferable quantizer of the trained one. The copy is
    in eval mode; `model` itself is not changed.
    """
    check_model(model)
    trainable = (PytorchTrainableQuantizationWrapper, PytorchTrainableActivationQuantizationHolder)
    if not any(isinstance(m, trainable) for m in model.modules()):
        raise QuantizationConfigError(
            f"{type(model).__name__} has no trainable quantization wrapper or holder: quantize it with "
            "quantize_model (or wrap its layers) and train it before converting"
        )
    return _convert(copy.deepcopy(model)).eval()
