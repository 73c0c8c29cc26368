"""Per-tensor quantizer configurations: what a trainable quantizer is asked to do.

The constructors mirror MCT's `TrainableQuantizerWeightsConfig` / `TrainableQuantizerActivationConfig` /
`TrainableQuantizerCandidateConfig`, so code written for MCT builds the same objects. Values are validated
once, here; quantizers trust them afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from trainable_infra.common.errors import QuantizationConfigError
from trainable_infra.common.mct import QuantizationMethod
from trainable_infra.common.numerics import DEFAULT_MIN_THRESHOLD

# The quantization-params keys, under MCT's constant names (`SIGNED` is MCT's name for `IS_SIGNED`).
THRESHOLD = "threshold"
IS_SIGNED = "is_signed"
SIGNED = IS_SIGNED
RANGE_MIN = "range_min"
RANGE_MAX = "range_max"
# The default smallest threshold (MCT's `MIN_THRESHOLD`): `QATConfig.min_threshold` and the numerics' default.
MIN_THRESHOLD = DEFAULT_MIN_THRESHOLD

MIN_N_BITS = 2
MAX_N_BITS = 16
# Parameters holding numbers: stored as a float (scalar) or a float64 array (per-channel), lists in JSON.
_NUMERIC_PARAMS = (THRESHOLD, RANGE_MIN, RANGE_MAX)
# Extra (non-standard) quantization parameters may nest lists this deep; deeper is refused, not recursed into.
MAX_NESTING = 32


# ---------------------------------------------------------------------------------------------------------
# Field checks. Each returns the normalized value or raises QuantizationConfigError naming the argument.
# ---------------------------------------------------------------------------------------------------------


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _finite_float(value: Any) -> float | None:
    """`value` as a float if it is a real number that a float holds finitely, else None (an int too large for a
    float included, which `float()` would raise OverflowError on)."""
    if not _is_real(value):
        return None
    try:
        result = float(value)
    except OverflowError:
        return None
    return result if math.isfinite(result) else None


def check_n_bits(name: str, value: Any) -> int:
    """Return `value` as an int if it is a bit width in 2..16, else raise."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)):
        raise QuantizationConfigError(
            f"{name} must be an int in {MIN_N_BITS}..{MAX_N_BITS}, got {value!r} of type {type(value).__name__}"
        )
    if not MIN_N_BITS <= int(value) <= MAX_N_BITS:
        raise QuantizationConfigError(f"{name} must be an int in {MIN_N_BITS}..{MAX_N_BITS}, got {value!r}")
    return int(value)


def check_bool(name: str, value: Any) -> bool:
    """Return `value` if it is a bool, else raise."""
    if not isinstance(value, (bool, np.bool_)):
        raise QuantizationConfigError(f"{name} must be a bool, got {value!r} of type {type(value).__name__}")
    return bool(value)


def check_method(name: str, value: Any) -> QuantizationMethod:
    """Return `value` if it is a `QuantizationMethod` member, else raise."""
    if not isinstance(value, QuantizationMethod):
        allowed = ", ".join(f"QuantizationMethod.{m.name}" for m in QuantizationMethod)
        raise QuantizationConfigError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def check_finite_float(name: str, value: Any) -> float:
    """Return `value` as a float if it is a finite real number, else raise."""
    result = _finite_float(value)
    if result is None:
        raise QuantizationConfigError(f"{name} must be a finite number, got {value!r}")
    return result


def check_positive_float(name: str, value: Any) -> float:
    """Return `value` as a float if it is a finite number > 0, else raise."""
    result = _finite_float(value)
    if result is None or result <= 0:
        raise QuantizationConfigError(f"{name} must be a finite number > 0, got {value!r}")
    return result


def check_choice(name: str, value: Any, allowed: Sequence[str]) -> str:
    """Return `value` if it is one of the strings `allowed`, else raise."""
    if not isinstance(value, str) or value not in allowed:
        raise QuantizationConfigError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
    return value


