"""Model-level QAT settings: what `quantize_model` quantizes, how, and per-layer exceptions."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from enum import Enum
from fnmatch import fnmatchcase
from typing import Any

from trainable_infra.common.calibration import ACTIVATION_CALIBRATIONS, WEIGHT_INITS
from trainable_infra.common.config import (
    check_bool,
    check_choice,
    check_method,
    check_n_bits,
    check_positive_float,
    method_from_name,
)
from trainable_infra.common.enums import TrainingMethod
from trainable_infra.common.errors import QuantizationConfigError
from trainable_infra.common.mct import QuantizationMethod
from trainable_infra.common.numerics import DEFAULT_MIN_THRESHOLD

# Settings a LayerOverride may change; None in an override means "keep the model-level value".
_OVERRIDABLE = (
    "weight_training_method",
    "activation_training_method",
    "weight_quantization_method",
    "activation_quantization_method",
    "weight_n_bits",
    "activation_n_bits",
    "weight_per_channel",
)


def check_training_method(name: str, value: Any) -> Enum | str:
    """Return `value` if it can identify a training method (an enum member or a non-empty string)."""
    if isinstance(value, Enum) or (isinstance(value, str) and value):
        return value
    raise QuantizationConfigError(
        f"{name} must be a TrainingMethod member (e.g. TrainingMethod.STE), a member of your own enum or a "
        f"non-empty string, got {value!r}"
    )


def _training_method_to_json(value: Enum | str) -> str:
    return value.name if isinstance(value, Enum) else value


def _training_method_from_json(name: str, value: Any) -> Enum | str:
    # A user's own enum member was written by name; the resolver matches that name again.
    if isinstance(value, str) and value in TrainingMethod.__members__:
        return TrainingMethod[value]
    return check_training_method(name, value)


def _check_field(field: str, value: Any) -> Any:
    if field.endswith("training_method"):
        return check_training_method(field, value)
    if field.endswith("quantization_method"):
        return check_method(field, value)
    if field.endswith("n_bits"):
        return check_n_bits(field, value)
    return check_bool(field, value)


def _to_json(field: str, value: Any) -> Any:
    if field.endswith("training_method"):
        return _training_method_to_json(value)
    if isinstance(value, QuantizationMethod):
        return value.name
    return value


def _from_json(field: str, value: Any) -> Any:
    if field.endswith("training_method"):
        return _training_method_from_json(field, value)
    if field.endswith("quantization_method"):
        return method_from_name(field, value)
    return value


@dataclasses.dataclass(frozen=True)
class LayerOverride:
    """Settings for the layers whose name matches `pattern` (a shell-style glob, e.g. "features.*").

    Fields left as None keep the model-level value; `skip=True` leaves matching layers unquantized.
    """

    pattern: str
    weight_training_method: Enum | str | None = None
    activation_training_method: Enum | str | None = None
    weight_quantization_method: QuantizationMethod | None = None
    activation_quantization_method: QuantizationMethod | None = None
    weight_n_bits: int | None = None
    activation_n_bits: int | None = None
    weight_per_channel: bool | None = None
    skip: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern:
            raise QuantizationConfigError(f"pattern must be a non-empty string, got {self.pattern!r}")
        for field in _OVERRIDABLE:
            value = getattr(self, field)
            if value is not None:
                object.__setattr__(self, field, _check_field(field, value))
        object.__setattr__(self, "skip", check_bool("skip", self.skip))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict of the pattern and the fields this override sets."""
        result: dict[str, Any] = {"pattern": self.pattern}
        result.update({f: _to_json(f, getattr(self, f)) for f in _OVERRIDABLE if getattr(self, f) is not None})
        if self.skip:
            result["skip"] = True
        return result

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LayerOverride:
        """Build an override from a dict made by `to_dict`."""
        if not isinstance(d, Mapping):
            raise QuantizationConfigError(f"a layer override must be a dict, got {d!r}")
        allowed = ("pattern", *_OVERRIDABLE, "skip")
        unknown = sorted(str(k) for k in d if k not in allowed)
        if unknown:
            raise QuantizationConfigError(
                f"layer override has unknown keys {unknown}; allowed keys are {list(allowed)}"
            )
        if "pattern" not in d:
            raise QuantizationConfigError(f"layer override is missing 'pattern': {dict(d)!r}")
        return cls(**{k: v if k in ("pattern", "skip") else _from_json(k, v) for k, v in d.items()})


