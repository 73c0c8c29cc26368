"""The per-layer quantization report of a PyTorch QAT model."""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - torch's own convention
from mct_quantizers import PytorchActivationQuantizationHolder, PytorchQuantizationWrapper
from torch import fx, nn
from torch.overrides import TorchFunctionMode

from trainable_infra.common.errors import QuantizationConfigError
from trainable_infra.common.report import Coverage, MacRow, format_report, report_row, sqnr_db
from trainable_infra.pytorch_backend.base_quantizer import BasePytorchTrainableQuantizer
from trainable_infra.pytorch_backend.calibrate import check_data, check_model, holders_of, model_inputs
from trainable_infra.pytorch_backend.integer import float_arithmetic
from trainable_infra.pytorch_backend.quantize import (
    _FUNCTIONAL_LAYERS,
    _PRODUCT_FUNCTIONS,
    _functional_weight_owner,
    _grid_source,
)
from trainable_infra.pytorch_backend.training import quantizers_of
from trainable_infra.pytorch_backend.wrappers import (
    PytorchTrainableActivationQuantizationHolder,
    PytorchTrainableQuantizationWrapper,
)


def _params(quantizer: Any) -> dict[str, np.ndarray]:
    variables = {name: quantizer.get_quantizer_variable(name) for name in quantizer.registered_variables()}
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
                quantized = quantizer.quantize_inputs(weight, False)
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
        if data is not None:
            print(quantization_coverage(model, data).format())
    return rows


def _accumulate(signal: dict, noise: dict, name: str, inputs: torch.Tensor, outputs: torch.Tensor) -> None:
    reference = inputs.double()
    signal[name] += float((reference**2).sum())
    noise[name] += float(((reference - outputs.double()) ** 2).sum())


# --- coverage ---------------------------------------------------------------------------------------------------

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED_CONVS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_CONV_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d}
_TRANSPOSED_CONV_FUNCTIONS = {F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}
_MATMUL_FUNCTIONS = {torch.matmul, operator.matmul, torch.bmm, torch.Tensor.matmul, torch.Tensor.bmm,
                     torch.Tensor.__matmul__}


def _layer_macs(layer: nn.Module, inputs: torch.Tensor, output: torch.Tensor) -> int | None:
    """Multiply-accumulates of one call of a convolution or linear layer (None for other modules)."""
    if isinstance(layer, nn.Linear):
        return output.numel() * layer.in_features
    if isinstance(layer, _CONVS):
        return output.numel() * layer.in_channels // layer.groups * math.prod(layer.kernel_size)
    if isinstance(layer, _TRANSPOSED_CONVS):
        return inputs.numel() * layer.out_channels // layer.groups * math.prod(layer.kernel_size)
    return None


def _einsum_macs(equation: str, operands: list[torch.Tensor]) -> int:
    """Multiply-accumulates of a two-operand einsum: the product of the sizes of all its indices."""
    sizes: dict[str, int] = {}
    for subscripts, operand in zip(equation.replace(" ", "").split("->")[0].split(","), operands, strict=False):
        if "..." in subscripts:
            return math.prod(operands[0].shape) * math.prod(operands[1].shape[-1:])
        sizes.update(zip(subscripts, operand.shape, strict=False))
    return math.prod(sizes.values())


def _multi_head_attention_macs(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias_kv: bool, zero_attention: bool
) -> int:
    """Multiply-accumulates of `F.multi_head_attention_forward` on (L, [N,] E) inputs: projections and products."""
    embed = query.shape[-1]
    queries = query.numel() // embed
    keys = key.numel() // key.shape[-1]
    sources = key.shape[0] + int(bias_kv) + int(zero_attention)
    projections = queries * embed * embed * 2 + keys * embed * (key.shape[-1] + value.shape[-1])
    return projections + 2 * queries * sources * embed


