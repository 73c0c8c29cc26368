"""Rule 3: Keras and PyTorch agree on the same inputs and parameters.

Forward outputs agree under rule 2's tolerance with both backends' ulp budgets added; near a rounding tie they
may differ by one step Δ, since torch rounds half to even and TensorFlow's op half up (exact ties are checked
to do so in test_edge_inputs.py). Gradients are compared on inputs away from ties and range ends, where the two
masks and rounding errors are defined without float ambiguity: the input gradient exactly, the LSQ parameter
gradients within float32 summation error. DQA's mixture (mid-schedule) agrees within both backends' budgets of
test_reference.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.numerics.adapters import ADAPTERS
from tests.numerics.cases import (
    DQA_MID_STEP,
    TIE_WINDOW,
    case_params,
    dqa_tolerance,
    forward_inputs,
    gradient_inputs,
    reference_grid,
    upstream_gradient,
)
from tests.numerics.compare import assert_rule2, assert_within
from tests.numerics.params import CASE_PARAMS, DQA_CASE_PARAMS, LSQ_CASE_PARAMS, PAIRS
from tests.numerics.test_reference import DQA_ULPS

MODES = [pytest.param(True, id="train"), pytest.param(False, id="eval")]


def _built(pair, case, dqa_step=None):
    params = case_params(case)
    return params, [(ADAPTERS[name], ADAPTERS[name].build(case, params, dqa_step=dqa_step)) for name in pair]


@pytest.mark.parametrize("training", MODES)
@pytest.mark.parametrize("case", CASE_PARAMS)
@pytest.mark.parametrize("pair", PAIRS)
def test_forward_agrees(pair, case, training):
    params, ((a, qa), (b, qb)) = _built(pair, case)
    x = forward_inputs(case, params)
    grid = reference_grid(case, params)
    assert_rule2(a.forward(qa, x, training), b.forward(qb, x, training), grid.steps(x), grid.delta,
                 f"{a.name} vs {b.name} {case.id} {'train' if training else 'eval'}",
                 ulps=a.ulps_for(case) + b.ulps_for(case), tie_window=TIE_WINDOW)


@pytest.mark.parametrize("case", CASE_PARAMS)
@pytest.mark.parametrize("pair", PAIRS)
def test_input_gradient_agrees(pair, case):
    params, ((a, qa), (b, qb)) = _built(pair, case)
    x, dy = gradient_inputs(case, params), upstream_gradient(case)
    ga, gb = a.gradients(qa, x, dy)["input"], b.gradients(qb, x, dy)["input"]
    mismatch = ga != gb
    assert not mismatch.any(), (
        f"{a.name} vs {b.name} {case.id}: input gradients differ at {int(mismatch.sum())} of {mismatch.size} "
        f"elements; first at x={x[mismatch][0]!r}: {ga[mismatch][0]!r} vs {gb[mismatch][0]!r}"
    )


@pytest.mark.parametrize("case", CASE_PARAMS)
@pytest.mark.parametrize("pair", PAIRS)
def test_same_parameters_train(pair, case):
    _, ((a, qa), (b, qb)) = _built(pair, case)
    names_a, names_b = sorted(a.trainable(qa)), sorted(b.trainable(qb))
    assert names_a == names_b, f"{a.name} vs {b.name} {case.id}: trainable parameters {names_a} vs {names_b}"


@pytest.mark.parametrize("case", LSQ_CASE_PARAMS)
@pytest.mark.parametrize("pair", PAIRS)
def test_parameter_gradients_agree(pair, case):
    params, ((a, qa), (b, qb)) = _built(pair, case)
    x, dy = gradient_inputs(case, params), upstream_gradient(case)
    ga, gb = a.gradients(qa, x, dy), b.gradients(qb, x, dy)
    for name in case.learnable_names:
        assert ga.get(name) is not None, f"{a.name} {case.id}: no gradient reaches {name}"
        assert gb.get(name) is not None, f"{b.name} {case.id}: no gradient reaches {name}"
        np.testing.assert_allclose(ga[name], gb[name], rtol=2e-5, atol=2e-6,
                                   err_msg=f"{a.name} vs {b.name} {case.id}: gradient of {name}")
        assert np.array_equal(ga[name] == 0, gb[name] == 0), (
            f"{a.name} vs {b.name} {case.id}: {name} receives a gradient in one backend only: {ga[name]} vs "
            f"{gb[name]}")


@pytest.mark.parametrize("case", DQA_CASE_PARAMS)
@pytest.mark.parametrize("pair", PAIRS)
def test_dqa_mixture_agrees(pair, case):
    params, ((a, qa), (b, qb)) = _built(pair, case, DQA_MID_STEP)
    x = forward_inputs(case, params)
    allowed = sum(dqa_tolerance(case, params, x, DQA_MID_STEP, adapter.ulps_for(case) + DQA_ULPS, adapter.rounding)
                  for adapter in (a, b))
    assert_within(a.forward(qa, x, True), b.forward(qb, x, True), allowed, x,
                  f"{a.name} vs {b.name} {case.id} DQA mixture at step {DQA_MID_STEP}")


@pytest.mark.parametrize("case", DQA_CASE_PARAMS)
@pytest.mark.parametrize("pair", PAIRS)
def test_dqa_mixture_gradients_agree(pair, case):
    params, ((a, qa), (b, qb)) = _built(pair, case, DQA_MID_STEP)
    x, dy = gradient_inputs(case, params), upstream_gradient(case)
    ga, gb = a.gradients(qa, x, dy), b.gradients(qb, x, dy)
    np.testing.assert_allclose(ga["input"], gb["input"], rtol=2e-6, atol=2e-7,
                               err_msg=f"{a.name} vs {b.name} {case.id}: DQA input gradient")
    np.testing.assert_allclose(ga["attention"], gb["attention"], rtol=2e-4, atol=4e-5,
                               err_msg=f"{a.name} vs {b.name} {case.id}: DQA attention-logit gradient")
