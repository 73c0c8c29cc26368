"""Modules that put trainable quantizers around a layer's weights and on activations."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - torch's own convention
from torch import nn

from trainable_infra.common import debug
from trainable_infra.common.debug import FINITE_CHECKS
from trainable_infra.common.errors import QuantizationConfigError
from trainable_infra.common.mct import QuantizationTarget
from trainable_infra.pytorch_backend.base_quantizer import BasePytorchTrainableQuantizer
from trainable_infra.pytorch_backend.integer import (
    accumulator_dtype,
    holder_grid,
    integer_bias,
    integer_forward,
    is_integer_layer,
    quantize_bias,
)

# How the wrapped module is called with its quantized weight (chosen once, at construction).
_CALL_LINEAR = "linear"
_CALL_CONV = "conv"
_CALL_GENERIC = "generic"


def forget_grids(module: nn.Module, incompatible_keys: Any = None) -> None:
    """Make the quantizers of a wrapper or holder compute their grids afresh (a `load_state_dict` post-hook:
    under FSDP the loaded values reach the gathered parameters without a version bump)."""
    quantizers = (
        list(module.weights_quantizers.values()) if isinstance(module, PytorchTrainableQuantizationWrapper)
        else [module.activation_holder_quantizer]
    )
    for quantizer in quantizers:
        forget = getattr(quantizer, "forget_grid", None)
        if forget is not None:
            forget()


def check_quantizer(argument: str, quantizer: Any, target: QuantizationTarget) -> BasePytorchTrainableQuantizer:
    """Raise unless `quantizer` is a fresh PyTorch trainable quantizer for `target`."""
    if not isinstance(quantizer, BasePytorchTrainableQuantizer):
        raise QuantizationConfigError(
            f"{argument} must be a PyTorch trainable quantizer (a BasePytorchTrainableQuantizer), got {quantizer!r}"
        )
    if quantizer.quantization_target is not target:
        raise QuantizationConfigError(
            f"{argument} must quantize {target.value}, got {type(quantizer).__name__} which quantizes "
            f"{quantizer.quantization_target.value}"
        )
    if quantizer.quantizer_parameters:
        raise QuantizationConfigError(
            f"{argument} ({type(quantizer).__name__}) already holds the variables of another layer; "
            "create one quantizer per quantized tensor"
        )
    return quantizer


# Not traced by torch.compile (which would log each data-dependent branch): with the checks on it runs eagerly
# between the compiled parts; with them off it is not reached.
@torch.compiler.disable
def check_finite_values(owner: str, tensor: str, x: torch.Tensor, quantizer: BasePytorchTrainableQuantizer) -> None:
    """Raise `NonFiniteError` if `x` (what `quantizer` quantizes) or a variable of `quantizer` is unusable
    (`trainable_infra.check_finite`)."""
    if not bool(torch.isfinite(x).all()):
        debug.check_input(owner, tensor, x.detach().float().cpu().numpy())
    debug.check_parameters(owner, {
        name: quantizer.get_quantizer_variable(name).detach().float().cpu().numpy()
        for name in quantizer.registered_variables()
    })


def _call_kind(module: nn.Module, names: list[str]) -> str:
    # Only the stock forward methods are bypassed: a subclass with its own forward takes the generic path.
    forward = type(module).forward
    if names == ["weight"] and forward is nn.Linear.forward:
        return _CALL_LINEAR
    if names == ["weight"] and forward in (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward):
        return _CALL_CONV
    return _CALL_GENERIC


def _fits_8_bits(quantizer: Any) -> bool:
    """Whether a quantizer's integer grid has at most 256 levels (what int8 / uint8 kernels take)."""
    return int(quantizer.q_max) - int(quantizer.q_min) < 256


def _step_for(quantizer: Any, output: torch.Tensor | None) -> torch.Tensor:
    """Δ of the grid `output` lies on (the quantizer's kept step when it made `output`), else its grid's Δ."""
    step_for = getattr(quantizer, "step_for", None)
    return step_for(output) if step_for is not None else quantizer.grid()[0]


def _abs_int_max(quantizer: Any) -> int:
    """The largest |q - z| of a quantizer's integer grid (bounded by its range when the zero point moves)."""
    return max(abs(int(quantizer.q_min)), abs(int(quantizer.q_max)))


