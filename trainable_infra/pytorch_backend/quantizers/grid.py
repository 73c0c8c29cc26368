"""The quantization grids in torch: their variables, the fused fake-quant call and the inferable quantizer.

`SymmetricGrid` (symmetric and power-of-two) and `UniformGrid` are mixins shared by the STE and LSQ
quantizers: they create the variables in `initialize_quantization`, compute (Δ, zero point) from them each
call with a handful of ops on C-length vectors, and build the mct-quantizers inferable quantizer. The maths
is DESIGN.md §4, the same as `trainable_infra.common.numerics`.
"""

from __future__ import annotations

import weakref
from typing import Any, ClassVar

import numpy as np
import torch
from mct_quantizers.pytorch.quantizers import (
    ActivationPOTInferableQuantizer,
    ActivationSymmetricInferableQuantizer,
    ActivationUniformInferableQuantizer,
    WeightsPOTInferableQuantizer,
    WeightsSymmetricInferableQuantizer,
    WeightsUniformInferableQuantizer,
)

from trainable_infra.common.enums import VariableGroup
from trainable_infra.common.errors import NonFiniteError, QuantizationConfigError
from trainable_infra.common.mct import QuantizationTarget
from trainable_infra.common.numerics import broadcast_shape, lsq_grad_scale, lsq_num_elements_weights
from trainable_infra.common.quant_params import SymmetricParams, UniformParams
from trainable_infra.pytorch_backend.quantizers.fake_quant import divide, fake_quantize
from trainable_infra.pytorch_backend.quantizers.triton_kernels import (
    POWER_OF_TWO,
    SYMMETRIC,
    UNIFORM,
    KernelGrid,
)

# The smallest normal float32: the Triton kernels round a threshold up to a power of two with bit operations that
# hold for normal numbers.
_FLOAT32_TINY = 2.0**-126


def power_of_two(t: torch.Tensor) -> torch.Tensor:
    """The smallest power of two >= t (t > 0), exactly."""
    mantissa, _ = torch.frexp(t)
    # t = m·2^e with m in [0.5, 1): the answer is 2^e = t/m (an exact division), or t itself when m = 0.5.
    return torch.where(mantissa == 0.5, t, divide(t, mantissa))


def register_variable(layer: Any, name: str, value: np.ndarray, trainable: bool) -> torch.nn.Parameter:
    """Create a float32 parameter from `value` on `layer` (on the device of the layer's own tensors)."""
    if not isinstance(layer, torch.nn.Module):
        raise QuantizationConfigError(
            f"layer must be the torch.nn.Module that holds the quantizer's variables, got {type(layer).__name__}"
        )
    reference = next(iter(layer.parameters()), None)
    device = reference.device if reference is not None else None
    parameter = torch.nn.Parameter(
        torch.tensor(np.asarray(value), dtype=torch.float32, device=device), requires_grad=trainable
    )
    layer.register_parameter(name, parameter)
    return parameter


def _on_device(quantizer: Any, device: torch.device) -> Any:
    """Move an inferable quantizer's tensors to `device`.

    mct-quantizers puts them on CUDA whenever a GPU exists; the converted model should work where the
    trained one ran.
    """
    for name, value in list(vars(quantizer).items()):
        if isinstance(value, torch.Tensor):
            setattr(quantizer, name, value.to(device))
    return quantizer