def check_optional_count(name: str, value: Any) -> int | None:
    """Return `value` if it is None or an int >= 1 (a number of batches, where None means all), else raise."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise QuantizationConfigError(f"{name} must be a positive int or None (all batches), got {value!r}")
    return int(value)


def method_from_name(name: str, value: Any) -> QuantizationMethod:
    """Return the `QuantizationMethod` whose name is `value` (as written by `to_dict`), else raise."""
    if isinstance(value, QuantizationMethod):
        return value
    if isinstance(value, str) and value in QuantizationMethod.__members__:
        return QuantizationMethod[value]
    allowed = ", ".join(repr(m.name) for m in QuantizationMethod)
    raise QuantizationConfigError(f"{name} must be one of {allowed}, got {value!r}")


def _numeric_param(name: str, value: Any) -> float | np.ndarray:
    """A threshold or range value: a real scalar (-> float) or a non-empty real array (-> float64 copy)."""
    if _is_real(value):
        scalar = _finite_float(value)
        if scalar is None:
            raise QuantizationConfigError(f"{name} must be finite, got {value!r}")
        return scalar
    if not isinstance(value, (list, tuple, np.ndarray)):
        raise QuantizationConfigError(
            f"{name} must be a number or an array of numbers, got {value!r} of type {type(value).__name__}"
        )
    try:
        array = np.array(value)
    except (ValueError, TypeError) as exc:
        raise QuantizationConfigError(f"{name} must be a rectangular array of numbers, got {value!r}") from exc
    if array.dtype.kind not in "iuf" or array.size == 0:
        raise QuantizationConfigError(f"{name} must be a non-empty array of numbers, got {value!r}")
    result = array.astype(np.float64)
    if not np.all(np.isfinite(result)):
        raise QuantizationConfigError(f"{name} must be finite, got {value!r}")
    return result


def _json_value(name: str, value: Any, depth: int = 0) -> Any:
    """An extra (non-standard) quantization parameter: kept if it is plain data that survives JSON.

    Non-finite numbers are refused: strict JSON has no NaN or Infinity, and a NaN would make a config unequal
    to its own round trip.
    """
    if isinstance(value, (float, np.floating)) and not math.isfinite(value):
        raise QuantizationConfigError(f"{name} must be a finite number, got {value!r}")
    if value is None or isinstance(value, (bool, np.bool_, str)) or _is_real(value):
        return value.item() if isinstance(value, np.generic) else value
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise QuantizationConfigError(f"{name} must hold numbers, got an array of dtype {value.dtype}")
        if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
            raise QuantizationConfigError(f"{name} must hold finite numbers, got {value!r}")
        return value.copy()
    if isinstance(value, (list, tuple)):
        if depth >= MAX_NESTING:
            raise QuantizationConfigError(f"{name} nests lists more than {MAX_NESTING} deep")
        return [_json_value(f"{name}[{i}]", v, depth + 1) for i, v in enumerate(value)]
    raise QuantizationConfigError(
        f"{name} must be a number, bool, string, None, array or list of those, got {value!r} "
        f"of type {type(value).__name__}"
    )


def check_quantization_params(name: str, params: Any) -> dict[str, Any]:
    """Validate and copy a quantization-params dict (MCT keys: threshold, is_signed, range_min, range_max)."""
    if not isinstance(params, Mapping):
        raise QuantizationConfigError(
            f"{name} must be a dict of quantization parameters, got {params!r} of type {type(params).__name__}"
        )
    result: dict[str, Any] = {}
    for key, value in params.items():
        if not isinstance(key, str):
            raise QuantizationConfigError(f"{name} keys must be strings, got {key!r}")
        if key in _NUMERIC_PARAMS:
            result[key] = _numeric_param(f"{name}[{key!r}]", value)
        elif key == IS_SIGNED:
            result[key] = check_bool(f"{name}[{key!r}]", value)
        else:
            result[key] = _json_value(f"{name}[{key!r}]", value)
    if THRESHOLD in result and np.any(np.asarray(result[THRESHOLD]) <= 0):
        raise QuantizationConfigError(f"{name}[{THRESHOLD!r}] must be > 0, got {params[THRESHOLD]!r}")
    if RANGE_MIN in result and RANGE_MAX in result:
        low, high = np.asarray(result[RANGE_MIN]), np.asarray(result[RANGE_MAX])
        try:
            ordered = bool(np.all(low < high))
        except ValueError as exc:
            raise QuantizationConfigError(
                f"{name}: range_min {params[RANGE_MIN]!r} and range_max {params[RANGE_MAX]!r} have "
                f"incompatible shapes {low.shape} and {high.shape}"
            ) from exc
        if not ordered:
            raise QuantizationConfigError(
                f"{name}: range_min must be < range_max everywhere, got range_min={params[RANGE_MIN]!r}, "
                f"range_max={params[RANGE_MAX]!r}"
            )
    return result


def _check_per_tensor(name: str, params: dict[str, Any]) -> None:
    for key in _NUMERIC_PARAMS:
        if key in params and np.size(params[key]) != 1:
            raise QuantizationConfigError(
                f"{name}[{key!r}] must hold one value for per-tensor quantization, got {np.size(params[key])} "
                f"values: {params[key]!r}"
            )


def _to_json(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_json(v) for v in value]
    return value


def values_equal(a: Any, b: Any) -> bool:
    """Equality that compares arrays element-wise (and by shape) and recurses into dicts and lists."""
    if isinstance(a, dict) or isinstance(b, dict):
        return (
            isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys()
            and all(values_equal(a[k], b[k]) for k in a)
        )
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(np.asarray(a), np.asarray(b))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(values_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _repr_value(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"array({value.tolist()!r})"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_repr_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, QuantizationMethod):
        return f"QuantizationMethod.{value.name}"
    return repr(value)


# ---------------------------------------------------------------------------------------------------------
# Config classes
# ---------------------------------------------------------------------------------------------------------


class _Config:
    """Shared value semantics: `to_dict` / `from_dict`, element-wise `==`, readable `repr`."""

    KIND: ClassVar[str]
    # Constructor argument names in order; optional ones (with defaults) are listed in _OPTIONAL.
    _FIELDS: ClassVar[tuple[str, ...]]
    _OPTIONAL: ClassVar[tuple[str, ...]] = ()
    _METHOD_FIELD: ClassVar[str | None] = None
    _CANDIDATES_FIELD: ClassVar[str | None] = None

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serializable dict (enums by name, arrays as nested lists) that `from_dict` inverts."""
        result: dict[str, Any] = {"kind": self.KIND}
        for field in self._FIELDS:
            value = getattr(self, field)
            if field == self._METHOD_FIELD:
                value = value.name
            elif field == self._CANDIDATES_FIELD and value is not None:
                value = [candidate.to_dict() for candidate in value]
            result[field] = _to_json(value)
        return result

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> _Config:
        """Build a config from a dict made by `to_dict` (the `kind` key may be omitted)."""
        if not isinstance(d, Mapping):
            raise QuantizationConfigError(
                f"{cls.__name__}.from_dict expects a dict, got {d!r} of type {type(d).__name__}"
            )
        kind = d.get("kind", cls.KIND)
        if not isinstance(kind, str) or kind != cls.KIND:
            raise QuantizationConfigError(
                f"{cls.__name__}.from_dict expects kind {cls.KIND!r}, got kind {kind!r}"
            )
        fields = {k: v for k, v in d.items() if k != "kind"}
        unknown = sorted(str(k) for k in fields if k not in cls._FIELDS)
        if unknown:
            raise QuantizationConfigError(
                f"{cls.__name__}.from_dict got unknown keys {unknown}; allowed keys are {list(cls._FIELDS)}"
            )
        missing = [f for f in cls._FIELDS if f not in fields and f not in cls._OPTIONAL]
        if missing:
            raise QuantizationConfigError(f"{cls.__name__}.from_dict is missing keys {missing}")
        if cls._METHOD_FIELD is not None:
            fields[cls._METHOD_FIELD] = method_from_name(cls._METHOD_FIELD, fields[cls._METHOD_FIELD])
        candidates_field = cls._CANDIDATES_FIELD
        if candidates_field is not None and fields.get(candidates_field) is not None:
            candidates = fields[candidates_field]
            if not isinstance(candidates, (list, tuple)):
                raise QuantizationConfigError(
                    f"{candidates_field} must be a list of candidate dicts or None, got {candidates!r}"
                )
            fields[candidates_field] = [
                c if isinstance(c, TrainableQuantizerCandidateConfig)
                else TrainableQuantizerCandidateConfig.from_dict(c)
                for c in candidates
            ]
        return cls(**fields)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(values_equal(getattr(self, f), getattr(other, f)) for f in self._FIELDS)

    __hash__ = None  # mutable value objects with array members: not hashable

    def __repr__(self) -> str:
        args = ", ".join(f"{f}={_repr_value(getattr(self, f))}" for f in self._FIELDS)
        return f"{type(self).__name__}({args})"


