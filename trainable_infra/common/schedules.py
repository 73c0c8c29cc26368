"""Schedules of a value over training steps (framework-neutral, used by both backends)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from trainable_infra.common.config import check_finite_float
from trainable_infra.common.errors import QuantizationConfigError

# Steps are counted in int64 by the frameworks; a larger bound would also overflow float arithmetic on steps.
MAX_STEP = 2**63 - 1


def _step(name: str, value: Any) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or not 0 <= value <= MAX_STEP:
        raise QuantizationConfigError(f"{name} must be an int >= 0, got {value!r} (steps are at most 2**63 - 1)")
    return int(value)


class LinearAnnealing:
    """A value that moves linearly from `initial_value` at step `t_start` to `target_value` at `t_end`.

    Before `t_start` it is `initial_value`, after `t_end` it is `target_value`.

    Example:
        >>> schedule = LinearAnnealing(t_start=0, t_end=100, initial_value=1.0, target_value=0.0)
        >>> schedule(25)
        0.75
    """

    def __init__(self, t_start: int, t_end: int, initial_value: float, target_value: float):
        self.t_start = _step("t_start", t_start)
        self.t_end = _step("t_end", t_end)
        if self.t_end <= self.t_start:
            raise QuantizationConfigError(f"t_end must be greater than t_start ({t_start}), got {t_end!r}")
        self.initial_value = check_finite_float("initial_value", initial_value)
        self.target_value = check_finite_float("target_value", target_value)

    def fraction(self, step: Any, clip: Callable[[Any, float, float], Any] | None = None) -> Any:
        """How far along the schedule `step` is, in [0, 1].

        `step` may be a tensor (give it in float64 so that steps beyond 2^24 stay exact), with `clip(value, 0.0,
        1.0)` the framework's clip (e.g. `torch.clamp`, `tf.clip_by_value`): the value is then computed inside
        the framework, where a traced training step can read a step counter variable.
        """
        fraction = (step - self.t_start) / (self.t_end - self.t_start)
        return min(max(fraction, 0.0), 1.0) if clip is None else clip(fraction, 0.0, 1.0)

    def __call__(self, step: Any, clip: Callable[[Any, float, float], Any] | None = None) -> Any:
        """The value at `step` (a number, or a tensor with its framework's `clip`, as in `fraction`)."""
        return self.initial_value + self.fraction(step, clip) * (self.target_value - self.initial_value)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable description that `from_dict` inverts."""
        return {
            "t_start": self.t_start,
            "t_end": self.t_end,
            "initial_value": self.initial_value,
            "target_value": self.target_value,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LinearAnnealing:
        """Build a schedule from a dict made by `to_dict`."""
        if not isinstance(d, Mapping) or set(d) != {"t_start", "t_end", "initial_value", "target_value"}:
            raise QuantizationConfigError(
                f"LinearAnnealing.from_dict expects keys t_start, t_end, initial_value, target_value; got {d!r}"
            )
        return cls(**d)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LinearAnnealing) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items())
        return f"LinearAnnealing({args})"
