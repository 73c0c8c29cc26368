"""Edge inputs: exact grid points and ties, the range ends and the floats just beyond them, very large
magnitudes, zeros and empty tensors.

Grid points, ties and range ends are tested on grids whose step is a power of two (`cases.exact_grid_params`),
where all of them are exact in float32: there every backend must match exactly, with no tolerance.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tests.numerics.adapters import ADAPTERS
from tests.numerics.cases import (
    CASES,
    METHODS,
    TRAININGS,
    Case,
    case_params,
    exact_grid_params,
    forward_inputs,
    reference_forward,
    reference_grads,
    reference_grid,
    upstream_gradient,
)
from tests.numerics.compare import assert_rule2
from tests.numerics.params import BACKENDS, CASE_PARAMS, LSQ_CASE_PARAMS, backend_case_params
from trainable_infra import TrainableInfraError, TrainingMethod

f32 = np.float32
FLOAT32_MAX = np.finfo(f32).max


def _tiles(values: np.ndarray, shape: tuple[int, ...]) -> list[np.ndarray]:
    """`values` laid out over as many tensors of `shape` as they need (the last one padded by repeating)."""
    size = int(np.prod(shape))
    count = -(-len(values) // size)
    return [np.resize(values[i * size:], shape).astype(f32) for i in range(count)]


def _exact_grid(case: Case):
    params = exact_grid_params(case)
    return params, reference_grid(case, params)


def _assert_equal(actual: np.ndarray, expected: np.ndarray, x: np.ndarray, what: str) -> None:
    mismatch = ~((actual == expected) | (np.isnan(actual) & np.isnan(expected)))
    assert not mismatch.any(), (
        f"{what}: {int(mismatch.sum())} of {mismatch.size} differ; first at x={x[mismatch][0]!r}: got "
        f"{actual[mismatch][0]!r}, expected {expected[mismatch][0]!r}")


def _values_per_channel(grid, u: np.ndarray) -> np.ndarray:
    """The float32 values at grid indices u (the exact grids have the same Δ and z in every channel)."""
    return ((u - grid.zero_point.reshape(-1)[0]) * grid.delta.reshape(-1)[0]).astype(f32)


# ---------------------------------------------------------------------------------------------------------
# Grid points and ties
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASE_PARAMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_grid_points_are_fixed_points(adapter, case):
    params, grid = _exact_grid(case)
    built = adapter.build(case, params)
    for x in _tiles(_values_per_channel(grid, np.arange(grid.k_min, grid.k_max + 1.0)), case.shape):
        _assert_equal(adapter.forward(built, x, True), x, x, f"{adapter.name} {case.id}: Q(grid point)")


def framework_rounding(rounding: str, grid, x: np.ndarray) -> np.ndarray:
    """Q(x) with the tie rule of the framework's fused op: TensorFlow rounds the grid index x/Δ + z half up,
    torch rounds x/Δ half to even and then adds z."""
    u = x.astype(np.float64) / grid.delta
    k = np.floor(u + grid.zero_point + 0.5) if rounding == "half_up" else np.rint(u) + grid.zero_point
    return ((np.clip(k, grid.k_min, grid.k_max) - grid.zero_point) * grid.delta).astype(f32)


@pytest.mark.parametrize("case", CASE_PARAMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_ties_round_as_the_framework_op(adapter, case):
    """Ties go up in Keras (TensorFlow's op), to even in PyTorch. On uniform grids with an odd zero point,
    `common.numerics` (rounding="half_even", which rounds x/Δ + z) differs from torch at every exact tie by one
    step, which rule 2 allows (README.md, "Exceptions"); this test states torch's rule."""
    params, grid = _exact_grid(case)
    built = adapter.build(case, params)
    for x in _tiles(_values_per_channel(grid, np.arange(grid.k_min, grid.k_max) + 0.5), case.shape):
        expected = framework_rounding(adapter.rounding, reference_grid(case, params), x)
        _assert_equal(adapter.forward(built, x, True), expected, x, f"{adapter.name} {case.id}: Q(tie)")


# ---------------------------------------------------------------------------------------------------------
# Range ends, ±threshold and just beyond; very large magnitudes
# ---------------------------------------------------------------------------------------------------------


def _beyond(end: np.float32, direction: float) -> np.float32:
    """The next float beyond a range end; beyond an end at zero, the smallest normal float (a subnormal one is
    zero to TensorFlow: see test_subnormal_beyond_a_zero_range_end)."""
    if end == 0:
        return f32(direction * np.finfo(f32).smallest_normal)
    return np.nextafter(end, f32(direction * np.inf))


def _range_end_inputs(case: Case, grid) -> np.ndarray:
    low, high = _values_per_channel(grid, grid.k_min), _values_per_channel(grid, grid.k_max)
    values = [low, high, _beyond(low, -1.0), _beyond(high, 1.0), np.nextafter(low, f32(np.inf)),
              np.nextafter(high, f32(-np.inf))]
    if not case.is_uniform:
        t = f32(grid.delta.reshape(-1)[0] * 2 ** (case.n_bits - int(case.signed)))
        values += [t, -t, np.nextafter(t, f32(np.inf)), np.nextafter(-t, f32(-np.inf))]
    return np.array(values, f32)


@pytest.mark.parametrize("case", CASE_PARAMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_range_ends_and_beyond_clip_exactly(adapter, case):
    params, grid = _exact_grid(case)
    built = adapter.build(case, params)
    for x in _tiles(_range_end_inputs(case, grid), case.shape):
        _assert_equal(adapter.forward(built, x, True), reference_forward(case, params, x, adapter.rounding), x,
                      f"{adapter.name} {case.id}: Q(range end, ±threshold or the next float)")


@pytest.mark.parametrize("case", CASE_PARAMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_input_gradient_is_inclusive_at_range_ends(adapter, case):
    """∂Q/∂x is 1 on the closed range [Δ·q_min, Δ·q_max] (uniform: [a', b']) and 0 one float beyond it."""
    params, grid = _exact_grid(case)
    built = adapter.build(case, params)
    for x in _tiles(_range_end_inputs(case, grid), case.shape):
        dy = np.ones_like(x)
        _assert_equal(adapter.gradients(built, x, dy)["input"], reference_grads(case, params, x, dy)["input"], x,
                      f"{adapter.name} {case.id}: input gradient at a range end")


@pytest.mark.parametrize("case", LSQ_CASE_PARAMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_lsq_input_gradient_is_the_ste_one(adapter, case):
    """LSQ's input gradient is the straight-through one, bit for bit with the STE quantizer on the same grid, for
    any parameters (not only exact grids): also at the range ends and the floats just beyond them."""
    params = case_params(case)
    ste_case = dataclasses.replace(case, training=TrainingMethod.STE)
    x, dy = forward_inputs(case, params), upstream_gradient(case)
    lsq = adapter.gradients(adapter.build(case, params), x, dy)["input"]
    ste = adapter.gradients(adapter.build(ste_case, params), x, dy)["input"]
    _assert_equal(lsq, ste, x, f"{adapter.name} {case.id}: LSQ input gradient vs STE")


ZERO_END_CASES = [case for case in CASES if not case.is_weights and case.layout in ("unsigned", "positive", "negative")]


@pytest.mark.parametrize(("backend", "case"), backend_case_params(ZERO_END_CASES))
def test_subnormal_beyond_a_zero_range_end(backend, case):
    """Where the range ends at 0 (unsigned, or a uniform range above or below zero), the subnormal floats beyond
    it get no gradient in PyTorch; TensorFlow's CPU kernels flush subnormals to zero, so Keras passes the
    gradient there (README.md, "Exceptions"). Forward, both give 0."""
    adapter = ADAPTERS[backend]
    params, grid = _exact_grid(case)
    built = adapter.build(case, params)
    at_zero_low = _values_per_channel(grid, grid.k_min) == 0
    tiny = f32(-1e-45 if at_zero_low else 1e-45)
    x = np.resize(np.array([tiny, tiny * 1000], f32), case.shape).astype(f32)
    grad = adapter.gradients(built, x, np.ones_like(x))["input"]
    expected = 1.0 if backend == "keras" else 0.0
    assert np.all(grad == expected), f"{backend} {case.id}: input gradient {np.unique(grad)} at x={tiny!r}"
    assert np.all(adapter.forward(built, x, True) == 0), f"{backend} {case.id}: Q(subnormal) is not 0"


def _large(case: Case) -> np.ndarray:
    x = np.resize(np.array([1e30, -1e30, FLOAT32_MAX, -FLOAT32_MAX, 1e7, -1e7, 3e38, -3e38], f32), case.shape)
    return x.astype(f32)


@pytest.mark.parametrize("case", CASE_PARAMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_large_magnitudes_clip_to_range_ends(adapter, case):
    params = case_params(case)
    built = adapter.build(case, params)
    x = _large(case)
    grid = reference_grid(case, params, adapter.rounding)
    with np.errstate(over="ignore"):  # x/Δ overflows to ±inf in the reference, and clips
        expected = reference_forward(case, params, x, adapter.rounding)
    assert_rule2(adapter.forward(built, x, True), expected, grid.steps(x), grid.delta,
                 f"{adapter.name} {case.id}: Q(±1e30, ±FLT_MAX)",
                 ulps=adapter.ulps_for(case))


@pytest.mark.parametrize("case", CASE_PARAMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_large_magnitudes_get_no_input_gradient(adapter, case):
    built = adapter.build(case, case_params(case))
    x = _large(case)
    grad = adapter.gradients(built, x, upstream_gradient(case))["input"]
    assert np.all(grad == 0), f"{adapter.name} {case.id}: input gradient {grad[grad != 0][:4]} at |x| >= 1e7"


@pytest.mark.parametrize("case", LSQ_CASE_PARAMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_large_magnitudes_give_finite_lsq_gradients(adapter, case):
    params = case_params(case)
    built = adapter.build(case, params)
    x, dy = _large(case), upstream_gradient(case)
    ours = adapter.gradients(built, x, dy)
    with np.errstate(over="ignore", invalid="ignore"):  # x/Δ overflows; r - u is inf - inf where clipped
        expected = reference_grads(case, params, x, dy, adapter.rounding)
    for name in case.learnable_names:
        np.testing.assert_allclose(ours[name], expected[name], rtol=1e-5, atol=1e-6,
                                   err_msg=f"{adapter.name} {case.id}: gradient of {name} at |x| >= 1e7")


# ---------------------------------------------------------------------------------------------------------
# Zeros
# ---------------------------------------------------------------------------------------------------------


def _zeros(case: Case) -> np.ndarray:
    return np.resize(np.array([0.0, -0.0], f32), case.shape).astype(f32)


@pytest.mark.parametrize("case", CASE_PARAMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_zeros_map_to_zero(adapter, case):
    built = adapter.build(case, case_params(case))
    for training in (True, False):
        y = adapter.forward(built, _zeros(case), training)
        assert np.all(y == 0), f"{adapter.name} {case.id}: Q(±0) = {y[y != 0][:4]}"


@pytest.mark.parametrize("case", CASE_PARAMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_zeros_pass_the_gradient(adapter, case):
    """Zero is always in the closed range (a range above or below zero is widened to reach it)."""
    built = adapter.build(case, case_params(case))
    dy = upstream_gradient(case)
    grad = adapter.gradients(built, _zeros(case), dy)["input"]
    assert np.array_equal(grad, dy.astype(np.float64)), f"{adapter.name} {case.id}: input gradient at ±0"


# ---------------------------------------------------------------------------------------------------------
# Empty tensors
# ---------------------------------------------------------------------------------------------------------

ACTIVATION_CASES = [case for case in CASES if not case.is_weights and case.n_bits == 4]


@pytest.mark.parametrize(("backend", "case"), backend_case_params(ACTIVATION_CASES))
def test_empty_batch_gives_empty_output(backend, case):
    adapter = ADAPTERS[backend]
    built = adapter.build(case, case_params(case))
    x = np.zeros((0, *case.shape[1:]), f32)
    for training in (True, False):
        y, _ = adapter.run(built, x, training)
        assert y.shape == x.shape, f"{backend} {case.id}: empty batch gives shape {y.shape}"


@pytest.mark.parametrize(("backend", "case"), backend_case_params(ACTIVATION_CASES))
def test_empty_batch_gives_zero_gradients(backend, case):
    adapter = ADAPTERS[backend]
    built = adapter.build(case, case_params(case))
    x = np.zeros((0, *case.shape[1:]), f32)
    grads = adapter.gradients(built, x, x)
    assert grads["input"].shape == x.shape, f"{backend} {case.id}: input gradient shape {grads['input'].shape}"
    for name in case.learnable_names:
        assert np.array_equal(grads[name], np.zeros_like(grads[name])), f"{backend} {case.id}: {name} {grads[name]}"


EMPTY_WEIGHT_CASES = [Case(t, m, "weights", 4, layout) for t in TRAININGS for m in METHODS
                      for layout in ("per-tensor", "axis-1")]


@pytest.mark.parametrize(("backend", "case"), backend_case_params(EMPTY_WEIGHT_CASES))
def test_empty_weight_quantizes_or_fails_clearly(backend, case):
    """A weight of shape (0, 3, 2, 5): the quantizer either maps it to an empty tensor, or initialize_quantization
    raises the library's error naming the shape."""
    adapter = ADAPTERS[backend]
    shape = (0, *case.shape[1:])
    try:
        built = adapter.build(case, case_params(case), shape=shape)
    except TrainableInfraError as error:
        message = str(error)
    else:
        message = ""
    if message:
        assert str(shape) in message, f"{backend} {case.id}: the error does not name the shape {shape}: {message}"
        return
    y, _ = adapter.run(built, np.zeros(shape, f32), True)
    assert y.shape == shape, f"{backend} {case.id}: empty weight gives shape {y.shape}"