@dataclasses.dataclass(frozen=True)
class LayerSettings:
    """The resolved settings of one layer (model-level values with the matching overrides applied)."""

    weight_training_method: Enum | str
    activation_training_method: Enum | str
    weight_quantization_method: QuantizationMethod
    activation_quantization_method: QuantizationMethod
    weight_n_bits: int
    activation_n_bits: int
    weight_per_channel: bool
    skip: bool


def _check_overrides(value: Any) -> tuple[LayerOverride, ...]:
    if isinstance(value, Mapping):
        items = []
        for pattern, settings in value.items():
            if isinstance(settings, LayerOverride):
                items.append(dataclasses.replace(settings, pattern=pattern))
            elif isinstance(settings, Mapping):
                items.append(LayerOverride.from_dict({**settings, "pattern": pattern}))
            else:
                raise QuantizationConfigError(
                    f"overrides[{pattern!r}] must be a dict of settings or a LayerOverride, got {settings!r}"
                )
        return tuple(items)
    if isinstance(value, (list, tuple)) and all(isinstance(o, LayerOverride) for o in value):
        return tuple(value)
    raise QuantizationConfigError(
        f"overrides must be a sequence of LayerOverride or a dict {{pattern: settings}}, got {value!r}"
    )


def _check_layer_types(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise QuantizationConfigError(
            f"layer_types must be None (the backend's defaults) or a list of layer class names, got {value!r}"
        )
    return tuple(value)


@dataclasses.dataclass(frozen=True)
class QATConfig:
    """Model-level quantization-aware-training settings.

    Args:
        weight_training_method: how weight quantizers train (a `TrainingMethod`, your own enum member, or
            a string naming one).
        activation_training_method: how activation quantizers train.
        weight_quantization_method: `QuantizationMethod` of weights (SYMMETRIC, POWER_OF_TWO, UNIFORM).
        activation_quantization_method: `QuantizationMethod` of activations.
        weight_n_bits: weight bit width, 2..16.
        activation_n_bits: activation bit width, 2..16.
        weight_per_channel: per-channel (True) or per-tensor weight parameters.
        quantize_activations: whether activation quantizers are inserted at all.
        layer_types: class names of the layers whose weights are quantized; None means the backend's
            default set (convolutions, transposed convolutions and dense / linear layers).
        min_threshold: smallest threshold any quantizer uses, > 0.
        weight_init: how weight parameters start: "max_abs" (max |w| per channel, or min/max for uniform) or
            "mse" (the threshold / range minimising the weight's quantization error).
        activation_calibration: how `calibrate` sets activation parameters from data: "minmax" (observed
            extremes) or "mse" (minimising the quantization error on a sample of the observed values).
        overrides: per-layer exceptions, a sequence of `LayerOverride` or a dict {pattern: settings};
            when several match a layer they apply in order, later ones winning. A Keras separable convolution,
            which `quantize_model` splits into `<name>_depthwise` and `<name>_pointwise`, is matched by its own
            name and the settings apply to both parts; `skip` keeps it whole, in float.
        fold_batch_norm: fold a BatchNorm that directly follows a convolution or dense / linear layer (its only
            consumer) into that layer's weight and bias from its running statistics, as integer runtimes do,
            before the weight quantizer is initialised; the BatchNorm is removed.
        integer_bias: where a quantized layer's input comes from an activation quantizer (both grids of at most
            8 bits), round its bias to int32 on the grid Δ_in·Δ_w (per output channel) in the forward pass
            (straight-through gradient), as onnxruntime, TensorRT and TFLite store it, and quantize the input of
            every quantized layer; in eval mode the model then computes as the runtime's integer kernels do.
        quantize_matmul_inputs: give both inputs of a product of two activations (matrix products, batched
            matrix products, einsums and attention: `q @ k^T`, `attn @ v`) an activation quantizer, as integer
            runtimes need; an override with `skip=True` on the product's name leaves one product in float.

    Example:
        >>> config = QATConfig(weight_n_bits=4, overrides={"classifier*": {"weight_n_bits": 8}})
        >>> config.for_layer("classifier.0").weight_n_bits
        8
    """

    weight_training_method: Enum | str = TrainingMethod.STE
    activation_training_method: Enum | str = TrainingMethod.STE
    weight_quantization_method: QuantizationMethod = QuantizationMethod.SYMMETRIC
    activation_quantization_method: QuantizationMethod = QuantizationMethod.SYMMETRIC
    weight_n_bits: int = 8
    activation_n_bits: int = 8
    weight_per_channel: bool = True
    quantize_activations: bool = True
    layer_types: tuple[str, ...] | None = None
    min_threshold: float = DEFAULT_MIN_THRESHOLD
    weight_init: str = "max_abs"
    activation_calibration: str = "minmax"
    overrides: tuple[LayerOverride, ...] = ()
    fold_batch_norm: bool = True
    integer_bias: bool = True
    quantize_matmul_inputs: bool = True

    def __post_init__(self) -> None:
        for field in _OVERRIDABLE:
            object.__setattr__(self, field, _check_field(field, getattr(self, field)))
        object.__setattr__(self, "quantize_activations", check_bool("quantize_activations", self.quantize_activations))
        object.__setattr__(self, "layer_types", _check_layer_types(self.layer_types))
        object.__setattr__(self, "min_threshold", check_positive_float("min_threshold", self.min_threshold))
        check_choice("weight_init", self.weight_init, WEIGHT_INITS)
        check_choice("activation_calibration", self.activation_calibration, ACTIVATION_CALIBRATIONS)
        object.__setattr__(self, "overrides", _check_overrides(self.overrides))
        object.__setattr__(self, "fold_batch_norm", check_bool("fold_batch_norm", self.fold_batch_norm))
        object.__setattr__(self, "integer_bias", check_bool("integer_bias", self.integer_bias))
        object.__setattr__(
            self, "quantize_matmul_inputs", check_bool("quantize_matmul_inputs", self.quantize_matmul_inputs))

    def for_layer(self, name: str) -> LayerSettings:
        """The settings of the layer called `name`, with every matching override applied in order."""
        if not isinstance(name, str):
            raise QuantizationConfigError(f"name must be a layer name (str), got {name!r}")
        settings = {field: getattr(self, field) for field in _OVERRIDABLE}
        skip = False
        for override in self.overrides:
            if fnmatchcase(name, override.pattern):
                settings.update({f: getattr(override, f) for f in _OVERRIDABLE if getattr(override, f) is not None})
                skip = skip or override.skip
        return LayerSettings(**settings, skip=skip)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict (enums by name) that `from_dict` inverts."""
        result = {field: _to_json(field, getattr(self, field)) for field in _OVERRIDABLE}
        result.update(
            quantize_activations=self.quantize_activations,
            layer_types=None if self.layer_types is None else list(self.layer_types),
            min_threshold=self.min_threshold,
            weight_init=self.weight_init,
            activation_calibration=self.activation_calibration,
            overrides=[o.to_dict() for o in self.overrides],
            fold_batch_norm=self.fold_batch_norm,
            integer_bias=self.integer_bias,
            quantize_matmul_inputs=self.quantize_matmul_inputs,
        )
        return result

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QATConfig:
        """Build a `QATConfig` from a dict made by `to_dict` (missing keys take their defaults).

        A training method that was a member of a user's own enum comes back as its name (a string), which
        the quantizer resolver matches to that member.
        """
        if not isinstance(d, Mapping):
            raise QuantizationConfigError(f"QATConfig.from_dict expects a dict, got {d!r}")
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(str(k) for k in d if k not in allowed)
        if unknown:
            raise QuantizationConfigError(f"QATConfig.from_dict got unknown keys {unknown}; allowed keys are {allowed}")
        kwargs = {k: _from_json(k, v) if k in _OVERRIDABLE else v for k, v in d.items()}
        if "overrides" in kwargs:
            overrides = kwargs["overrides"]
            if not isinstance(overrides, (list, tuple)):
                raise QuantizationConfigError(f"overrides must be a list of override dicts, got {overrides!r}")
            kwargs["overrides"] = tuple(LayerOverride.from_dict(o) for o in overrides)
        return cls(**kwargs)
