"""`quantize_model`: a QAT-ready copy of a float PyTorch model.

Weights of convolutions, transposed convolutions and linear layers are wrapped (also where forward reads them
directly, `F.linear(x, self.qkv.weight)`); `nn.MultiheadAttention` becomes its four linear layers and two
products (`attention.py`). Activation holders go on the model inputs, after each quantized layer's activation
(through BatchNorm), after additions and concatenations, and on both inputs of products of activations
(`QATConfig.quantize_matmul_inputs`). The graph comes from `torch.fx`, traced so that it follows the train / eval
mode (`tracing.py`); a model that does not trace is wrapped module by module.

A holder's signedness follows the architecture, not the data (unsigned after ReLU, ReLU6 and sigmoid, signed
elsewhere), so a model rebuilt by `quantize_model` from the same float model and config always takes the
`state_dict` of a trained one; representative data sets the thresholds and ranges.
"""

from __future__ import annotations

import copy
import operator
import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - torch's own convention
from torch import fx, nn

from trainable_infra.common.calibration import default_activation_params, weight_quant_params
from trainable_infra.common.config import (
    TrainableQuantizerActivationConfig,
    TrainableQuantizerWeightsConfig,
    check_bool,
)
from trainable_infra.common.errors import QuantizationConfigError
from trainable_infra.common.integer import fold_batch_norm
from trainable_infra.common.mct import QuantizationTarget
from trainable_infra.common.model_plan import (
    check_overrides,
    check_qat_arguments,
    holder_name,
    naming_layer,
    warn_no_representative_data,
)
from trainable_infra.common.qat_config import LayerSettings, QATConfig
from trainable_infra.common.resolver import get_trainable_quantizer_class
from trainable_infra.pytorch_backend.attention import (
    QuantizableMultiheadAttention,
    attention_dropout,
    batch_first,
    decompose_attention,
    decompose_sdpa,
)
from trainable_infra.pytorch_backend.base_quantizer import BasePytorchTrainableQuantizer
from trainable_infra.pytorch_backend.calibrate import calibrate, check_data, check_model
from trainable_infra.pytorch_backend.integer import IntegerGlobalAveragePool, IntegerMerge, is_global_average_pool
from trainable_infra.pytorch_backend.traceable import traceable_forwards, window_merge, window_partition
from trainable_infra.pytorch_backend.tracing import UntraceableError, trace_model
from trainable_infra.pytorch_backend.training import save_switches_in_state_dict
from trainable_infra.pytorch_backend.wrappers import (
    PytorchTrainableActivationQuantizationHolder,
    PytorchTrainableQuantizationWrapper,
)

QUANTIZABLE_LAYERS: dict[str, type[nn.Module]] = {
    cls.__name__: cls
    for cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
}
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Activations whose output is never negative: the holder after them is unsigned.
_NON_NEGATIVE_MODULES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid)
_NON_NEGATIVE_FUNCTIONS = {F.relu, torch.relu, F.relu6, torch.sigmoid, F.sigmoid, F.hardsigmoid}
_NON_NEGATIVE_METHODS = {"relu", "relu_", "sigmoid"}
_ACTIVATION_MODULES = (
    *_NON_NEGATIVE_MODULES, nn.LeakyReLU, nn.Hardtanh, nn.SiLU, nn.GELU, nn.Tanh, nn.Hardswish, nn.ELU, nn.Mish,
    nn.PReLU,
)
_ACTIVATION_FUNCTIONS = {
    *_NON_NEGATIVE_FUNCTIONS, F.leaky_relu, F.gelu, F.silu, torch.tanh, F.tanh, F.hardswish, F.hardtanh, F.elu,
}
_ACTIVATION_METHODS = {*_NON_NEGATIVE_METHODS, "tanh"}
# Operations whose output holds values of their input: a quantized input stays on its grid (dropout in eval mode,
# where the integer computation applies; in training the layer after it computes in float anyway).
_VALUE_PRESERVING_MODULES = (
    nn.Flatten, nn.Unflatten, nn.Identity, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.PixelShuffle,
    nn.PixelUnshuffle, nn.ChannelShuffle, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
)
_VALUE_PRESERVING_METHODS = {
    "view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze", "unsqueeze", "unflatten",
    "chunk", "split", "narrow",
}
_VALUE_PRESERVING_FUNCTIONS = {
    torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.permute, torch.transpose, F.max_pool1d,
    F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    torch.channel_shuffle, F.pixel_shuffle, F.pixel_unshuffle, torch.chunk, torch.split, torch.narrow,
    operator.getitem, F.dropout, batch_first, window_partition, window_merge, attention_dropout,
}
_AVERAGING_MODULES = (
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
)
_AVERAGING_FUNCTIONS = {
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    torch.mean,
}
# Outputs that are probabilities: never negative (the holder of an attention product's input is unsigned).
_PROBABILITY_FUNCTIONS = {torch.softmax, F.softmax}
# Products of two activations: {function or method: the argument positions of its two (or three) operands}.
_PRODUCT_FUNCTIONS = {
    torch.matmul: (0, 1), operator.matmul: (0, 1), torch.bmm: (0, 1), torch.baddbmm: (1, 2),
    F.scaled_dot_product_attention: (0, 1, 2),
}
_PRODUCT_METHODS = {"matmul": (0, 1), "bmm": (0, 1), "baddbmm": (1, 2)}
# Layers called functionally with a weight: F.linear(x, self.qkv.weight, self.qkv.bias).
_FUNCTIONAL_LAYERS = {F.linear, F.conv1d, F.conv2d, F.conv3d}
# Functional ops whose outputs are quantized (they are where residual branches and concatenations meet).
_MERGE_FUNCTIONS = {operator.add, operator.iadd, torch.add, torch.cat, torch.concat}
_MERGE_METHODS = {"add", "add_"}


