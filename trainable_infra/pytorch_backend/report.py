"""The per-layer quantization report of a PyTorch QAT model."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from trainable_infra.common.errors import QuantizationConfigError
from trainable_infra.common.report import format_report, report_row, sqnr_db
from trainable_infra.pytorch_backend.calibrate import holders_of, model_inputs
from trainable_infra.pytorch_backend.integer import float_arithmetic
from trainable_infra.pytorch_backend.training import quantizers_of
from trainable_infra.pytorch_backend.wrappers import PytorchTrainableQuantizationWrapper


def _params(quantizer: Any) -> dict[str, np.ndarray]:
    variables = {name: quantizer.get_quantizer_variable(name) for name in quantizer.quantizer_parameters}
    return {name: variable.detach().cpu().numpy() for name, variable in variables.items()}


def _describe(quantizer: Any) -> tuple[int, Any, Any]:
    config = quantizer.quantization_config
    if quantizer.weights_quantization() or hasattr(config, "weights_n_bits"):
        return config.weights_n_bits, config.weights_quantization_method, quantizer.identifier
    return config.activation_n_bits, config.activation_quantization_method, quantizer.identifier


@torch.no_grad()
def quantization_report(
    model: nn.Module, data: Iterable[Any] | None = None, num_batches: int = 1, *, print_table: bool = True
) -> list[dict]:
    """Rows (layer, kind, bits, method, training, parameters, sqnr_db) for every quantizer of a QAT model.

    Weight SQNR compares each weight with its fake-quantized value; activation SQNR compares what reaches each
    holder with what leaves it, over `num_batches` batches of `data` (None when no data is given). The table is
    printed unless `print_table` is False.
    """
    if not quantizers_of(model):
        raise QuantizationConfigError("model has no trainable quantizers; make it with quantize_model first")
    rows = []
    for name, module in model.named_modules():
        if isinstance(module, PytorchTrainableQuantizationWrapper):
            for attribute, quantizer in module.weights_quantizers.items():
                weight = getattr(module.module, attribute)
                quantized = quantizer(weight, False)
                bits, method, training = _describe(quantizer)
                rows.append(report_row(f"{name}.{attribute}", "weights", bits, method, training, _params(quantizer),
                                       sqnr_db(weight.cpu().numpy(), quantized.cpu().numpy())))
    holders = holders_of(model)
    signal = dict.fromkeys(holders, 0.0)
    noise = dict.fromkeys(holders, 0.0)
    if data is not None and holders:
        handles = [
            holder.register_forward_hook(lambda m, args, out, name=name: _accumulate(signal, noise, name, args[0], out))
            for name, holder in holders.items()
        ]
        was_training = model.training
        model.eval()
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        try:
            # Float arithmetic: each holder then sees the unquantized activation whose quantization noise it measures.
            with float_arithmetic(model):
                for index, batch in enumerate(data):
                    if index >= num_batches:
                        break
                    model(*(t.to(device) for t in model_inputs(batch)))
        finally:
            for handle in handles:
                handle.remove()
            model.train(was_training)
    for name, holder in holders.items():
        quantizer = holder.activation_holder_quantizer
        bits, method, training = _describe(quantizer)
        sqnr = None
        if data is not None:
            sqnr = float("inf") if noise[name] == 0 else 10 * np.log10(max(signal[name], 1e-300) / noise[name])
        rows.append(report_row(name, "activation", bits, method, training, _params(quantizer), sqnr))
    if print_table:
        print(format_report(rows))
    return rows


def _accumulate(signal: dict, noise: dict, name: str, inputs: torch.Tensor, outputs: torch.Tensor) -> None:
    reference = inputs.double()
    signal[name] += float((reference**2).sum())
    noise[name] += float(((reference - outputs.double()) ** 2).sum())