class PytorchTrainableQuantizationWrapper(nn.Module):
    """A module that runs `module` with its weights fake-quantized by trainable quantizers.

    The quantizers' variables are parameters of this wrapper (`<attribute>_threshold`, `<attribute>_range_min`,
    ...), so optimizers, `state_dict`, `.to(device)`, `copy.deepcopy` and `torch.compile` see them; the wrapped
    module keeps its own parameters (state-dict keys `module.weight`, `module.bias`).

    Args:
        module: the layer, e.g. `nn.Conv2d` or `nn.Linear`.
        weights_quantizers: {attribute name: weight quantizer}, e.g. `{"weight": STESymmetricWeightQuantizer(config)}`.

    Example:
        >>> wrapped = PytorchTrainableQuantizationWrapper(nn.Linear(4, 2), {"weight": quantizer})  # doctest: +SKIP
    """

    def __init__(self, module: nn.Module, weights_quantizers: Mapping[str, BasePytorchTrainableQuantizer]):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise QuantizationConfigError(
                f"module must be a torch.nn.Module, got {module!r} of type {type(module).__name__}"
            )
        if not isinstance(weights_quantizers, Mapping):
            raise QuantizationConfigError(
                f"weights_quantizers must be a dict {{attribute name: quantizer}}, got {weights_quantizers!r}"
            )
        for name, quantizer in weights_quantizers.items():
            weight = getattr(module, name, None) if isinstance(name, str) else None
            if not isinstance(weight, torch.Tensor):
                available = [n for n, _ in module.named_parameters(recurse=False)]
                raise QuantizationConfigError(
                    f"weights_quantizers names {name!r}, which is not a tensor attribute of "
                    f"{type(module).__name__}; its parameters are {available}"
                )
            check_quantizer(f"weights_quantizers[{name!r}]", quantizer, QuantizationTarget.Weights)
        self.module = module
        self.weights_quantizers = dict(weights_quantizers)
        for name, quantizer in self.weights_quantizers.items():
            quantizer.initialize_quantization(tuple(getattr(module, name).shape), name, self)
        self._call = _call_kind(module, list(self.weights_quantizers))
        # Plain attributes, not submodules: the holders belong to the model, which registers them.
        self.__dict__["_input_holder"] = None
        self.__dict__["_output_holder"] = None
        self._output_clip: float | None = None
        self.integer_arithmetic = True  # eval as the integer kernel when linked (see set_input_holder)
        self.register_load_state_dict_post_hook(forget_grids)

    @property
    def input_holder(self) -> PytorchTrainableActivationQuantizationHolder | None:
        """The activation holder whose output is this layer's input, if the bias is on its integer grid."""
        return self.__dict__["_input_holder"]

    def set_input_holder(self, holder: PytorchTrainableActivationQuantizationHolder | None) -> None:
        """Compute as an integer kernel does, for inputs quantized by `holder` (None: as a float layer).

        With a holder, the bias is rounded to int32 on the grid s = Δ_in·Δ_w (straight-through gradient) and, in
        eval mode, the products are accumulated exactly and scaled once (`trainable_infra.pytorch_backend.integer`).
        Layers other than a stock Conv1d/2d/3d or Linear, quantizers without a `grid()` and grids of more than
        8 bits (no integer kernel takes them; their Δ_in·Δ_w is so small that an int32 bias would saturate) keep the
        float computation.
        """
        if holder is not None and not isinstance(holder, PytorchTrainableActivationQuantizationHolder):
            raise QuantizationConfigError(
                f"holder must be a PytorchTrainableActivationQuantizationHolder or None, got {holder!r}"
            )
        usable = (
            holder is not None
            and is_integer_layer(self.module)
            and list(self.weights_quantizers) == ["weight"]
            and hasattr(self.weights_quantizers["weight"], "grid")
            and hasattr(holder.activation_holder_quantizer, "grid")
            and _fits_8_bits(self.weights_quantizers["weight"])
            and _fits_8_bits(holder.activation_holder_quantizer)
        )
        self.__dict__["_input_holder"] = holder if usable else None
        if usable:
            self._acc_dtype = accumulator_dtype(
                self.module, _abs_int_max(holder.activation_holder_quantizer),
                _abs_int_max(self.weights_quantizers["weight"]),
            )

    @property
    def output_holder(self) -> PytorchTrainableActivationQuantizationHolder | None:
        """The holder right after this layer whose requantization the eval computation carries out, if any."""
        return self.__dict__["_output_holder"]

    def set_output_holder(
        self, holder: PytorchTrainableActivationQuantizationHolder | None, clip: float | None = None
    ) -> None:
        """In eval mode, requantize onto `holder`'s grid as the integer kernel does (None: return float32(acc)·s).

        Meant for a holder that takes this layer's output directly, or after a ReLU / ReLU6 when its grid starts
        at 0: the output then lies on its grid and the holder (and the activation) leave it unchanged. With `clip`
        (6.0 after a ReLU6) the requantization applies only while the holder's uint8 range lies within
        [0, clip], as onnxruntime folds the activation only then; otherwise the layer returns float32(acc)·s.
        """
        if holder is not None and not isinstance(holder, PytorchTrainableActivationQuantizationHolder):
            raise QuantizationConfigError(
                f"holder must be a PytorchTrainableActivationQuantizationHolder or None, got {holder!r}"
            )
        usable = holder is not None and self.input_holder is not None and hasattr(holder.activation_holder_quantizer,
                                                                                  "grid")
        self.__dict__["_output_holder"] = holder if usable else None
        self._output_clip = clip

    def _steps(self, x: torch.Tensor | None, weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(Δ_in, Δ_w) in float32. `x` and `weight`, the input and the quantized weight of this call, let
        quantizers that keep the step of their latest result (`step_for`) hand it over instead of computing their
        grid again."""
        return (_step_for(self.input_holder.activation_holder_quantizer, x),
                _step_for(self.weights_quantizers["weight"], weight))

    def _integer_grid(self, x: torch.Tensor | None = None, weight: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Δ_in, Δ_w, s = Δ_in·Δ_w): the input's step, the weight's steps and the bias grid, in float32
        (`_steps` says what `x` and `weight` are for)."""
        x_step, w_step = self._steps(x, weight)
        # Eagerly the steps are the quantizers' kept tensors while their parameters are unchanged, and so is s.
        cached = self.__dict__.get("_scale_cache")
        if cached is not None and cached[0] is x_step and cached[1] is w_step:
            return x_step, w_step, cached[2]
        scale = x_step * w_step
        if not torch.compiler.is_compiling():
            self.__dict__["_scale_cache"] = (x_step, w_step, scale)
        return x_step, w_step, scale

    def get_quantized_weights(self) -> dict[str, torch.Tensor]:
        """{attribute: fake-quantized weight}, as this wrapper's forward uses them in its current mode."""
        module, training = self.module, self.training
        return {
            name: quantizer.quantize_inputs(getattr(module, name), training)
            for name, quantizer in self.weights_quantizers.items()
        }

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Quantize the weights, then run the wrapped module with them."""
        module = self.module
        if FINITE_CHECKS.enabled:
            for name, quantizer in self.weights_quantizers.items():
                owner = f"the {name!r} quantizer ({type(quantizer).__name__}) of {type(self).__name__}({module!r})"
                check_finite_values(owner, f"{type(module).__name__}.{name}", getattr(module, name), quantizer)
        quantized = {
            name: quantizer.quantize_inputs(getattr(module, name), self.training)
            for name, quantizer in self.weights_quantizers.items()
        }
        if self.input_holder is not None and len(args) == 1 and not kwargs:
            if not self.training and self.integer_arithmetic and args[0].dtype == torch.float32:
                x_step, w_step, scale = self._integer_grid(args[0], quantized["weight"])
                b_int = None if module.bias is None else integer_bias(module.bias, scale)
                output = self.output_holder
                return integer_forward(module, args[0], x_step, quantized["weight"], w_step, b_int, scale,
                                       self._acc_dtype, None if output is None else holder_grid(output),
                                       self._output_clip)
            bias = None
            if module.bias is not None:
                bias = quantize_bias(module.bias, *self._steps(args[0], quantized["weight"]))
            if self._call == _CALL_LINEAR:
                return F.linear(args[0], quantized["weight"], bias)
            return module._conv_forward(args[0], quantized["weight"], bias)
        if len(args) == 1 and not kwargs:
            # The common layers are called with their quantized weight directly, which saves swapping parameters
            # in and out of the module on every step.
            if self._call == _CALL_LINEAR:
                return F.linear(args[0], quantized["weight"], module.bias)
            if self._call == _CALL_CONV:
                return module._conv_forward(args[0], quantized["weight"], module.bias)
        return torch.func.functional_call(module, quantized, args, kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{name}: {type(q).__name__}" for name, q in self.weights_quantizers.items())


class PytorchTrainableActivationQuantizationHolder(nn.Module):
    """A module that fake-quantizes its input with a trainable activation quantizer.

    The quantizer's variables are parameters of the holder (`activation_threshold`, or `activation_range_min`
    and `activation_range_max`).

    Args:
        activation_quantizer: an activation quantizer, e.g. `STESymmetricActivationQuantizer(config)`.
    """

    def __init__(self, activation_quantizer: BasePytorchTrainableQuantizer):
        super().__init__()
        self.activation_holder_quantizer = check_quantizer(
            "activation_quantizer", activation_quantizer, QuantizationTarget.Activation
        )
        activation_quantizer.initialize_quantization(None, "activation", self)
        self.register_load_state_dict_post_hook(forget_grids)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Fake-quantize `inputs`."""
        if FINITE_CHECKS.enabled:
            quantizer = self.activation_holder_quantizer
            check_finite_values(f"{type(self).__name__}({type(quantizer).__name__})", "its input", inputs, quantizer)
        return self.activation_holder_quantizer.quantize_inputs(inputs, self.training)

    def extra_repr(self) -> str:
        return type(self.activation_holder_quantizer).__name__