def _check_candidates(name: str, value: Any) -> list[TrainableQuantizerCandidateConfig] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(c, TrainableQuantizerCandidateConfig) for c in value):
        raise QuantizationConfigError(
            f"{name} must be None or a list of TrainableQuantizerCandidateConfig, got {value!r}"
        )
    return list(value)


class TrainableQuantizerCandidateConfig(_Config):
    """One bit-width candidate (for mixed-precision training): its n_bits and quantization params."""

    KIND = "candidate"
    _FIELDS = ("n_bits", "quantization_params")

    def __init__(self, n_bits: int, quantization_params: Mapping[str, Any]):
        self.n_bits = check_n_bits("n_bits", n_bits)
        self.quantization_params = check_quantization_params("quantization_params", quantization_params)


class TrainableQuantizerWeightsConfig(_Config):
    """How to quantize one weight tensor.

    Args:
        weights_quantization_method: a `QuantizationMethod`.
        weights_n_bits: bit width, 2..16.
        weights_quantization_params: MCT-style dict: `threshold` (symmetric / power-of-two) or
            `range_min` / `range_max` (uniform); per-channel values as a 1-D array of length C or an array
            already shaped for broadcasting.
        enable_weights_quantization: whether the weight is quantized at all.
        weights_channels_axis: the channel axis (an int; may be None only for per-tensor quantization).
        weights_per_channel_threshold: per-channel (True) or per-tensor (False) parameters.
        min_threshold: smallest threshold used, > 0.
        weights_quantization_candidates: optional bit-width candidates.
    """

    KIND = "weights"
    _FIELDS = (
        "weights_quantization_method",
        "weights_n_bits",
        "weights_quantization_params",
        "enable_weights_quantization",
        "weights_channels_axis",
        "weights_per_channel_threshold",
        "min_threshold",
        "weights_quantization_candidates",
    )
    _OPTIONAL = ("weights_quantization_candidates",)
    _METHOD_FIELD = "weights_quantization_method"
    _CANDIDATES_FIELD = "weights_quantization_candidates"

    def __init__(
        self,
        weights_quantization_method: QuantizationMethod,
        weights_n_bits: int,
        weights_quantization_params: Mapping[str, Any],
        enable_weights_quantization: bool,
        weights_channels_axis: int | None,
        weights_per_channel_threshold: bool,
        min_threshold: float,
        weights_quantization_candidates: Sequence[TrainableQuantizerCandidateConfig] | None = None,
    ):
        self.weights_quantization_method = check_method("weights_quantization_method", weights_quantization_method)
        self.weights_n_bits = check_n_bits("weights_n_bits", weights_n_bits)
        self.weights_quantization_params = check_quantization_params(
            "weights_quantization_params", weights_quantization_params
        )
        self.enable_weights_quantization = check_bool("enable_weights_quantization", enable_weights_quantization)
        self.weights_per_channel_threshold = check_bool(
            "weights_per_channel_threshold", weights_per_channel_threshold
        )
        if weights_channels_axis is None:
            if self.weights_per_channel_threshold:
                raise QuantizationConfigError(
                    "weights_channels_axis must be an int when weights_per_channel_threshold is True, got None"
                )
        elif not isinstance(weights_channels_axis, (int, np.integer)) or isinstance(
            weights_channels_axis, (bool, np.bool_)
        ):
            raise QuantizationConfigError(
                f"weights_channels_axis must be an int (or None for per-tensor quantization), got "
                f"{weights_channels_axis!r} of type {type(weights_channels_axis).__name__}"
            )
        self.weights_channels_axis = None if weights_channels_axis is None else int(weights_channels_axis)
        if not self.weights_per_channel_threshold:
            _check_per_tensor("weights_quantization_params", self.weights_quantization_params)
        self.min_threshold = check_positive_float("min_threshold", min_threshold)
        self.weights_quantization_candidates = _check_candidates(
            "weights_quantization_candidates", weights_quantization_candidates
        )

    @property
    def weights_bits_candidates(self) -> list[TrainableQuantizerCandidateConfig] | None:
        """MCT's name of `weights_quantization_candidates`."""
        return self.weights_quantization_candidates

    @weights_bits_candidates.setter
    def weights_bits_candidates(self, value: Sequence[TrainableQuantizerCandidateConfig] | None) -> None:
        self.weights_quantization_candidates = _check_candidates("weights_bits_candidates", value)


