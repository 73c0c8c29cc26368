"""Properties of Q that hold for any parameters and inputs, checked with hypothesis in each backend.

Q's outputs lie on its grid and take at most 2^n values (per channel); Q is idempotent; zero is exactly
representable (both methods promise it: a uniform range is widened and shifted to put zero on the grid);
a power-of-two grid's threshold is a power of two, the smallest one at or above the configured threshold;
Q is monotone. Hypothesis draws the training method, quantization method, bit width, signedness, parameters
(thresholds from 2^-8 to 2^8; uniform ranges across zero, above or below it) and inputs; examples are
derandomized so that a run is reproducible.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from tests.numerics.cases import BITS, METHODS, MIN_THRESHOLD, POT, TRAININGS, UNI, Case, reference_grid
from tests.numerics.params import BACKENDS

f32 = np.float32
SETTINGS = settings(max_examples=30, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# Where the drawn tensor sits: per-tensor or per-channel weights, or a (per-tensor) activation.
LAYOUTS = [pytest.param(layout, id=layout) for layout in ("per-tensor", "axis0", "axis-1", "activation")]

finite32 = {"allow_nan": False, "allow_infinity": False, "width": 32}


@st.composite
def configurations(draw, layout: str, methods=METHODS) -> tuple[Case, dict[str, np.ndarray]]:
    """A case of `layout` and parameters for it."""
    method = draw(st.sampled_from(methods))
    training, n_bits = draw(st.sampled_from(TRAININGS)), draw(st.sampled_from(BITS))
    if layout == "activation":
        kind = "any-range" if method is UNI else draw(st.sampled_from(["signed", "unsigned"]))
        case = Case(training, method, "activation", n_bits, kind)
    else:
        case = Case(training, method, "weights", n_bits, layout)
    channels = case.channels
    if method is UNI:
        low = draw(arrays(np.float32, channels, elements=st.floats(-8.0, 8.0, **finite32)))
        width = draw(arrays(np.float32, channels, elements=st.floats(2.0**-4, 16.0, **finite32)))
        high = (low + width).astype(f32)
        return case, {"range_min": low.astype(np.float64), "range_max": high.astype(np.float64)}
    threshold = draw(arrays(np.float32, channels, elements=st.floats(2.0**-8, 2.0**8, **finite32)))
    return case, {"threshold": threshold.astype(np.float64)}


def _scale(case: Case, params: dict[str, np.ndarray]) -> np.ndarray:
    """A per-channel magnitude a bit beyond the range, shaped to broadcast against the case's tensor."""
    grid = reference_grid(case, params)
    return (1.5 * np.maximum(np.abs(grid.low), np.abs(grid.high))).astype(f32)


def _inputs(case: Case) -> st.SearchStrategy:
    return arrays(np.float32, case.shape, elements=st.floats(-1.0, 1.0, **finite32))


def _describe(adapter, case, params) -> str:
    return f"{adapter.name} {case.id} with {({k: v.tolist() for k, v in params.items()})}"


def _per_channel(case: Case, values: np.ndarray) -> list[np.ndarray]:
    if case.axis is None:
        return [values.reshape(-1)]
    return list(np.moveaxis(values, case.axis, 0).reshape(case.channels, -1))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_outputs_lie_on_the_grid(adapter, layout):
    @SETTINGS
    @given(configurations(layout), st.data())
    def check(config, data):
        case, params = config
        x = data.draw(_inputs(case)) * _scale(case, params)
        y = adapter.forward(adapter.build(case, params), x.astype(f32), True)
        grid = reference_grid(case, params, adapter.rounding)
        index = grid.steps(y)
        off = np.abs(index - np.rint(index))
        assert np.all(off <= 1e-3), f"{_describe(adapter, case, params)}: output {np.max(off)} steps off the grid"
        assert np.all((np.rint(index) >= grid.k_min) & (np.rint(index) <= grid.k_max)), (
            f"{_describe(adapter, case, params)}: output outside the integer range [{grid.k_min}, {grid.k_max}]")

    check()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_at_most_two_to_the_n_values(adapter, layout):
    @SETTINGS
    @given(configurations(layout), st.data())
    def check(config, data):
        case, params = config
        x = data.draw(_inputs(case)) * _scale(case, params)
        y = adapter.forward(adapter.build(case, params), x.astype(f32), False)
        for channel, values in enumerate(_per_channel(case, y)):
            count = len(np.unique(values))
            assert count <= 2**case.n_bits, f"{_describe(adapter, case, params)}: {count} values in channel {channel}"

    check()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_idempotent(adapter, layout):
    @SETTINGS
    @given(configurations(layout), st.data())
    def check(config, data):
        case, params = config
        built = adapter.build(case, params)
        y = adapter.forward(built, (data.draw(_inputs(case)) * _scale(case, params)).astype(f32), True)
        again = adapter.forward(built, y, True)
        moved = y != again
        assert not moved.any(), f"{_describe(adapter, case, params)}: Q(Q(x)) != Q(x) at {y[moved][:3]}"

    check()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_is_exactly_representable(adapter, layout):
    @SETTINGS
    @given(configurations(layout))
    def check(config):
        case, params = config
        built = adapter.build(case, params)
        zeros = np.resize(np.array([0.0, -0.0], f32), case.shape).astype(f32)
        for training in (True, False):
            y = adapter.forward(built, zeros, training)
            assert np.all(y == 0), f"{_describe(adapter, case, params)}: Q(0) = {y[y != 0][:3]}"

    check()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_power_of_two_threshold_is_the_next_power_of_two(adapter, layout):
    """Read from the outputs: a signed grid's lowest value is -t, an unsigned grid's highest is t·(1 - 2^-n)."""
    @SETTINGS
    @given(configurations(layout, methods=(POT,)))
    def check(config):
        case, params = config
        built = adapter.build(case, params)
        far = np.full(case.shape, f32(1e30))
        if case.signed:
            t = -adapter.forward(built, -far, False)
        else:
            t = adapter.forward(built, far, False).astype(np.float64) * 2**case.n_bits / (2**case.n_bits - 1)
        configured = np.maximum(params["threshold"], MIN_THRESHOLD)
        for channel, (values, given_t) in enumerate(zip(_per_channel(case, t), configured, strict=True)):
            value = float(values[0])
            mantissa, _ = np.frexp(value)
            assert mantissa == 0.5, f"{_describe(adapter, case, params)}: channel {channel} threshold {value}"
            assert given_t <= value < 2 * given_t, (
                f"{_describe(adapter, case, params)}: channel {channel} threshold {value} for {given_t}")

    check()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_monotone(adapter, layout):
    @SETTINGS
    @given(configurations(layout), st.data())
    def check(config, data):
        case, params = config
        built = adapter.build(case, params)
        scale = _scale(case, params)
        x = (data.draw(_inputs(case)) * scale).astype(f32)
        step = (np.abs(data.draw(_inputs(case))) * scale * f32(0.1)).astype(f32)
        y, y_up = adapter.forward(built, x, True), adapter.forward(built, (x + step).astype(f32), True)
        down = y > y_up
        assert not down.any(), (
            f"{_describe(adapter, case, params)}: Q(x) > Q(x + d) at x={x[down][:3]}, d={step[down][:3]}")

    check()

