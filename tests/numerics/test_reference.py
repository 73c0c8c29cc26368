"""Rule 2: each backend matches the numpy reference `trainable_infra.common.numerics`.

Forward outputs are equal up to the backend's ulp budget (torch CPU 0, torch CUDA 1, TensorFlow's op 2, Keras
uniform grids 4: see README.md), except within float rounding of a rounding tie, where one step Δ is allowed.
The reference rounds as the backend's fused op does (torch half to even, TensorFlow half up). Gradients are
compared on inputs away from ties and range ends (`cases.gradient_inputs`).

DQA's mixture (mid-schedule) is compared with `common.numerics.fake_quant_dqa_*` within the backend's budget plus
8 ulps of the largest candidate (the backends' attention is a float32 softmax), and one weighted step α_i·Δ_i
near candidate i's ties; its gradients within float32 summation error.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.numerics.cases import (
    DQA_MID_STEP,
    TIE_WINDOW,
    case_params,
    dqa_tolerance,
    forward_inputs,
    gradient_inputs,
    reference_dqa,
    reference_forward,
    reference_grads,
    reference_grid,
    upstream_gradient,
)
from tests.numerics.compare import assert_rule2, assert_within
from tests.numerics.params import BACKENDS, CASE_PARAMS, DQA_CASE_PARAMS, LSQ_CASE_PARAMS

MODES = [pytest.param(True, id="train"), pytest.param(False, id="eval")]


@pytest.mark.parametrize("training", MODES)
@pytest.mark.parametrize("case", CASE_PARAMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_matches_reference(adapter, case, training):
    params = case_params(case)
    built = adapter.build(case, params)
    x = forward_inputs(case, params)
    grid = reference_grid(case, params, adapter.rounding)
    assert_rule2(adapter.forward(built, x, training), reference_forward(case, params, x, adapter.rounding),
                 grid.steps(x), grid.delta, f"{adapter.name} {case.id} {'train' if training else 'eval'}",
                 ulps=adapter.ulps_for(case), tie_window=TIE_WINDOW)


@pytest.mark.parametrize("case", CASE_PARAMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_input_gradient_matches_reference(adapter, case):
    params = case_params(case)
    built = adapter.build(case, params)
    x, dy = gradient_inputs(case, params), upstream_gradient(case)
    ours = adapter.gradients(built, x, dy)["input"]
    expected = reference_grads(case, params, x, dy, adapter.rounding)["input"]
    mismatch = ours != expected
    assert not mismatch.any(), (
        f"{adapter.name} {case.id}: input gradient differs at {int(mismatch.sum())} of {mismatch.size} elements; "
        f"first at x={x[mismatch][0]!r}: got {ours[mismatch][0]!r}, expected {expected[mismatch][0]!r}"
    )


@pytest.mark.parametrize("case", CASE_PARAMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_trainable_parameters_follow_training_method(adapter, case):
    built = adapter.build(case, case_params(case))
    assert sorted(adapter.trainable(built)) == sorted(case.learnable_names), (
        f"{adapter.name} {case.id}: trainable quantization parameters {sorted(adapter.trainable(built))}, "
        f"expected {sorted(case.learnable_names)} ({case.training.name} trains {case.learnable_names or 'none'})"
    )


@pytest.mark.parametrize("case", LSQ_CASE_PARAMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_parameter_gradients_match_reference(adapter, case):
    params = case_params(case)
    built = adapter.build(case, params)
    x, dy = gradient_inputs(case, params), upstream_gradient(case)
    ours = adapter.gradients(built, x, dy)
    expected = reference_grads(case, params, x, dy, adapter.rounding)
    for name in case.learnable_names:
        assert ours.get(name) is not None, f"{adapter.name} {case.id}: no gradient reaches {name}"
        np.testing.assert_allclose(ours[name], expected[name], rtol=1e-5, atol=1e-6,
                                   err_msg=f"{adapter.name} {case.id}: gradient of {name}")


# The backends' attention is a float32 softmax, the reference's float64: a few ulps of each weighted candidate.
DQA_ULPS = 8


@pytest.mark.parametrize("case", DQA_CASE_PARAMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_dqa_mixture_matches_reference(adapter, case):
    params = case_params(case)
    built = adapter.build(case, params, dqa_step=DQA_MID_STEP)
    x = forward_inputs(case, params)
    allowed = dqa_tolerance(case, params, x, DQA_MID_STEP, adapter.ulps_for(case) + DQA_ULPS, adapter.rounding)
    assert_within(adapter.forward(built, x, True), reference_dqa(case, params, x, DQA_MID_STEP, adapter.rounding),
                  allowed, x, f"{adapter.name} {case.id} DQA mixture at step {DQA_MID_STEP}")


@pytest.mark.parametrize("case", DQA_CASE_PARAMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_dqa_mixture_gradients_match_reference(adapter, case):
    params = case_params(case)
    built = adapter.build(case, params, dqa_step=DQA_MID_STEP)
    x, dy = gradient_inputs(case, params), upstream_gradient(case)
    ours = adapter.gradients(built, x, dy)
    expected = reference_dqa(case, params, x, DQA_MID_STEP, adapter.rounding, dy=dy)
    np.testing.assert_allclose(ours["input"], expected["input"], rtol=1e-6, atol=1e-7,
                               err_msg=f"{adapter.name} {case.id}: DQA input gradient")
    assert ours.get("attention") is not None, f"{adapter.name} {case.id}: no gradient reaches the attention logits"
    np.testing.assert_allclose(ours["attention"], expected["attention"], rtol=1e-4, atol=2e-5,
                               err_msg=f"{adapter.name} {case.id}: DQA attention-logit gradient")
