"""Inputs in float64, float16 and bfloat16 (README.md, "Input dtypes", states what each backend does).

Both backends return the input's dtype. Keras always quantizes in float32 (TensorFlow's op takes float32 only):
the input is cast to float32 and the float32 result cast back. PyTorch quantizes float16/bfloat16 inputs in
float32 (per-channel the C-length Δ promotes them, per-tensor the input is cast, as torch's fused kernel does)
and float64 inputs in float64 with the float32 step Δ. The mct-quantizers Keras inferable quantizers take
float32 only.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.numerics.adapters import ADAPTERS
from tests.numerics.cases import (
    CASES,
    TIE_WINDOW,
    case_params,
    forward_inputs,
    gradient_inputs,
    reference_forward,
    reference_grads,
    reference_grid,
    upstream_gradient,
)
from tests.numerics.compare import assert_rule2, ulp
from tests.numerics.params import backend_case_params

REDUCED = ("float16", "bfloat16")
OTHER = ("float64", *REDUCED)
# Unit roundoff of each dtype: the relative error of one rounding to it.
UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
# The largest magnitude kept finite in each dtype (float32 inputs: float64 and bfloat16 hold all of them).
FINITE_MAX = {"float64": 3.4e38, "float32": 3.4e38, "float16": 6.5e4, "bfloat16": 3.3e38}
DTYPE_CASES = [case for case in CASES if case.n_bits in (4, 8)]


def _params(cases, dtypes, known_bug=lambda backend, case: None):
    return [pytest.param(backend, case, dtype, id=f"{p.id}-{dtype}", marks=p.marks)
            for p in backend_case_params(cases, known_bug) for backend, case in [p.values] for dtype in dtypes]


@pytest.mark.parametrize(("backend", "case", "dtype"), _params(DTYPE_CASES, OTHER))
def test_output_keeps_the_input_dtype(backend, case, dtype):
    adapter = ADAPTERS[backend]
    params = case_params(case)
    built = adapter.build(case, params)
    for training in (True, False):
        _, out_dtype = adapter.run(built, forward_inputs(case, params), training, dtype)
        assert out_dtype == dtype, f"{backend} {case.id}: a {dtype} input gives a {out_dtype} output"


@pytest.mark.parametrize(("backend", "case", "dtype"), _params(DTYPE_CASES, ["float64"]))
def test_float64_output_matches_reference(backend, case, dtype):
    """The float64 reference on a float64 input, within rule 2 and 2 more float32 ulps: Keras quantizes the input
    rounded to float32, PyTorch uses the float32 Δ."""
    adapter = ADAPTERS[backend]
    params = case_params(case)
    built = adapter.build(case, params)
    x32 = forward_inputs(case, params)
    x = x32 * (1.0 + np.random.default_rng(0).uniform(-1e-9, 1e-9, x32.shape))  # between float32 values
    grid = reference_grid(case, params, adapter.rounding)
    with np.errstate(over="ignore"):
        expected = reference_forward(case, params, x, adapter.rounding)
    assert_rule2(adapter.run(built, x, True, dtype)[0], expected, grid.steps(x), grid.delta,
                 f"{backend} {case.id} float64", ulps=adapter.ulps_for(case) + 2, tie_window=TIE_WINDOW)


def _inputs(case, params, dtype, count: int = 8) -> list[np.ndarray]:
    """`count` tensors of `forward_inputs` (as float32), the values beyond the dtype's range moved inside it (the
    overflow to ±inf is test_nonfinite.py's subject)."""
    largest = np.float32(FINITE_MAX[dtype])
    return [np.clip(forward_inputs(case, params, salt=f"dtype{i}"), -largest, largest) for i in range(count)]


def _rounded_inputs(adapter, case, params, dtype) -> list[np.ndarray]:
    """float32 inputs that are exactly representable in `dtype`, so that both computations start equal."""
    return [adapter.cast(x, dtype).astype(np.float32) for x in _inputs(case, params, dtype)]


@pytest.mark.parametrize(("backend", "case", "dtype"), _params(DTYPE_CASES, REDUCED))
def test_reduced_precision_output_is_the_float32_output_rounded(backend, case, dtype):
    """What the fused kernels (and the inferable quantizers) compute: Q in float32, rounded to the dtype."""
    adapter = ADAPTERS[backend]
    params = case_params(case)
    built = adapter.build(case, params)
    for x in _rounded_inputs(adapter, case, params, dtype):
        got = adapter.run(built, x, False, dtype)[0]
        expected = adapter.cast(adapter.forward(built, x, False), dtype)
        mismatch = got != expected
        assert not mismatch.any(), (
            f"{backend} {case.id} {dtype}: {int(mismatch.sum())} of {mismatch.size} outputs differ from the rounded "
            f"float32 output; first at x={x[mismatch][0]!r}: {got[mismatch][0]!r} vs {expected[mismatch][0]!r}")