def _check_arguments(
    model: Any, qat_config: Any, representative_data: Any, num_calibration_batches: Any, progress: Any
) -> QATConfig:
    check_model(model)
    if representative_data is not None:
        check_data("representative_data", representative_data)
    check_bool("progress", progress)
    return check_qat_arguments(qat_config, num_calibration_batches, QUANTIZABLE_LAYERS, "PyTorch")


def _layer_types(config: QATConfig) -> tuple[type[nn.Module], ...]:
    names = config.layer_types if config.layer_types is not None else tuple(QUANTIZABLE_LAYERS)
    return tuple(QUANTIZABLE_LAYERS[name] for name in names)


def weight_channel_axis(module: nn.Module) -> int:
    """The output-channel axis of a layer's weight (1 for transposed convolutions, else 0)."""
    return 1 if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)) else 0


def make_wrapper(module: nn.Module, settings: LayerSettings, config: QATConfig) -> PytorchTrainableQuantizationWrapper:
    """Wrap `module`'s weight with the quantizer `settings` ask for, initialised from the weight."""
    method = settings.weight_quantization_method
    axis = weight_channel_axis(module) if settings.weight_per_channel else None
    params = weight_quant_params(
        module.weight.detach().cpu().numpy(), method, settings.weight_n_bits, axis, config.weight_init,
        config.min_threshold,
    )
    quantizer_config = TrainableQuantizerWeightsConfig(
        method, settings.weight_n_bits, params, True, axis, settings.weight_per_channel, config.min_threshold
    )
    cls = get_trainable_quantizer_class(
        QuantizationTarget.Weights, settings.weight_training_method, method, BasePytorchTrainableQuantizer
    )
    return PytorchTrainableQuantizationWrapper(module, {"weight": cls(quantizer_config)})


def make_holder(
    settings: LayerSettings, config: QATConfig, params: dict
) -> PytorchTrainableActivationQuantizationHolder:
    """An activation holder with the quantizer `settings` ask for and the given parameters."""
    method = settings.activation_quantization_method
    quantizer_config = TrainableQuantizerActivationConfig(
        method, settings.activation_n_bits, params, True, config.min_threshold
    )
    cls = get_trainable_quantizer_class(
        QuantizationTarget.Activation, settings.activation_training_method, method, BasePytorchTrainableQuantizer
    )
    return PytorchTrainableActivationQuantizationHolder(cls(quantizer_config))


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


# --- torch.fx path ------------------------------------------------------------------------------------------


def _is_batch_norm(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return node.op == "call_module" and isinstance(modules.get(node.target), _BATCH_NORMS)


def _is_activation(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), _ACTIVATION_MODULES)
    if node.op == "call_function":
        return node.target in _ACTIVATION_FUNCTIONS
    return node.op == "call_method" and node.target in _ACTIVATION_METHODS


