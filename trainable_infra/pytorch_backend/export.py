"""ONNX export of a converted model with the mct-quantizers custom quantization ops."""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from mct_quantizers.pytorch.quantizers import BasePyTorchInferableQuantizer
from torch import nn

from trainable_infra.common.errors import QuantizationConfigError


def _inferable_quantizers(model: nn.Module) -> list[BasePyTorchInferableQuantizer]:
    found = []
    for module in model.modules():
        quantizers = list(getattr(module, "weights_quantizers", {}).values())
        quantizers.append(getattr(module, "activation_holder_quantizer", None))
        found.extend(q for q in quantizers if isinstance(q, BasePyTorchInferableQuantizer))
    return found


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_inputs: Any,
    opset_version: int = 15,
    dynamic_batch: bool = True,
) -> str:
    """Export a model made by `convert_to_inferable` to ONNX, quantizers as mct-quantizers custom ops.

    The file runs in onnxruntime with `mct_quantizers.get_ort_session_options()` (onnxruntime-extensions).
    Custom ops are used because torch's own exporter accepts fake quantization only at 8 bits.

    Args:
        model: a converted model (its quantizers are mct-quantizers inferable quantizers).
        path: where to write the `.onnx` file.
        example_inputs: a tensor or a tuple of tensors to trace the model with.
        opset_version: the ONNX opset.
        dynamic_batch: whether the first axis of the inputs and outputs is left free (named "batch").

    Returns:
        The path written.
    """
    if not isinstance(model, nn.Module):
        raise QuantizationConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    quantizers = _inferable_quantizers(model)
    if not quantizers:
        raise QuantizationConfigError(
            "model holds no mct-quantizers inferable quantizer; pass the model returned by convert_to_inferable"
        )
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    if not all(isinstance(t, torch.Tensor) for t in inputs):
        raise QuantizationConfigError(
            f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}"
        )
    input_names = [f"input_{i}" for i in range(len(inputs))]
    dynamic_axes = {name: {0: "batch"} for name in [*input_names, "output"]} if dynamic_batch else None
    previous = [q._use_custom_impl for q in quantizers]
    for q in quantizers:
        q.enable_custom_impl()
    try:
        with warnings.catch_warnings():
            # The custom ops are autograd functions with `symbolic`, which only the TorchScript exporter
            # supports; its deprecation notice and the tracer's notes on constant thresholds are expected.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(
                model, inputs, os.fspath(path), opset_version=opset_version, dynamo=False,
                input_names=input_names, output_names=["output"], dynamic_axes=dynamic_axes,
            )
    finally:
        for q, used in zip(quantizers, previous, strict=True):
            q._use_custom_impl = used
    return os.fspath(path)
