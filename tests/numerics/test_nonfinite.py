"""NaN and ±Inf inputs (README.md, "NaN and Inf", states what each backend does).

Trainable quantizers, both backends: NaN in gives NaN out, ±Inf clip to the range ends, and neither should
pass an input gradient (NaN is in no range; two reported bugs marked below). LSQ parameter gradients: ±Inf
inputs pull the range end they are clipped to, as any clipped value does; a NaN input makes them NaN (its
rounding error is NaN), which is not silent. The inferable quantizers: TensorFlow's op propagates NaN like the
trainable ones; torch's fused kernels, which the mct-quantizers PyTorch quantizers run, turn NaN into the low
range end and (per-channel) +Inf into the low range end too (the reported bugs marked below).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.numerics.adapters import ADAPTERS
from tests.numerics.cases import (
    CASES,
    case_params,
    forward_inputs,
    gradient_inputs,
    reference_forward,
    reference_grads,
    upstream_gradient,
)
from tests.numerics.compare import bits
from tests.numerics.params import backend_case_params

f32 = np.float32
LSQ_CASES = [case for case in CASES if case.is_lsq]
TORCH_HARDTANH_NAN_BUG = (
    "PyTorch per-tensor quantizers on the CPU (eager float32) compute the input gradient with "
    "aten.hardtanh_backward, whose vectorized loop gives 0 at NaN but whose scalar tail (the last numel mod the "
    "vector width elements) passes the gradient: NaN inputs get gradient 0 or 1 by their position"
)
TORCH_FUSED_NAN_BUG = (
    "torch's fused fake-quant kernels (run by the mct-quantizers PyTorch quantizers that convert2inferable() "
    "returns) turn NaN into the low range end"
)
TORCH_FUSED_INF_BUG = (
    "torch's fused per-channel fake-quant kernel (run by the mct-quantizers PyTorch quantizer that "
    "convert2inferable() returns) turns +Inf into the low range end"
)


def _with(case, values: list[float], inputs=forward_inputs) -> tuple[np.ndarray, np.ndarray]:
    """The case's `inputs` with `values` spread over every fourth element, and where they are."""
    x = inputs(case, case_params(case))
    where = np.zeros(x.shape, bool)
    where.reshape(-1)[::4] = True
    x[where] = np.resize(np.array(values, f32), int(where.sum()))
    return x, where


@pytest.mark.parametrize(("backend", "case"), backend_case_params(CASES))
def test_nan_propagates(backend, case):
    adapter = ADAPTERS[backend]
    built = adapter.build(case, case_params(case))
    x, where = _with(case, [np.nan])
    clean = adapter.forward(built, np.where(where, f32(0), x), False)
    for training in (True, False):
        y = adapter.forward(built, x, training)
        assert np.all(np.isnan(y[where])), f"{backend} {case.id}: Q(NaN) = {y[where][~np.isnan(y[where])][:3]}"
        assert np.array_equal(bits(y[~where]), bits(clean[~where])), f"{backend} {case.id}: NaN changed other outputs"


@pytest.mark.parametrize(("backend", "case"), backend_case_params(CASES))
def test_infinities_clip_to_range_ends(backend, case):
    adapter = ADAPTERS[backend]
    params = case_params(case)
    built = adapter.build(case, params)
    x, where = _with(case, [np.inf, -np.inf])
    with np.errstate(over="ignore"):  # x/Δ overflows to ±inf in the reference, and clips
        expected = reference_forward(case, params, np.where(where, np.sign(x) * np.finfo(f32).max, x).astype(f32),
                                     adapter.rounding)
    for training in (True, False):
        y = adapter.forward(built, x, training)
        same = np.isclose(y[where], expected[where], rtol=4e-7, atol=0)
        assert np.all(same), (
            f"{backend} {case.id}: Q(±Inf) = {y[where][~same][:3]}, expected {expected[where][~same][:3]}")


def _nan_gradient_bug(backend, case):
    if backend == "pytorch" and case.axis is None:
        return TORCH_HARDTANH_NAN_BUG
    return None