class _Grid:
    """What both grids share: reading the config and the tensor layout it implies."""

    # Whether the quantization parameters are trained (LSQ) or fixed (STE).
    learnable_params: ClassVar[bool]
    quantization_target: QuantizationTarget
    freeze_quant_params: bool

    def _read(self, tensor_shape: Any) -> SymmetricParams | UniformParams:
        params = self.read_quant_params(tensor_shape)
        self.axis = params.channel_axis
        # Parameters are C-length vectors; `view` reshapes them to broadcast against the input.
        self.view = broadcast_shape(len(tensor_shape), self.axis) if self.axis is not None else ()
        self.reduce_dims = (
            tuple(i for i in range(len(tensor_shape)) if i != self.axis) if self.axis is not None else None
        )
        return params

    def _variable(self, layer: Any, name: str, key: str, value: np.ndarray) -> None:
        variable = register_variable(
            layer, f"{name}_{key}", value, self.learnable_params and not self.freeze_quant_params
        )
        self.add_quantizer_variable(key, variable, VariableGroup.QPARAMS)
        # The layer owns the variable and the quantizer reads it back by name on every use: FSDP,
        # load_state_dict(assign=True) and torch.func.functional_call put other tensor objects on the layer,
        # and a reference kept here would compute with (and send gradients to) the replaced one.
        self._layer = layer
        self._attributes[key] = f"{name}_{key}"

    def get_quantizer_variable(self, name: str) -> torch.Tensor:
        """Return the variable registered under `name`, as the layer holds it now."""
        attribute = getattr(self, "_attributes", {}).get(name)
        if attribute is None:
            return super().get_quantizer_variable(name)
        return getattr(self._layer, attribute)

    def grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Δ, zero point) as C-length float32 and int32 vectors, outside autograd.

        Eagerly, for parameters that are not trained (STE, frozen LSQ), the pair is kept until a parameter changes
        (a new tensor, new memory, or an in-place write such as `fill_` or `load_state_dict`, which bump its
        version): a training step asks for it several times (forward, integer bias), so the handful of small
        kernels that compute it run once instead of on every call. The cached tensors are never written to. A
        write that bypasses the version counter (`parameter.data.fill_(...)`) needs `forget_grid()` after it;
        `calibrate` and `load_state_dict` on the wrappers and holders call it.
        """
        variables = [getattr(self._layer, attribute) for attribute in self._attributes.values()]
        if torch.compiler.is_compiling() or any(variable.requires_grad for variable in variables):
            # Trained parameters change every step, and FSDP writes their gathered values into the same
            # tensors without a version bump: computed on every call.
            return self._compute_grid()
        key = [(variable._version, variable.data_ptr()) for variable in variables]
        cached = self.__dict__.get("_grid_cache")
        if (
            cached is not None
            and cached[2] == key
            and all(a is b for a, b in zip(cached[1], variables, strict=True))
        ):
            return cached[0]
        result = self._compute_grid()
        # The variables themselves are kept (not their ids), so a replaced one can never be mistaken for them.
        self.__dict__["_grid_cache"] = (result, variables, key)
        return result

    def __getstate__(self) -> dict[str, Any]:
        # What is kept between calls is derived state: a weak reference cannot be pickled (torch.save of a model,
        # spawned processes), and the kept grids are recomputed on the first call after loading.
        state = dict(self.__dict__)
        for key in ("_output_step", "_grid_cache", "_bounds_cache"):
            state.pop(key, None)
        return state

    def keep_step(self, output: torch.Tensor, step: torch.Tensor) -> None:
        """Note that `output`, this quantizer's latest result, lies on a grid of step `step` (see `step_for`)."""
        if not torch.compiler.is_compiling():
            # A weak reference: the quantizer must not keep a batch's activations alive.
            self.__dict__["_output_step"] = (weakref.ref(output), step)

    def step_for(self, output: torch.Tensor | None = None) -> torch.Tensor:
        """Δ of the grid `output` lies on when it is this quantizer's latest result or a view of it, else `grid()`'s Δ.

        The layer an input or a weight goes to needs the step it was quantized with (its bias grid is Δ_in·Δ_w):
        the quantizer's own pass has computed it, and a trained grid would otherwise be computed again.
        """
        kept = None if torch.compiler.is_compiling() else self.__dict__.get("_output_step")
        if output is not None and kept is not None:
            latest = kept[0]()
            # A view of the result (flattened, sliced) holds the same grid's values.
            if latest is not None and (output is latest or output._base is latest):
                return kept[1]
        return self.grid()[0]

    def forget_grid(self) -> None:
        """Drop the kept grid, for parameters written where their version counter does not see it (through
        `.data`, or FSDP's gathered copies after `load_state_dict`): the next call computes it afresh."""
        self.__dict__.pop("_grid_cache", None)
        self.__dict__.pop("_bounds_cache", None)
        self.__dict__.pop("_output_step", None)

    def grid_and_bounds(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Δ, zero point, low, high): `grid()` and the straight-through range `bounds()` of that grid, both kept
        eagerly while the grid is."""
        delta, zero_point = self.grid()
        cached = self.__dict__.get("_bounds_cache")
        if cached is not None and cached[0] is delta:
            return delta, zero_point, *cached[1]
        low, high = self.bounds(delta, zero_point)
        if not torch.compiler.is_compiling():
            self.__dict__["_bounds_cache"] = (delta, (low, high))
        return delta, zero_point, low, high

    def fake_quantize(self, x: torch.Tensor, delta: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
        """Fake-quantize `x` on the grid (Δ, zero point), without gradient rules."""
        return fake_quantize(x, delta, zero_point, self.axis, self.view, self.q_min, self.q_max)

    def check_exportable(self) -> None:
        """Raise `NonFiniteError` if a parameter is NaN or ±Inf: no inferable quantizer has such a grid."""
        for key in self.registered_variables():
            value = self.get_quantizer_variable(key).detach()
            if not bool(torch.isfinite(value).all()):
                raise NonFiniteError(
                    f"{type(self).__name__} cannot be converted to an inferable quantizer: its {key} is not finite "
                    f"({value.cpu().tolist()})"
                )

    def _weight_grad_scale(self, tensor_shape: Any, q_max: int) -> float:
        if self.quantization_target is not QuantizationTarget.Weights:
            return 0.0  # activations: computed per call from the batch's shape
        return lsq_grad_scale(lsq_num_elements_weights(tuple(tensor_shape), self.axis), q_max)


class SymmetricGrid(_Grid):
    """Symmetric and power-of-two grids: Δ = t / 2^(n-s), integers in [q_min, q_max], zero point 0."""

    def initialize_quantization(self, tensor_shape: Any, name: str, layer: Any) -> None:
        """Create the threshold variable `<name>_threshold` on `layer`."""
        self._attributes: dict[str, str] = {}
        params = self._read(tensor_shape)
        self.params = params
        self._variable(layer, name, "threshold", params.threshold)
        self.q_min, self.q_max = params.int_range
        self.steps = float(2 ** (params.n_bits - int(params.signed)))
        self.grad_scale = self._weight_grad_scale(tensor_shape, self.q_max)

    @property
    def threshold(self) -> torch.Tensor:
        """The threshold variable (C-length), as the layer holds it now."""
        return getattr(self._layer, self._attributes["threshold"])

    def effective_threshold(self, threshold: torch.Tensor | None = None) -> torch.Tensor:
        """The threshold the grid uses (float32): clamped by min_threshold, rounded up to 2^k for POT.

        `threshold` (default: the variable as the layer holds it now) is the tensor to read, e.g. the one an
        autograd node saved.
        """
        t = (self.threshold if threshold is None else threshold).detach().float().clamp_min(self.params.min_threshold)
        return power_of_two(t) if self.params.power_of_two else t

    def _compute_grid(self, threshold: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        delta = divide(self.effective_threshold(threshold), self.steps).detach()
        return delta, torch.zeros_like(delta, dtype=torch.int32)

    def kernel_grid(self, threshold: torch.Tensor | None = None) -> KernelGrid:
        """The grid as the Triton kernels compute it from `threshold` (default: the variable as the layer holds it
        now): the same (Δ, 0) as `grid()`, without torch kernels."""
        t = (self.threshold if threshold is None else threshold).detach()
        p = self.params
        if p.power_of_two and p.min_threshold < _FLOAT32_TINY:
            return KernelGrid.given(*self._compute_grid(t))
        t = t.contiguous()
        return KernelGrid(POWER_OF_TWO if p.power_of_two else SYMMETRIC, t, t, p.min_threshold, self.steps)

    def bounds(self, delta: torch.Tensor, zero_point: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[Δ·q_min, Δ·q_max], shaped to broadcast against the input."""
        d = delta.view(self.view)
        return d * self.q_min, d * self.q_max

    def convert2inferable(self) -> Any:
        """The mct-quantizers PyTorch inferable quantizer with this grid."""
        self.check_exportable()
        threshold = self.effective_threshold().detach().cpu().tolist()
        p = self.params
        if self.quantization_target is QuantizationTarget.Weights:
            cls = WeightsPOTInferableQuantizer if p.power_of_two else WeightsSymmetricInferableQuantizer
            quantizer = cls(num_bits=p.n_bits, threshold=threshold, per_channel=self.axis is not None,
                            channel_axis=self.axis)
            return _on_device(quantizer, self.threshold.device)
        cls = ActivationPOTInferableQuantizer if p.power_of_two else ActivationSymmetricInferableQuantizer
        return cls(num_bits=p.n_bits, threshold=threshold, signed=p.signed)


