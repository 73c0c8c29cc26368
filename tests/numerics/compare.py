"""Comparisons of quantized tensors under DESIGN.md §4's exactness rules.

Rule 2 (and rule 3, which uses its tolerance): two outputs agree when they are equal up to a few float32
ulps, except where the input lies within float rounding of a rounding tie, where they may differ by exactly one
step Δ. `rule2_errors` measures a pair of outputs against that rule without raising (the parity report prints
it); `assert_rule2` raises with a message that names the case and the first offending element.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# |frac(u) - 0.5| below this counts as "within float rounding of a tie" for |u| <= 2^16 in float32.
TIE_TOLERANCE = 1e-2
# Fused kernels may round the final product (k - z)·Δ differently from the reference's float32 ops: torch's
# CUDA kernel by up to 1 ulp, TensorFlow's op (whose step is (max - min)/(2^n - 1)) by up to 2.
ULPS = 4


def near_ties(steps: np.ndarray, window: float = TIE_TOLERANCE) -> np.ndarray:
    """Where `steps` (input / Δ, plus the zero point) is within `window` of a rounding tie."""
    steps = np.asarray(steps, dtype=np.float64)
    return np.abs(steps - np.floor(steps) - 0.5) < window


def ulp(values: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """The spacing of `dtype` at |values| (float64 result; the smallest subnormal at 0)."""
    return np.spacing(np.abs(np.asarray(values, dtype=np.float64)).astype(dtype)).astype(np.float64)


@dataclasses.dataclass(frozen=True)
class Rule2Errors:
    """How far `actual` is from `expected`, measured as rule 2 measures it.

    Attributes:
        ulps: the worst difference away from ties, in float32 ulps of the larger of the two values.
        steps: the worst difference anywhere, in units of Δ.
        steps_away: the worst difference away from ties, in units of Δ.
        tie_steps: the number of elements (all within float rounding of a tie) that differ by one step Δ.
        violations: the number of elements that break rule 2 with the given ulp budget.
        first: a description of the first violation ("" when there is none).
    """

    ulps: float
    steps: float
    steps_away: float
    tie_steps: int
    violations: int
    first: str


def rule2_errors(actual, expected, steps, delta, ulps: float = ULPS, tie_window: float = TIE_TOLERANCE,
                 equal_nan: bool = False) -> Rule2Errors:
    """Measure `actual` against `expected` under rule 2 (see the module docstring).

    Args:
        actual, expected: arrays of the same shape.
        steps: the input in units of Δ from the grid's zero (x/Δ + z), which locates the rounding ties.
        delta: Δ, broadcastable to the arrays.
        ulps: the budget in float32 ulps away from ties.
        tie_window: how close to a tie (in steps) counts as within float rounding of it.
        equal_nan: whether NaN in both at the same place counts as equal.
    """
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    delta = np.broadcast_to(np.asarray(delta, dtype=np.float64), actual.shape)
    steps = np.broadcast_to(np.asarray(steps, dtype=np.float64), actual.shape)
    both_nan = np.isnan(actual) & np.isnan(expected) if equal_nan else np.zeros(actual.shape, bool)
    same = (actual == expected) | both_nan
    diff = np.where(same, 0.0, np.abs(actual - expected))
    diff = np.where(np.isnan(diff), np.inf, diff)
    ties = near_ties(steps, tie_window)
    spacing = ulp(np.maximum(np.abs(np.nan_to_num(expected)), np.abs(np.nan_to_num(actual))))
    in_ulps = diff / spacing
    rounding = in_ulps <= ulps
    # Two correctly rounded values one step apart differ from Δ by up to an ulp themselves.
    one_step = ties & (np.abs(diff - delta) <= 1e-5 * delta + (ulps + 1) * spacing)
    bad = ~(rounding | one_step)
    first = ""
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        first = (f"first at {index}: got {actual[index]!r}, expected {expected[index]!r} (Δ={delta[index]!r}, "
                 f"input/Δ={steps[index]!r})")
    return Rule2Errors(
        ulps=float(np.where(ties, 0.0, in_ulps).max(initial=0.0)),
        steps=float((diff / delta).max(initial=0.0)),
        steps_away=float(np.where(ties, 0.0, diff / delta).max(initial=0.0)),
        tie_steps=int((one_step & ~rounding).sum()),
        violations=int(bad.sum()),
        first=first,
    )


def assert_rule2(actual, expected, steps, delta, case: str, ulps: float = ULPS,
                 tie_window: float = TIE_TOLERANCE, equal_nan: bool = False) -> float:
    """Assert rule 2: equal up to `ulps` float32 ulps, except near a tie where one step Δ is allowed.

    Returns the largest difference away from ties (0.0 when the match is exact).
    """
    errors = rule2_errors(actual, expected, steps, delta, ulps, tie_window, equal_nan)
    if errors.violations:
        raise AssertionError(
            f"{case}: {errors.violations} of {np.size(actual)} outputs differ beyond rule 2 ({ulps} ulps, or one "
            f"step Δ within {tie_window} steps of a tie); {errors.first}"
        )
    actual = np.asarray(actual, dtype=np.float64)
    away = ~near_ties(np.broadcast_to(steps, actual.shape), tie_window)
    diff = np.abs(actual - np.asarray(expected, dtype=np.float64))
    if equal_nan:
        diff = np.nan_to_num(diff, nan=0.0)
    return float(diff[away].max(initial=0.0))


def assert_within(actual, expected, allowed, x, case: str) -> None:
    """Assert |actual - expected| <= allowed element-wise (NaN in both counts as equal)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    diff = np.abs(actual - expected)
    bad = ~((diff <= allowed) | (np.isnan(actual) & np.isnan(expected)))
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        raise AssertionError(
            f"{case}: {int(bad.sum())} of {np.size(actual)} outputs differ by more than allowed; first at x="
            f"{np.asarray(x)[index]!r}: got {actual[index]!r}, expected {expected[index]!r} (allowed "
            f"{np.broadcast_to(allowed, actual.shape)[index]!r})"
        )


def probe_inputs(rng: np.random.Generator, shape: tuple[int, ...], delta: np.ndarray, low: np.ndarray,
                 high: np.ndarray) -> np.ndarray:
    """Random values over and beyond the range, with exact grid points, ties and the range ends mixed in.

    `delta`, `low` and `high` broadcast against `shape`.
    """
    delta, low, high = (np.broadcast_to(np.asarray(v, np.float32), shape) for v in (delta, low, high))
    width = high - low
    x = (low + rng.uniform(-0.25, 1.25, size=shape) * width).astype(np.float32)
    pick = rng.integers(0, 8, size=shape)
    k = np.round((x - low) / delta)
    on_grid = (low + k * delta).astype(np.float32)
    x = np.where(pick == 0, on_grid, x)  # exact grid points
    x = np.where(pick == 1, (on_grid + delta / 2).astype(np.float32), x)  # ties
    x = np.where(pick == 2, low, x)  # range ends
    x = np.where(pick == 3, high, x)
    x = np.where(pick == 4, np.float32(1e6) * np.sign(x - (low + high) / 2), x)  # far outside
    x = np.where(pick == 5, np.float32(0), x)
    return x.astype(np.float32)


def bits(values: np.ndarray) -> np.ndarray:
    """The raw bits of float32 values, so that equality also tells +0.0 from -0.0."""
    return np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