@pytest.mark.parametrize(("backend", "case", "dtype"), _params(DTYPE_CASES, REDUCED))
def test_reduced_precision_error_is_bounded(backend, case, dtype):
    """Never garbage: within one step Δ (a tie moved by the dtype's rounding) plus 4 roundings to the dtype of the
    largest grid value, of the float32 reference on the same input values."""
    adapter = ADAPTERS[backend]
    params = case_params(case)
    built = adapter.build(case, params)
    grid = reference_grid(case, params, adapter.rounding)
    bound = grid.delta + 4 * UNIT_ROUNDOFF[dtype] * np.maximum(np.abs(grid.low), np.abs(grid.high))
    for x in _rounded_inputs(adapter, case, params, dtype):
        error = np.abs(adapter.run(built, x, False, dtype)[0] - reference_forward(case, params, x, adapter.rounding))
        assert np.all(error <= bound), (
            f"{backend} {case.id} {dtype}: error {float((error / grid.delta).max()):.3g} steps, beyond one step "
            f"plus the dtype's rounding")


@pytest.mark.parametrize(("backend", "case", "dtype"), _params(DTYPE_CASES, OTHER))
def test_input_gradient_keeps_dtype_and_mask(backend, case, dtype):
    """The input gradient has the input's dtype and is the upstream gradient (in that dtype) inside the range,
    0 outside, on inputs away from the range ends by more than the dtype's rounding."""
    adapter = ADAPTERS[backend]
    params = case_params(case)
    built = adapter.build(case, params)
    x = adapter.cast(gradient_inputs(case, params), dtype).astype(np.float32)
    dy = upstream_gradient(case)
    grad = adapter.gradients(built, x, dy, dtype)["input"]
    expected = reference_grads(case, params, x, adapter.cast(dy, dtype), adapter.rounding)["input"]
    grid = reference_grid(case, params, adapter.rounding)
    window = 4 * UNIT_ROUNDOFF[dtype] * np.maximum(np.abs(grid.low), np.abs(grid.high))
    near_end = (np.abs(x - grid.low) <= window) | (np.abs(x - grid.high) <= window)
    mismatch = (grad != expected) & ~near_end
    assert not mismatch.any(), (
        f"{backend} {case.id} {dtype}: input gradient differs at {int(mismatch.sum())} elements; first at "
        f"x={x[mismatch][0]!r}: {grad[mismatch][0]!r} vs {expected[mismatch][0]!r}")


def _pytorch(params):
    return [p for p in params if p.values[0].startswith("pytorch")]


@pytest.mark.parametrize(("backend", "case", "dtype"), _pytorch(_params(DTYPE_CASES, REDUCED)))
def test_pytorch_inferable_matches_eval_in_reduced_precision(backend, case, dtype):
    """Rule 1 for float16 and bfloat16 inputs, which the mct-quantizers PyTorch quantizers accept."""
    adapter = ADAPTERS[backend]
    params = case_params(case)
    built = adapter.build(case, params)
    for x in _inputs(case, params, dtype):
        got, deployed = adapter.run(built, x, False, dtype)[0], adapter.run_inferable(built, x, dtype)[0]
        mismatch = got != deployed
        assert not mismatch.any(), (
            f"{backend} {case.id} {dtype}: eval differs from convert2inferable() at {int(mismatch.sum())} elements; "
            f"first at x={x[mismatch][0]!r}: {got[mismatch][0]!r} vs {deployed[mismatch][0]!r}")


@pytest.mark.parametrize(("backend", "case", "dtype"), _pytorch(_params(DTYPE_CASES, ["float64"])))
def test_pytorch_inferable_matches_eval_in_float64_up_to_float32_rounding(backend, case, dtype):
    """Per-channel the two are equal; per-tensor the eval output is computed in float64 while torch's fused
    per-tensor kernel (the inferable quantizer's) rounds its output to float32: half a float32 ulp apart at most
    (it computes in float32)."""
    adapter = ADAPTERS[backend]
    params = case_params(case)
    built = adapter.build(case, params)
    for x in _inputs(case, params, dtype):
        got, deployed = adapter.run(built, x, False, dtype)[0], adapter.run_inferable(built, x, dtype)[0]
        error = np.abs(got - deployed) / ulp(got)
        assert np.all(error <= 0.5), (
            f"{backend} {case.id} float64: eval differs from convert2inferable() by {float(error.max())} float32 "
            f"ulps")


@pytest.mark.parametrize(("backend", "case", "dtype"), [p for p in _params(DTYPE_CASES, OTHER) if p.values[0] ==
                                                         "keras" and p.values[1].n_bits == 8])
def test_keras_inferable_rejects_other_dtypes_clearly(backend, case, dtype):
    """The mct-quantizers Keras inferable quantizers take float32 only, and say so naming the dtype given; the
    trainable quantizers accept the dtype (they compute in float32)."""
    adapter = ADAPTERS[backend]
    params = case_params(case)
    built = adapter.build(case, params)
    with pytest.raises(AssertionError, match=dtype):
        adapter.run_inferable(built, forward_inputs(case, params), dtype)