def _is_non_negative(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), (*_NON_NEGATIVE_MODULES, nn.Softmax))
    if node.op == "call_function":
        return node.target in _NON_NEGATIVE_FUNCTIONS or node.target in _PROBABILITY_FUNCTIONS
    return node.op == "call_method" and node.target in (*_NON_NEGATIVE_METHODS, "softmax")


def _is_merge(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _MERGE_FUNCTIONS) or (
        node.op == "call_method" and node.target in _MERGE_METHODS
    )


def _merges_non_negative(
    node: fx.Node, modules: dict[str, nn.Module], holders: dict[str, tuple[LayerSettings, bool]]
) -> bool:
    """Whether `node` adds or concatenates only outputs of unsigned holders (so its own output is never negative).

    Its holder is then unsigned too: a signed one would spend a bit on negatives, and its step would be twice the
    step of an input with the same threshold, which puts half of that input's values on rounding ties.
    """
    if not _is_merge(node):
        return False
    inputs = node.args[0] if node.target in (torch.cat, torch.concat) else node.args[:2]
    if not isinstance(inputs, (list, tuple)) or not inputs:
        return False
    return all(
        isinstance(i, fx.Node) and i.op == "call_module" and i.target in holders and not holders[i.target][1]
        for i in inputs
    )


def _chain_end(node: fx.Node, modules: dict[str, nn.Module], through_batch_norm: bool) -> fx.Node:
    """The last node of `node` -> [BatchNorm] -> [activation] where each step is the only user of the last."""
    current = node
    while len(current.users) == 1:
        user = next(iter(current.users))
        if (through_batch_norm and _is_batch_norm(user, modules)) or _is_activation(user, modules):
            current = user
            through_batch_norm = False  # BatchNorm only right after the layer
            if _is_activation(user, modules):
                break
        else:
            break
    return current


def _foldable(
    node: fx.Node, modules: dict[str, nn.Module], layer_types: tuple[type[nn.Module], ...], calls: dict[str, int]
) -> bool:
    """Whether `node` is a BatchNorm with running statistics whose input is a layer it is the only consumer of.

    `calls` counts the graph's calls of each module: a layer or BatchNorm called twice is not folded.
    """
    if not _is_batch_norm(node, modules) or len(node.args) != 1 or node.kwargs or calls[node.target] != 1:
        return False
    bn, source = modules[node.target], node.args[0]
    if not isinstance(source, fx.Node) or source.op != "call_module" or len(source.users) != 1:
        return False
    if calls[source.target] != 1:
        return False
    layer = modules.get(source.target)
    if not isinstance(layer, layer_types) or bn.running_mean is None or bn.running_var is None:
        return False
    axis = weight_channel_axis(layer)
    groups = getattr(layer, "groups", 1)
    # A transposed convolution with groups keeps out_channels / groups on its channel axis: not one per output.
    return layer.weight.shape[axis] == bn.num_features and (axis == 0 or groups == 1)


def _fold_batch_norms(gm: fx.GraphModule, config: QATConfig) -> list[str]:
    """Fold, in place, each BatchNorm that follows a quantizable layer into that layer; returns the folded names.

    The layer becomes a copy with the folded weight and bias (a bias is added where it had none), the BatchNorm
    node is removed from the graph. Layers skipped by the config are left alone.
    """
    modules = dict(gm.named_modules())
    layer_types = _layer_types(config)
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    folded = []
    for node in list(gm.graph.nodes):
        if not _foldable(node, modules, layer_types, calls):
            continue
        source = node.args[0]
        if config.for_layer(source.target).skip:
            continue
        layer, bn = modules[source.target], modules[node.target]
        to_numpy = lambda t: None if t is None else t.detach().double().cpu().numpy()  # noqa: E731
        weight, bias = fold_batch_norm(
            to_numpy(layer.weight), to_numpy(layer.bias), to_numpy(bn.running_mean), to_numpy(bn.running_var),
            bn.eps, to_numpy(bn.weight), to_numpy(bn.bias), weight_channel_axis(layer),
        )
        new = copy.deepcopy(layer)
        like = layer.weight
        # A frozen layer stays frozen (its bias follows its weight when it had none).
        bias_trainable = like.requires_grad if layer.bias is None else layer.bias.requires_grad
        new.weight = nn.Parameter(torch.from_numpy(weight).to(device=like.device, dtype=like.dtype),
                                  requires_grad=like.requires_grad)
        new.bias = nn.Parameter(torch.from_numpy(bias).to(device=like.device, dtype=like.dtype),
                                requires_grad=bias_trainable)
        _set_submodule(gm, source.target, new)
        modules[source.target] = new
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
        folded.append(node.target)
    for name in folded:
        gm.delete_submodule(name)
    return folded