def _function_macs(function: Any, args: tuple, kwargs: dict, output: Any) -> list[tuple[int, list[int]]]:
    """[(MACs, positions of the operands)] of a call of a multiply-accumulate function; [] for other functions."""
    if function is F.linear:
        return [(output.numel() * args[1].shape[-1], [0, 1])]
    if function in _CONV_FUNCTIONS:
        return [(output.numel() * math.prod(args[1].shape[1:]), [0, 1])]
    if function in _TRANSPOSED_CONV_FUNCTIONS:
        return [(args[0].numel() * math.prod(args[1].shape[1:]), [0, 1])]
    if function in _MATMUL_FUNCTIONS:
        return [(output.numel() * args[0].shape[-1], [0, 1])]
    if function in (torch.baddbmm, torch.Tensor.baddbmm):
        return [(output.numel() * args[1].shape[-1], [1, 2])]
    if function is torch.einsum:
        operands = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
        if len(operands) == 2:
            return [(_einsum_macs(args[0], operands), [1, 2])]
    if function is F.multi_head_attention_forward:
        return [(_multi_head_attention_macs(*args[:3], args[7] is not None, args[9]), [])]
    if function is F.scaled_dot_product_attention:
        q, k, v = args[:3]
        queries = output.numel() // v.shape[-1]
        # q @ k^T on the quantized inputs; the probabilities of attn @ v are formed inside, in float
        return [(queries * k.shape[-2] * q.shape[-1], [0, 1]), (queries * k.shape[-2] * v.shape[-1], [])]
    return []


class _FloatCounter(TorchFunctionMode):
    """Counts, as float operations, the multiply-accumulates of functions run inside an opaque node or module."""

    def __init__(self, rows: list[MacRow], name: str):
        super().__init__()
        self.rows, self.name = rows, name

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        output = func(*args, **kwargs)
        for macs, positions in _function_macs(func, args, kwargs, output):
            weights = [isinstance(args[i], nn.Parameter) for i in positions if i < len(args)]
            self.rows.append(MacRow(self.name, getattr(func, "__name__", str(func)), int(macs),
                                    False if any(weights) else None, False))
        return output


_WRAPPERS = (PytorchTrainableQuantizationWrapper, PytorchQuantizationWrapper)
_HOLDERS = (PytorchTrainableActivationQuantizationHolder, PytorchActivationQuantizationHolder)
# Graph nodes whose multiply-accumulates the interpreter counts itself (any other node runs under _FloatCounter).
_MAC_MODULES = (*_WRAPPERS, *_HOLDERS, *_CONVS, *_TRANSPOSED_CONVS, nn.Linear)
_MAC_FUNCTIONS = {*_FUNCTIONAL_LAYERS, *_PRODUCT_FUNCTIONS, torch.einsum}


def _inner(wrapper: nn.Module) -> nn.Module:
    return wrapper.module if isinstance(wrapper, PytorchTrainableQuantizationWrapper) else wrapper.layer