class TrainableQuantizerActivationConfig(_Config):
    """How to quantize one activation tensor (always per-tensor).

    Args:
        activation_quantization_method: a `QuantizationMethod`.
        activation_n_bits: bit width, 2..16.
        activation_quantization_params: MCT-style dict: `threshold` and `is_signed` (symmetric /
            power-of-two) or `range_min` / `range_max` (uniform), one value each.
        enable_activation_quantization: whether the activation is quantized at all.
        min_threshold: smallest threshold used, > 0.
        activation_quantization_candidates: optional bit-width candidates.
    """

    KIND = "activation"
    _FIELDS = (
        "activation_quantization_method",
        "activation_n_bits",
        "activation_quantization_params",
        "enable_activation_quantization",
        "min_threshold",
        "activation_quantization_candidates",
    )
    _OPTIONAL = ("activation_quantization_candidates",)
    _METHOD_FIELD = "activation_quantization_method"
    _CANDIDATES_FIELD = "activation_quantization_candidates"

    def __init__(
        self,
        activation_quantization_method: QuantizationMethod,
        activation_n_bits: int,
        activation_quantization_params: Mapping[str, Any],
        enable_activation_quantization: bool,
        min_threshold: float,
        activation_quantization_candidates: Sequence[TrainableQuantizerCandidateConfig] | None = None,
    ):
        self.activation_quantization_method = check_method(
            "activation_quantization_method", activation_quantization_method
        )
        self.activation_n_bits = check_n_bits("activation_n_bits", activation_n_bits)
        self.activation_quantization_params = check_quantization_params(
            "activation_quantization_params", activation_quantization_params
        )
        _check_per_tensor("activation_quantization_params", self.activation_quantization_params)
        self.enable_activation_quantization = check_bool(
            "enable_activation_quantization", enable_activation_quantization
        )
        self.min_threshold = check_positive_float("min_threshold", min_threshold)
        self.activation_quantization_candidates = _check_candidates(
            "activation_quantization_candidates", activation_quantization_candidates
        )

    @property
    def activation_bits_candidates(self) -> list[TrainableQuantizerCandidateConfig] | None:
        """MCT's name of `activation_quantization_candidates`."""
        return self.activation_quantization_candidates

    @activation_bits_candidates.setter
    def activation_bits_candidates(self, value: Sequence[TrainableQuantizerCandidateConfig] | None) -> None:
        self.activation_quantization_candidates = _check_candidates("activation_bits_candidates", value)


TrainableQuantizerConfig = TrainableQuantizerWeightsConfig | TrainableQuantizerActivationConfig
_CONFIG_CLASSES = {
    cls.KIND: cls
    for cls in (TrainableQuantizerWeightsConfig, TrainableQuantizerActivationConfig, TrainableQuantizerCandidateConfig)
}


def config_from_dict(d: Mapping[str, Any]) -> _Config:
    """Rebuild a weights, activation or candidate config from a dict made by its `to_dict()`."""
    if not isinstance(d, Mapping):
        raise QuantizationConfigError(f"config_from_dict expects a dict, got {d!r} of type {type(d).__name__}")
    kind = d.get("kind")
    if not isinstance(kind, str) or kind not in _CONFIG_CLASSES:
        raise QuantizationConfigError(
            f"config_from_dict: 'kind' must be one of {sorted(_CONFIG_CLASSES)}, got {kind!r}"
        )
    return _CONFIG_CLASSES[kind].from_dict(d)