def _grid_source(node: Any, modules: dict[str, nn.Module], through_averages: bool = False) -> Any:
    """The node whose values `node` passes on unchanged (reshaped, permuted or max-pooled), walking back.

    With `through_averages`, averaging pools are walked through too (their output keeps the input's sign).
    """
    while isinstance(node, fx.Node) and node.args and isinstance(node.args[0], fx.Node):
        if node.op == "call_module":
            kinds = (*_VALUE_PRESERVING_MODULES, *(_AVERAGING_MODULES if through_averages else ()))
            if not isinstance(modules.get(node.target), kinds):
                break
        elif node.op == "call_method":
            if node.target not in _VALUE_PRESERVING_METHODS | ({"mean"} if through_averages else set()):
                break
        elif node.op != "call_function" or node.target not in (
            _VALUE_PRESERVING_FUNCTIONS | (_AVERAGING_FUNCTIONS if through_averages else set())
        ):
            break
        node = node.args[0]
    return node


def _output_holder(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[nn.Module | None, float | None]:
    """(holder, clip) for the holder whose requantization an integer kernel carries out for the layer at `node`:
    the layer's only user, or the only user of a ReLU / ReLU6 that is the layer's only user when the holder's grid
    starts at 0 (onnxruntime then folds the activation into the kernel's clipping). `clip` is 6.0 after a ReLU6:
    onnxruntime folds it only while the quantizer's uint8 range lies within [0, 6]."""
    if len(node.users) != 1:
        return None, None
    (user,) = node.users
    clip = 6.0 if _is_relu6(user, modules) else None
    through = clip is not None or _is_relu(user, modules)
    if through:
        if len(user.users) != 1:
            return None, None
        (user,) = user.users
    holder = modules.get(user.target) if user.op == "call_module" else None
    if not isinstance(holder, PytorchTrainableActivationQuantizationHolder):
        return None, None
    if through:
        quantizer = holder.activation_holder_quantizer
        if not hasattr(quantizer, "grid") or quantizer.q_min != 0 or bool(quantizer.grid()[1].ne(0).any()):
            return None, None
    return holder, clip


def _is_relu6(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return type(modules.get(node.target)) is nn.ReLU6
    return node.op == "call_function" and node.target is F.relu6 and not node.kwargs.get("inplace", False)


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return type(modules.get(node.target)) is nn.ReLU
    if node.op == "call_function":
        return node.target in (F.relu, torch.relu)
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _module_calls(gm: fx.GraphModule) -> dict[str, int]:
    """How many times the graph calls each module (a shared module is called more than once)."""
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    return calls


def _insert_holder(
    gm: fx.GraphModule, source: fx.Node, operand: Any, base: str, name: str, settings: LayerSettings,
    config: QATConfig, modules: dict[str, nn.Module], holders: dict[str, tuple[LayerSettings, bool]],
) -> PytorchTrainableActivationQuantizationHolder:
    """Put a holder `name` right after `source`, for every user of it; unsigned when what reaches `operand` (through
    reshapes, max and average pools) is never negative. Returns the holder."""
    origin = _grid_source(operand, modules, through_averages=True)
    signed = not (
        isinstance(origin, fx.Node)
        and (_is_non_negative(origin, modules) or not holders.get(origin.target, (None, True))[1])
    )
    with naming_layer(base):
        holder = make_holder(settings, config, default_activation_params(
            settings.activation_quantization_method, signed))
    gm.add_submodule(name, holder)
    modules[name] = holder
    with gm.graph.inserting_after(source):
        new = gm.graph.call_module(name, (source,))
    source.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    holders[name] = (settings, signed)
    return holder


def _quantize_layer_inputs(
    gm: fx.GraphModule, config: QATConfig, holders: dict[str, tuple[LayerSettings, bool]], taken: set[str]
) -> None:
    """Give every wrapped layer a quantized input and tell it which holder quantizes it (integer bias, exact
    accumulator): where a layer's input is not a holder's output (through reshapes and max pools), e.g. after an
    average pooling, a holder named after the layer goes right after the operation that left the grid (so that
    an integer runtime can run that operation on integers too, e.g. onnxruntime's QLinearGlobalAveragePool)."""
    modules = dict(gm.named_modules())
    calls = _module_calls(gm)
    for node in list(gm.graph.nodes):
        wrapper = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(wrapper, PytorchTrainableQuantizationWrapper) or len(node.args) != 1 or node.kwargs:
            continue
        source = _grid_source(node.args[0], modules)
        holder = modules.get(source.target) if isinstance(source, fx.Node) and source.op == "call_module" else None
        if not isinstance(holder, PytorchTrainableActivationQuantizationHolder) and isinstance(source, fx.Node):
            holder = _insert_holder(gm, source, node.args[0], node.target, holder_name(f"{node.target}_input", taken),
                                    config.for_layer(node.target), config, modules, holders)
        # A layer called more than once (a shared module) has one set of links for all its calls: it keeps the
        # float computation rather than compute some of them on another call's grids.
        if isinstance(holder, PytorchTrainableActivationQuantizationHolder) and calls[node.target] == 1:
            wrapper.set_input_holder(holder)
            wrapper.set_output_holder(*_output_holder(node, modules))


def _has_grid(holder: Any) -> bool:
    """Whether `holder` is a trainable holder whose quantizer states its grid (`grid()`, as the built-in ones do)."""
    return isinstance(holder, PytorchTrainableActivationQuantizationHolder) and hasattr(
        holder.activation_holder_quantizer, "grid")


def _integer_merges(gm: fx.GraphModule) -> None:
    """Make each addition of two holders' outputs and each concatenation of holders' outputs that a holder follows
    compute as onnxruntime's QLinearAdd / QLinearConcat in eval mode (`IntegerMerge`)."""
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if not _is_merge(node) or (node.kwargs and set(node.kwargs) - {"dim"}):
            continue
        if node.target in (torch.cat, torch.concat):
            inputs, dim = node.args[0], node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            if not isinstance(inputs, (list, tuple)) or not isinstance(dim, int):
                continue
            kind = "cat"
        elif node.target in (operator.add, torch.add, "add") and len(node.args) == 2 and not node.kwargs:
            inputs, dim, kind = node.args, 0, "add"
        else:
            continue  # in-place additions keep their float form
        input_holders = []
        for value in inputs:
            source = _grid_source(value, modules)
            holder = modules.get(source.target) if isinstance(source, fx.Node) and source.op == "call_module" else None
            input_holders.append(holder)
        output_holder, clip = _output_holder(node, modules)
        holders = [*input_holders, output_holder if clip is None else None]
        if not all(_has_grid(h) for h in holders):
            continue
        merge = IntegerMerge(kind, dim)
        merge.link(input_holders, output_holder)
        name, index = node.name, 1
        while name in modules:
            name, index = f"{node.name}_{index}", index + 1
        gm.add_submodule(name, merge)
        modules[name] = merge
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, tuple(inputs))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)