class UniformGrid(_Grid):
    """Uniform grids: the range widened to contain 0, Δ = (b - a)/K, zero point z = round(-a/Δ)."""

    def initialize_quantization(self, tensor_shape: Any, name: str, layer: Any) -> None:
        """Create the range variables `<name>_range_min` and `<name>_range_max` on `layer`."""
        self._attributes: dict[str, str] = {}
        params = self._read(tensor_shape)
        self.params = params
        self._variable(layer, name, "range_min", params.range_min)
        self._variable(layer, name, "range_max", params.range_max)
        self.q_min, self.q_max = 0, 2**params.n_bits - 1
        self.grad_scale = self._weight_grad_scale(tensor_shape, self.q_max)

    @property
    def range_min(self) -> torch.Tensor:
        """The lower range end (C-length), as the layer holds it now."""
        return getattr(self._layer, self._attributes["range_min"])

    @property
    def range_max(self) -> torch.Tensor:
        """The upper range end (C-length), as the layer holds it now."""
        return getattr(self._layer, self._attributes["range_max"])

    def effective_range(self, range_min: torch.Tensor | None = None, range_max: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """The range the grid spans (float32): widened to contain 0, and to min_threshold if narrower.

        `range_min` / `range_max` (default: the variables as the layer holds them now) are the tensors to read.
        """
        range_min = self.range_min if range_min is None else range_min
        range_max = self.range_max if range_max is None else range_max
        low = range_min.detach().float().clamp_max(0.0)
        # Training can push range_max to or below range_min (Δ = 0): a range that narrow is held at min_threshold.
        high = torch.maximum(range_max.detach().float().clamp_min(0.0), low + self.params.min_threshold)
        return low, high

    def kernel_grid(self, range_min: torch.Tensor | None = None, range_max: torch.Tensor | None = None
                    ) -> KernelGrid:
        """The grid as the Triton kernels compute it from the range (default: the variables as the layer holds
        them now): the same (Δ, z) as `grid()`, without torch kernels."""
        range_min = (self.range_min if range_min is None else range_min).detach().contiguous()
        range_max = (self.range_max if range_max is None else range_max).detach().contiguous()
        return KernelGrid(UNIFORM, range_min, range_max, self.params.min_threshold, float(self.q_max))

    def _compute_grid(self, range_min: torch.Tensor | None = None, range_max: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        low, high = self.effective_range(range_min, range_max)
        delta = divide(high - low, float(self.q_max))
        return delta, torch.round(divide(-low, delta)).clamp(0, self.q_max).to(torch.int32)

    def bounds(self, delta: torch.Tensor, zero_point: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The adjusted range [a', b'] = [-z·Δ, (K - z)·Δ], shaped to broadcast against the input."""
        d, z = delta.view(self.view), zero_point.view(self.view)
        return -z * d, (self.q_max - z) * d

    def convert2inferable(self) -> Any:
        """The mct-quantizers PyTorch inferable quantizer with this grid."""
        self.check_exportable()
        delta, zero_point = self.grid()
        d, z = delta.cpu().double(), zero_point.cpu().double()
        low, high = (-z * d).tolist(), ((self.q_max - z) * d).tolist()
        n_bits = self.params.n_bits
        # mct-quantizers re-derives (scale, zero point) from the range in float32, and for weights truncates
        # the zero point (`.int()`): for some ranges the scale moves by an ulp or the zero point by a whole step.
        # It is handed the trained grid, so that what was trained is what is deployed.
        if self.quantization_target is QuantizationTarget.Weights:
            quantizer = WeightsUniformInferableQuantizer(
                num_bits=n_bits, min_range=low, max_range=high, per_channel=self.axis is not None,
                channel_axis=self.axis,
            )
            quantizer.scales, quantizer.zero_points = delta.clone(), zero_point.clone()
            return _on_device(quantizer, delta.device)
        quantizer = ActivationUniformInferableQuantizer(num_bits=n_bits, min_range=low, max_range=high)
        quantizer.scale, quantizer.zero_point = float(delta[0]), int(zero_point[0])
        return quantizer