@pytest.mark.parametrize(("backend", "case"), backend_case_params(CASES, _nan_gradient_bug))
def test_nan_gets_no_input_gradient(backend, case):
    """All-NaN input, of a size that is no multiple of a vector width (activations: a batch of 7)."""
    adapter = ADAPTERS[backend]
    built = adapter.build(case, case_params(case))
    x = np.full(case.shape if case.is_weights else (7, *case.shape[1:]), np.nan, f32)
    grad = adapter.gradients(built, x, np.ones_like(x))["input"]
    assert np.all(grad == 0), (
        f"{backend} {case.id}: input gradient {np.unique(grad)} at NaN, nonzero at flat positions "
        f"{np.flatnonzero(grad)[:8]} of {grad.size}")


@pytest.mark.parametrize(("backend", "case"), backend_case_params(CASES))
def test_infinities_get_no_input_gradient(backend, case):
    adapter = ADAPTERS[backend]
    built = adapter.build(case, case_params(case))
    x, where = _with(case, [np.inf, -np.inf])
    grad = adapter.gradients(built, x, np.ones_like(x))["input"]
    assert np.all(grad[where] == 0), f"{backend} {case.id}: input gradient {np.unique(grad[where])} at ±Inf"


@pytest.mark.parametrize(("backend", "case"), backend_case_params(LSQ_CASES))
def test_lsq_parameter_gradients_of_a_nan_input_are_nan(backend, case):
    adapter = ADAPTERS[backend]
    built = adapter.build(case, case_params(case))
    x, _ = _with(case, [np.nan])
    grads = adapter.gradients(built, x, np.ones_like(x))
    for name in case.learnable_names:
        assert np.any(np.isnan(grads[name])), f"{backend} {case.id}: gradient of {name} {grads[name]} hides a NaN"


@pytest.mark.parametrize(("backend", "case"), backend_case_params(LSQ_CASES))
def test_lsq_parameter_gradients_of_infinite_inputs_match_reference(backend, case):
    adapter = ADAPTERS[backend]
    params = case_params(case)
    built = adapter.build(case, params)
    x, _ = _with(case, [np.inf, -np.inf], gradient_inputs)  # no ties: they flip the rounding errors summed
    dy = upstream_gradient(case)
    ours = adapter.gradients(built, x, dy)
    with np.errstate(over="ignore", invalid="ignore"):  # inf - inf in the reference's unused branch
        expected = reference_grads(case, params, x, dy, adapter.rounding)
    for name in case.learnable_names:
        np.testing.assert_allclose(ours[name], expected[name], rtol=1e-5, atol=1e-6,
                                   err_msg=f"{backend} {case.id}: gradient of {name} with ±Inf inputs")


@pytest.mark.parametrize(("backend", "case"), backend_case_params(
    CASES, lambda backend, case: TORCH_FUSED_NAN_BUG if backend.startswith("pytorch") else None))
def test_inferable_propagates_nan(backend, case):
    adapter = ADAPTERS[backend]
    built = adapter.build(case, case_params(case))
    x, where = _with(case, [np.nan])
    y = adapter.inferable(built, x)
    assert np.all(np.isnan(y[where])), f"{backend} {case.id}: convert2inferable() maps NaN to {np.unique(y[where])}"


@pytest.mark.parametrize(("backend", "case"), backend_case_params(
    CASES, lambda backend, case: TORCH_FUSED_INF_BUG if backend.startswith("pytorch") and case.axis is not None
    else None))
def test_inferable_clips_infinities_like_eval(backend, case):
    adapter = ADAPTERS[backend]
    built = adapter.build(case, case_params(case))
    x, where = _with(case, [np.inf, -np.inf])
    deployed, trained = adapter.inferable(built, x), adapter.forward(built, x, False)
    assert np.array_equal(bits(deployed[where]), bits(trained[where])), (
        f"{backend} {case.id}: convert2inferable() maps ±Inf to {deployed[where][:2]}, eval to {trained[where][:2]}")