def _integer_average_pools(gm: fx.GraphModule) -> None:
    """Make each global average pooling between two holders compute as the integer kernel does in eval mode
    (`IntegerGlobalAveragePool`); modules keep their names, `F.adaptive_avg_pool*d(x, 1)` calls become modules."""
    modules = dict(gm.named_modules())
    functions = {F.adaptive_avg_pool1d: nn.AdaptiveAvgPool1d, F.adaptive_avg_pool2d: nn.AdaptiveAvgPool2d,
                 F.adaptive_avg_pool3d: nn.AdaptiveAvgPool3d}
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and is_global_average_pool(modules.get(node.target)):
            pool = modules[node.target]
        elif node.op == "call_function" and node.target in functions and len(node.args) == 2 and not node.kwargs:
            pool = functions[node.target](node.args[1])
            if not is_global_average_pool(pool):
                continue
        else:
            continue
        if node.op == "call_module" and _module_calls(gm)[node.target] != 1:
            continue  # a shared pooling module: one set of grids cannot serve all its calls
        if len(node.users) != 1 or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        (user,) = node.users
        source = _grid_source(node.args[0], modules)
        holders = [modules.get(n.target) if isinstance(n, fx.Node) and n.op == "call_module" else None
                   for n in (source, user)]
        if not all(_has_grid(h) for h in holders):
            continue
        integer_pool = IntegerGlobalAveragePool(pool)
        integer_pool.link(*holders)
        if node.op == "call_module":
            _set_submodule(gm, node.target, integer_pool)
        else:
            name = holder_name(node.name, set(modules)).removesuffix("_activation_quantizer")
            gm.add_submodule(name, integer_pool)
            with gm.graph.inserting_before(node):
                new = gm.graph.call_module(name, (node.args[0],))
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
        modules = dict(gm.named_modules())