class _CoverageInterpreter(fx.Interpreter):
    """Runs a quantized graph once, recording a `MacRow` for each multiply-accumulate node."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.modules = dict(gm.named_modules())
        self.rows: list[MacRow] = []

    def _quantized(self, operand: Any) -> bool:
        source = _grid_source(operand, self.modules)
        return isinstance(source, fx.Node) and source.op == "call_module" and isinstance(
            self.modules.get(source.target), _HOLDERS)

    def run_node(self, node: fx.Node) -> Any:
        module = self.modules.get(node.target) if node.op == "call_module" else None
        opaque = (node.op == "call_module" and not isinstance(module, _MAC_MODULES)) or (
            node.op == "call_function" and node.target not in _MAC_FUNCTIONS)
        if opaque:
            with _FloatCounter(self.rows, node.target if node.op == "call_module" else node.name):
                return super().run_node(node)
        output = super().run_node(node)
        args, kwargs = self.fetch_args_kwargs_from_env(node)
        if isinstance(module, (*_WRAPPERS, *_CONVS, *_TRANSPOSED_CONVS, nn.Linear)):
            layer = _inner(module) if isinstance(module, _WRAPPERS) else module
            macs = _layer_macs(layer, args[0], output)
            if macs is not None:
                self.rows.append(MacRow(node.target, type(layer).__name__, int(macs), isinstance(module, _WRAPPERS),
                                        self._quantized(node.args[0])))
        elif node.op in ("call_function", "call_method"):
            function = node.target if node.op == "call_function" else getattr(torch.Tensor, node.target, None)
            for macs, positions in _function_macs(function, tuple(args), kwargs, output):
                operands = [node.args[i] for i in positions if i < len(node.args)]
                if function in _FUNCTIONAL_LAYERS or function in _CONV_FUNCTIONS:
                    weights: bool | None = _functional_weight_owner(operands[1], self.modules) is not None
                    operands = operands[:1]
                else:
                    parameters = [o for o in operands if isinstance(o, fx.Node) and o.op == "get_attr"]
                    weights = False if parameters else None
                    operands = [o for o in operands if o not in parameters]
                inputs = bool(positions) and all(self._quantized(o) for o in operands)
                self.rows.append(MacRow(node.name, getattr(function, "__name__", str(function)), int(macs), weights,
                                        inputs))
        return output


def _float_layers(model: nn.Module) -> tuple[str, ...]:
    """Names of the modules (and the model's own parameters) that hold weights outside any weights wrapper."""
    names, inside = [], set()
    for name, module in model.named_modules():
        if any(name.startswith(f"{prefix}.") for prefix in inside):
            continue
        if isinstance(module, (*_WRAPPERS, *_HOLDERS, BasePytorchTrainableQuantizer)):
            inside.add(name)
            continue
        own = [n for n, p in module.named_parameters(recurse=False) if p is not None]
        if own and name:
            names.append(name)
        elif own:
            names.extend(own)
    return tuple(names)


@torch.no_grad()
def quantization_coverage(model: nn.Module, data: Any) -> Coverage:
    """How much of `model`'s arithmetic runs on quantized operands, measured on the first batch of `data`.

    `data` is a tensor, a tuple of input tensors, or an iterable of batches as `calibrate` takes them. The model is
    run once in eval mode (its mode is restored). A model that is not a `torch.fx.GraphModule` (quantized module by
    module) is measured by its layers alone.
    """
    check_model(model)
    batch = data if isinstance(data, (torch.Tensor, tuple)) else next(iter(check_data("data", data)), None)
    if batch is None:
        raise QuantizationConfigError(f"data must hold at least one batch, got {data!r}")
    inputs = batch if isinstance(batch, tuple) and all(isinstance(t, torch.Tensor) for t in batch) else \
        model_inputs(batch)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    inputs = tuple(t.to(device) for t in inputs)
    was_training = model.training
    model.eval()
    try:
        if isinstance(model, fx.GraphModule):
            interpreter = _CoverageInterpreter(model)
            interpreter.run(*inputs)
            rows = interpreter.rows
        else:
            rows = _module_rows(model, inputs)
    finally:
        model.train(was_training)
    return Coverage(tuple(rows), _float_layers(model))


def _module_rows(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[MacRow]:
    """Rows of a model without a graph: its convolution and linear layers, from forward hooks."""
    rows: list[MacRow] = []
    quantized: set[int] = set()
    handles, wrappers = [], []
    for name, module in model.named_modules():
        if any(name.startswith(f"{wrapper}.") for wrapper in wrappers):
            continue
        if isinstance(module, _HOLDERS):
            handles.append(module.register_forward_hook(lambda m, a, out: quantized.add(id(out))))
        elif isinstance(module, (*_WRAPPERS, *_CONVS, *_TRANSPOSED_CONVS, nn.Linear)):
            if isinstance(module, _WRAPPERS):
                wrappers.append(name)

            def hook(m: nn.Module, args: tuple, out: torch.Tensor, name: str = name) -> None:
                layer = _inner(m) if isinstance(m, _WRAPPERS) else m
                macs = _layer_macs(layer, args[0], out)
                if macs is not None:
                    rows.append(MacRow(name, type(layer).__name__, int(macs), isinstance(m, _WRAPPERS),
                                       id(args[0]) in quantized))
            handles.append(module.register_forward_hook(hook))
    try:
        model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return rows
