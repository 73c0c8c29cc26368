"""`check_finite`: an opt-in debugging mode in which the quantizers of both backends check their values.

With the mode on, each trainable weights wrapper and activation holder checks, on every call, the tensor its
quantizer receives and the quantizer's variables, and raises `NonFiniteError` naming the layer, the quantizer and
the tensor when one holds NaN or ±Inf, when a threshold is <= 0, or when a range has range_max <= range_min.
With the mode off (the default) a wrapper or holder reads one attribute, `FINITE_CHECKS.enabled`, and does
nothing else; under `torch.compile` that read is a guard, so nothing of the checks is traced.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from trainable_infra.common.config import RANGE_MAX, RANGE_MIN, THRESHOLD, check_bool
from trainable_infra.common.errors import NonFiniteError


class _FiniteChecks:
    """Whether the checks run, and what the backends do while they run."""

    __slots__ = ("_backend_modes", "_entered", "enabled")

    def __init__(self) -> None:
        self.enabled = False
        # Context-manager factories a backend registers to switch its framework into a mode the checks need
        # (Keras: TensorFlow functions run eagerly, so that a check raises from `model.fit` itself).
        self._backend_modes: list[Callable[[], contextlib.AbstractContextManager]] = []
        self._entered = contextlib.ExitStack()

    def set(self, enabled: bool) -> None:
        """Turn the checks on or off, entering or leaving the backends' modes."""
        if enabled == self.enabled:
            return
        if enabled:
            for mode in self._backend_modes:
                self._entered.enter_context(mode())
        else:
            self._entered.close()
        self.enabled = enabled

    def add_backend_mode(self, mode: Callable[[], contextlib.AbstractContextManager]) -> None:
        """Register a factory of the context a backend's framework runs in while the checks are on."""
        self._backend_modes.append(mode)
        if self.enabled:
            self._entered.enter_context(mode())


FINITE_CHECKS = _FiniteChecks()


class _Restore(contextlib.AbstractContextManager):
    """Puts the previous state back when a `with check_finite(...)` block ends."""

    def __init__(self, previous: bool) -> None:
        self._previous = previous

    def __exit__(self, *exc_info: Any) -> None:
        FINITE_CHECKS.set(self._previous)


def check_finite(enabled: bool = True) -> contextlib.AbstractContextManager:
    """Turn the quantizers' checks for NaN, ±Inf, thresholds <= 0 and empty ranges on or off.

    Works as a function (the setting stays until changed) or as a context manager (the previous setting
    comes back at the end of the block). While on, every trainable weights wrapper and activation holder of
    both backends raises `NonFiniteError` naming the layer, the quantizer and the tensor when the tensor its
    quantizer receives holds NaN or ±Inf, or when one of the quantizer's variables is not finite, a threshold
    is <= 0 or a range has range_max <= range_min. Each check reads the values back from the device, so
    training runs slower; off (the default), it costs nothing. In Keras, TensorFlow functions run eagerly
    while the checks are on, so that `model.fit` raises `NonFiniteError` itself.

    Args:
        enabled: True to turn the checks on, False to turn them off.

    Returns:
        A context manager that restores the previous setting on exit.

    Example:
        >>> with check_finite():  # doctest: +SKIP
        ...     loss = loss_fn(model(x), y)  # raises NonFiniteError at the first quantizer that meets a NaN
    """
    previous = FINITE_CHECKS.enabled
    FINITE_CHECKS.set(check_bool("enabled", enabled))
    return _Restore(previous)


def _summary(values: np.ndarray) -> str:
    """'2 NaN, 1 +Inf of 640 values, the first at index (0, 3)'."""
    counts = [(int(np.isnan(values).sum()), "NaN"), (int(np.isposinf(values).sum()), "+Inf"),
              (int(np.isneginf(values).sum()), "-Inf")]
    found = ", ".join(f"{count} {name}" for count, name in counts if count)
    first = np.unravel_index(int(np.flatnonzero(~np.isfinite(values))[0]), values.shape) if values.ndim else ()
    where = f", the first at index {tuple(int(i) for i in first)}" if values.ndim else ""
    return f"{found} of {values.size} values{where}"


def check_input(owner: str, tensor: str, values: np.ndarray) -> None:
    """Raise `NonFiniteError` if `values` (the tensor called `tensor` that `owner` quantizes) holds NaN or ±Inf."""
    values = np.asarray(values)
    if not np.all(np.isfinite(values)):
        raise NonFiniteError(f"check_finite: {owner} received {tensor} with {_summary(values)}")


def check_parameters(owner: str, parameters: Mapping[str, np.ndarray]) -> None:
    """Raise `NonFiniteError` if a quantizer variable of `owner` is not finite, a variable named `*threshold` is
    <= 0, or a pair `*range_min` / `*range_max` has range_max <= range_min (in any channel)."""
    for name, values in parameters.items():
        values = np.asarray(values)
        if not np.all(np.isfinite(values)):
            raise NonFiniteError(f"check_finite: {owner} has variable {name!r} with {_summary(values)}")
    for name, values in parameters.items():
        values = np.asarray(values)
        if name.endswith(THRESHOLD) and np.any(values <= 0):
            raise NonFiniteError(
                f"check_finite: {owner} has variable {name!r} <= 0: {values.tolist()}; a threshold must be > 0 "
                "(the grid uses max(threshold, min_threshold), and the threshold no longer trains)"
            )
        if name.endswith(RANGE_MIN):
            high_name = name[: -len(RANGE_MIN)] + RANGE_MAX
            high = parameters.get(high_name)
            if high is not None and np.any(np.asarray(high) <= values):
                raise NonFiniteError(
                    f"check_finite: {owner} has an empty range: {high_name!r} = {np.asarray(high).tolist()} is not "
                    f"above {name!r} = {values.tolist()}; a range needs range_max > range_min"
                )
