"""Comparisons shared by the backends' parity tests (DESIGN.md §4 rule 2)."""

from __future__ import annotations

import numpy as np

# |frac(u) - 0.5| below this counts as "within float rounding of a tie" for |u| <= 2^16 in float32.
TIE_TOLERANCE = 1e-2
# Fused kernels may round the final product (k - z)·Δ differently from the reference's float32 ops: torch's
# CUDA kernel by up to 1 ulp, TensorFlow's op (whose step is (max - min)/(2^n - 1)) by up to 2.
ULPS = 4


def near_ties(steps: np.ndarray) -> np.ndarray:
    """Where `steps` (input / Δ, plus the zero point) is within float rounding of a rounding tie."""
    steps = np.asarray(steps, dtype=np.float64)
    return np.abs(steps - np.floor(steps) - 0.5) < TIE_TOLERANCE


def assert_rule2(actual, expected, steps, delta, case: str, ulps: int = ULPS) -> float:
    """Assert rule 2: equal up to `ulps` float32 ulps, except near a tie where one step Δ is allowed.

    Returns the largest difference away from ties (0.0 when the match is exact).
    """
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    delta = np.broadcast_to(np.asarray(delta, dtype=np.float64), actual.shape)
    diff = np.abs(actual - expected)
    ties = near_ties(steps)
    spacing = np.spacing(np.maximum(np.abs(expected), np.abs(actual)).astype(np.float32))
    rounding = diff <= ulps * spacing
    one_step = np.abs(diff - delta) <= 1e-5 * delta + ulps * spacing
    bad = ~(rounding | (ties & one_step))
    if bad.any():
        index = tuple(np.argwhere(bad)[0])
        raise AssertionError(
            f"{case}: {int(bad.sum())} of {bad.size} outputs differ from the reference beyond rule 2; first at "
            f"{index}: got {actual[index]!r}, expected {expected[index]!r} (Δ={delta[index]!r}, "
            f"input/Δ={np.asarray(steps)[index]!r})"
        )
    return float(diff[~ties].max(initial=0.0))


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