# --- weights used functionally and products of activations -------------------------------------------------


def quantized_weight(wrapper: nn.Module, name: str) -> torch.Tensor:
    """The quantized weight `name` of a weights wrapper (trainable, or converted by `convert_to_inferable`)."""
    return wrapper.get_quantized_weights()[name]


def wrapped_parameter(wrapper: nn.Module, name: str) -> torch.Tensor:
    """The parameter `name` of the layer inside a weights wrapper (trainable: `.module`; converted: `.layer`)."""
    return getattr(wrapper.module if isinstance(wrapper, PytorchTrainableQuantizationWrapper) else wrapper.layer, name)


def _functional_weight_owner(node: Any, modules: dict[str, nn.Module]) -> str | None:
    """The name of the wrapper whose quantized weight `node` reads (a `quantized_weight` call), if any."""
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target is quantized_weight:
        return node.args[0].target
    return None


def _is_functional_layer(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether `node` is `F.linear` / `F.conv*d` with the quantized weight of a wrapped layer."""
    return (
        node.op == "call_function" and node.target in _FUNCTIONAL_LAYERS and len(node.args) > 1
        and _functional_weight_owner(node.args[1], modules) is not None
    )


def _quantize_functional_weights(gm: fx.GraphModule, config: QATConfig) -> None:
    """Quantize the weights of layers that forward reads directly (`F.linear(x, self.qkv.weight, self.qkv.bias)`):
    the layer is wrapped (if no call of it was) and each read of its weight becomes the wrapper's quantized weight;
    reads of its other parameters go through the wrapper."""
    modules = dict(gm.named_modules())
    layer_types = _layer_types(config)
    references: dict[str, fx.Node] = {}
    for node in list(gm.graph.nodes):
        if node.op != "get_attr":
            continue
        owner_name, _, attribute = node.target.rpartition(".")
        owner = modules.get(owner_name) if owner_name else None
        if not isinstance(owner, PytorchTrainableQuantizationWrapper):
            if not isinstance(owner, layer_types) or attribute != "weight" or config.for_layer(owner_name).skip:
                continue
            settings = config.for_layer(owner_name)
            with naming_layer(owner_name):
                owner = make_wrapper(owner, settings, config)
            _set_submodule(gm, owner_name, owner)
            modules = dict(gm.named_modules())
        if owner_name not in references:
            with gm.graph.inserting_before(next(n for n in gm.graph.nodes if n.op != "placeholder")):
                references[owner_name] = gm.graph.get_attr(owner_name)
        function = quantized_weight if attribute in owner.weights_quantizers else wrapped_parameter
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(function, (references[owner_name], attribute))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)


def _product_operands(node: fx.Node, modules: dict[str, nn.Module]) -> list[Any]:
    """The activation operands of a product of activations, or the input of a functional layer; [] otherwise."""
    if node.op == "call_function" and node.target is torch.einsum:
        operands = node.args[1:]
        return list(operands[0]) if len(operands) == 1 and isinstance(operands[0], (list, tuple)) else list(operands)
    if node.op == "call_function" and node.target in _PRODUCT_FUNCTIONS:
        positions = _PRODUCT_FUNCTIONS[node.target]
    elif node.op == "call_method" and node.target in _PRODUCT_METHODS:
        positions = _PRODUCT_METHODS[node.target]
    elif _is_functional_layer(node, modules):
        positions = (0,)
    else:
        return []
    return [node.args[i] for i in positions if i < len(node.args)]


def _quantize_products(
    gm: fx.GraphModule, config: QATConfig, holders: dict[str, tuple[LayerSettings, bool]], taken: set[str]
) -> None:
    """Give each operand of a product of two activations (and the input of each functionally called quantized
    layer) an activation quantizer, unless its values already come from one (through reshapes and max pools).

    Operands read from parameters or buffers are left alone; an override with `skip=True` on the product's node
    name leaves that product in float.
    """
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        operands = _product_operands(node, modules)
        if not operands or config.for_layer(node.name).skip:
            continue
        functional_layer = _is_functional_layer(node, modules)
        if not functional_layer and not config.quantize_matmul_inputs:
            continue
        settings = config.for_layer(node.name)
        for index, operand in enumerate(operands):
            source = _grid_source(operand, modules)
            if not isinstance(source, fx.Node) or source.op in ("get_attr", "placeholder"):
                continue
            if source.op == "call_module" and isinstance(
                    modules.get(source.target), PytorchTrainableActivationQuantizationHolder):
                continue
            name = holder_name(f"{node.name}_input" if functional_layer else f"{node.name}_input{index}", taken)
            _insert_holder(gm, source, operand, node.name, name, settings, config, modules, holders)


def _quantize_graph(gm: fx.GraphModule, config: QATConfig) -> dict[str, tuple[LayerSettings, bool]]:
    """Wrap layers and insert holders in a traced model; returns {holder name: (settings, signed)}."""
    modules = dict(gm.named_modules())
    check_overrides(config, [*modules, *(node.name for node in gm.graph.nodes)])
    if config.fold_batch_norm:
        _fold_batch_norms(gm, config)
        modules = dict(gm.named_modules())
    layer_types = _layer_types(config)
    graph = gm.graph

    outputs: list[tuple[fx.Node, str]] = []  # (node whose output is quantized, name its settings come from)
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    for node in list(graph.nodes):
        if node.op == "placeholder" and node.users and not node.args:
            # (an input with a default value, such as `mask=None`, is an option rather than data: not quantized)
            outputs.append((node, node.name))
        elif node.op == "call_module" and isinstance(modules.get(node.target), layer_types):
            settings = config.for_layer(node.target)
            if settings.skip:
                continue
            with naming_layer(node.target):
                _set_submodule(gm, node.target, make_wrapper(modules[node.target], settings, config))
            outputs.append((_chain_end(node, modules, through_batch_norm=True), node.target))
        elif _is_merge(node):
            outputs.append((_chain_end(node, modules, through_batch_norm=False), node.name))
    _quantize_functional_weights(gm, config)
    modules = dict(gm.named_modules())
    for node in graph.nodes:
        if _is_functional_layer(node, modules):
            outputs.append((_chain_end(node, modules, through_batch_norm=False), node.name))

    holders: dict[str, tuple[LayerSettings, bool]] = {}
    if not config.quantize_activations:
        return holders
    taken = set(modules)
    done: set[fx.Node] = set()
    for end, base in outputs:
        settings = config.for_layer(base)
        if end in done or settings.skip:
            continue
        done.add(end)
        name = holder_name(base, taken)
        signed = not (_is_non_negative(end, modules) or _merges_non_negative(end, modules, holders))
        with naming_layer(base):
            gm.add_submodule(name, make_holder(settings, config, default_activation_params(
                settings.activation_quantization_method, signed)))
        anchor = placeholders[-1] if end.op == "placeholder" else end
        with graph.inserting_after(anchor):
            holder = graph.call_module(name, (end,))
        end.replace_all_uses_with(holder, delete_user_cb=lambda user, holder=holder: user is not holder)
        holders[name] = (settings, signed)
    if config.quantize_matmul_inputs:
        decompose_sdpa(gm)
    _quantize_products(gm, config, holders, taken)
    if config.integer_bias:
        _quantize_layer_inputs(gm, config, holders, taken)
        _integer_average_pools(gm)
        _integer_merges(gm)
    return holders


# --- module-level fallback -----------------------------------------------------------------------------------


class _ActivationThenQuantize(nn.Sequential):
    """An activation module followed by its holder (used when the model cannot be traced)."""


def _quantize_modules(model: nn.Module, config: QATConfig, reason: str) -> dict[str, tuple[LayerSettings, bool]]:
    layer_types = _layer_types(config)
    named = dict(model.named_modules())
    check_overrides(config, list(named))
    wrapped, holders = [], {}
    taken = set(named)
    for name, module in named.items():
        if isinstance(module, layer_types):
            settings = config.for_layer(name)
            if not settings.skip:
                with naming_layer(name):
                    _set_submodule(model, name, make_wrapper(module, settings, config))
                wrapped.append(name)
        elif config.quantize_activations and isinstance(module, _ACTIVATION_MODULES):
            settings = config.for_layer(name)
            if settings.skip:
                continue
            signed = not isinstance(module, _NON_NEGATIVE_MODULES)
            with naming_layer(name):
                holder = make_holder(settings, config, default_activation_params(
                    settings.activation_quantization_method, signed))
            _set_submodule(model, name, _ActivationThenQuantize(module, holder))
            holders[f"{name}.1"] = (settings, signed)
            taken.add(name)
    warnings.warn(
        f"{type(model).__name__} could not be traced by torch.fx ({reason}); quantized module by module: the weights "
        f"of {len(wrapped)} layers and the outputs of {len(holders)} activation modules. Not quantized: the model "
        "inputs and functional operations in forward (additions, concatenations, F.relu and the like).",
        stacklevel=3,
    )
    return holders


def quantize_model(
    model: nn.Module,
    qat_config: QATConfig | None = None,
    representative_data: Iterable[Any] | None = None,
    num_calibration_batches: int | None = None,
    *,
    progress: bool = True,
) -> nn.Module:
    """Return a QAT-ready copy of `model` (which is not changed).

    Args:
        model: a float `torch.nn.Module`.
        qat_config: what to quantize and how (default `QATConfig()`: W8A8 per-channel symmetric STE).
        representative_data: batches to calibrate activation parameters with: tensors, or (inputs, targets)
            pairs as a DataLoader gives. Without it, activations start at a threshold of 8 and a warning says so.
        num_calibration_batches: how many batches to use (None: all).
        progress: show a progress bar while calibrating.

    Returns:
        A `torch.fx.GraphModule` whose train / eval behaviour follows `.train()` / `.eval()` whatever mode `model`
        was in (or, for a model torch.fx cannot trace, a copy quantized module by module, with a warning naming
        what is not quantized). Its layers keep their names (an `nn.MultiheadAttention` `attn` becomes
        `attn.q_proj`, `attn.k_proj`, `attn.v_proj`, `attn.out_proj`); weights sit under
        `<layer>.module.weight`, quantizer parameters under `<layer>.weight_threshold` and
        `<layer>_activation_quantizer.activation_threshold` (or `..._range_min` / `..._range_max`).
    """
    config = _check_arguments(model, qat_config, representative_data, num_calibration_batches, progress)
    if any(isinstance(m, (PytorchTrainableQuantizationWrapper, PytorchTrainableActivationQuantizationHolder))
           for m in model.modules()):
        raise QuantizationConfigError(
            f"{type(model).__name__} is already quantized (it holds trainable quantization wrappers or holders); "
            "pass the float model"
        )
    qat_model = copy.deepcopy(model)
    if isinstance(qat_model, nn.MultiheadAttention):
        qat_model = QuantizableMultiheadAttention.from_float(qat_model) or qat_model
    decompose_attention(qat_model)
    try:
        with traceable_forwards(qat_model):
            traced, leaves = trace_model(qat_model)
    except UntraceableError as exc:
        holders = _quantize_modules(qat_model, config, str(exc))
    else:
        traced.train(model.training)
        qat_model = traced
        holders = _quantize_graph(qat_model, config)
        qat_model.recompile()
        layer_types = _layer_types(config)
        kept = [name for name in leaves
                if any(isinstance(m, layer_types) for m in qat_model.get_submodule(name).modules())]
        if kept:
            warnings.warn(
                f"{', '.join(kept)} of {type(model).__name__} cannot be traced alike in train and eval mode (their "
                "forward branches on self.training, or on values): they run as they are, and the layers inside them "
                "stay float (quantization_coverage lists them)", stacklevel=2)
    # Holders are built on the CPU: give their variables the model's device.
    device = next((p.device for p in model.parameters()), None)
    if device is not None:
        for name in holders:
            qat_model.get_submodule(name).to(device)
    if not any(isinstance(m, PytorchTrainableQuantizationWrapper) for m in qat_model.modules()):
        raise QuantizationConfigError(
            f"{type(model).__name__} has no layer to quantize: no {', '.join(t.__name__ for t in _layer_types(config))}"
            " (or all were skipped by the config)"
        )
    save_switches_in_state_dict(qat_model)
    if not holders:
        return qat_model
    if representative_data is None:
        warn_no_representative_data()
        return qat_model
    calibrate(qat_model, representative_data, num_calibration_batches, config.activation_calibration,
              progress=progress)
    return qat_model
