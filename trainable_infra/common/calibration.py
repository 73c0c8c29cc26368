"""Initial quantization parameters: weights from their values, activations from observed data.

Both backends call these with numpy arrays, so a model quantized with Keras and the same model quantized with
PyTorch start from the same parameters.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from trainable_infra.common.config import IS_SIGNED, RANGE_MAX, RANGE_MIN, THRESHOLD
from trainable_infra.common.errors import QuantizationConfigError
from trainable_infra.common.mct import QuantizationMethod
from trainable_infra.common.numerics import max_abs_threshold, min_max_range, mse_range, mse_threshold

WEIGHT_INITS = ("max_abs", "mse")
ACTIVATION_CALIBRATIONS = ("minmax", "mse")
# Activation parameters used when no representative data is given: a threshold of 8 covers the usual range
# of normalized activations; calibrate() replaces them from data.
DEFAULT_ACTIVATION_THRESHOLD = 8.0


def weight_quant_params(
    weight: np.ndarray,
    method: QuantizationMethod,
    n_bits: int,
    channel_axis: int | None,
    init: str = "max_abs",
    min_threshold: float = 2.0**-16,
) -> dict[str, Any]:
    """Quantization params for a weight tensor: per-channel along `channel_axis`, or per-tensor if None."""
    weight = np.asarray(weight, dtype=np.float32)
    if init not in WEIGHT_INITS:
        raise QuantizationConfigError(f"weight_init must be one of {WEIGHT_INITS}, got {init!r}")
    if method is QuantizationMethod.UNIFORM:
        if init == "mse":
            low, high = mse_range(weight, n_bits, channel_axis=channel_axis)
        else:
            low, high = min_max_range(weight, channel_axis)
        return {RANGE_MIN: low, RANGE_MAX: high}
    if method in (QuantizationMethod.SYMMETRIC, QuantizationMethod.POWER_OF_TWO):
        if init == "mse":
            threshold = mse_threshold(
                weight, n_bits, True, channel_axis=channel_axis, min_threshold=min_threshold,
                power_of_two=method is QuantizationMethod.POWER_OF_TWO,
            )
        else:
            threshold = max_abs_threshold(weight, channel_axis, min_threshold)
        return {THRESHOLD: threshold}
    raise QuantizationConfigError(
        f"weight quantization method must be SYMMETRIC, POWER_OF_TWO or UNIFORM, got {method!r}"
    )


def default_activation_params(method: QuantizationMethod, signed: bool) -> dict[str, Any]:
    """Activation params without data: threshold DEFAULT_ACTIVATION_THRESHOLD (or that range)."""
    t = DEFAULT_ACTIVATION_THRESHOLD
    if method is QuantizationMethod.UNIFORM:
        return {RANGE_MIN: -t if signed else 0.0, RANGE_MAX: t}
    return {THRESHOLD: t, IS_SIGNED: signed}


class ActivationObserver:
    """Running statistics of one activation over calibration batches.

    Tracks the minimum and maximum and, for the "mse" calibration, a uniform random sample of the values
    (at most `max_samples`), from which the MSE-optimal threshold or range is searched.
    """

    def __init__(self, calibration: str = "minmax", max_samples: int = 1 << 16, seed: int = 0):
        if calibration not in ACTIVATION_CALIBRATIONS:
            raise QuantizationConfigError(
                f"activation_calibration must be one of {ACTIVATION_CALIBRATIONS}, got {calibration!r}"
            )
        self.calibration = calibration
        self.max_samples = max_samples
        self.minimum = np.inf
        self.maximum = -np.inf
        self.count = 0
        self._samples: list[np.ndarray] = []
        self._rng = np.random.default_rng(seed)

    def update(self, values: np.ndarray) -> None:
        """Add the values of one batch."""
        values = np.asarray(values, dtype=np.float32).reshape(-1)
        values = values[np.isfinite(values)]
        if values.size == 0:
            return
        self.minimum = min(self.minimum, float(values.min()))
        self.maximum = max(self.maximum, float(values.max()))
        self.count += values.size
        if self.calibration == "mse":
            keep = min(values.size, self.max_samples)
            self._samples.append(self._rng.choice(values, keep, replace=False) if keep < values.size else values)
            pool = np.concatenate(self._samples)
            if pool.size > self.max_samples:
                pool = self._rng.choice(pool, self.max_samples, replace=False)
            self._samples = [pool]

    @property
    def signed(self) -> bool:
        """Whether negative values were seen."""
        return self.minimum < 0

    def quant_params(self, method: QuantizationMethod, n_bits: int, min_threshold: float = 2.0**-16) -> dict:
        """Quantization params (with `is_signed` for symmetric methods) fitted to what was observed."""
        if self.count == 0:
            raise QuantizationConfigError("no finite activation values were observed; give representative data")
        if method is QuantizationMethod.UNIFORM:
            if self.calibration == "mse":
                low, high = mse_range(self._samples[0], n_bits)
            else:
                low, high = min_max_range(np.array([self.minimum, self.maximum], np.float32))
            return {RANGE_MIN: float(low), RANGE_MAX: float(high)}
        if self.calibration == "mse":
            threshold = mse_threshold(
                self._samples[0], n_bits, self.signed, min_threshold=min_threshold,
                power_of_two=method is QuantizationMethod.POWER_OF_TWO,
            )
        else:
            threshold = max(abs(self.minimum), abs(self.maximum), min_threshold)
        return {THRESHOLD: float(threshold), IS_SIGNED: self.signed}
