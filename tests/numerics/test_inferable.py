"""Rule 1: what is trained is what is deployed, bit for bit, in each backend.

The eval-mode output of a trainable quantizer equals the output of the mct-quantizers inferable quantizer that
`convert2inferable()` returns, and the training-mode forward equals the eval-mode forward. Raw float32 bits
are compared, so that -0.0 and +0.0 count as different. A DQA quantizer trains a mixture until the end of its
schedule (where the matrix builds it): mid-schedule its eval output is still the deployed b-bit quantizer's.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.numerics.cases import DQA_MID_STEP, case_params, forward_inputs
from tests.numerics.compare import bits
from tests.numerics.params import BACKENDS, CASE_PARAMS, DQA_CASE_PARAMS


def _assert_same_bits(actual: np.ndarray, expected: np.ndarray, x: np.ndarray, what: str) -> None:
    mismatch = bits(actual) != bits(expected)
    assert not mismatch.any(), (
        f"{what}: {int(mismatch.sum())} of {mismatch.size} outputs differ; first at x={x[mismatch][0]!r}: "
        f"{actual[mismatch][0]!r} vs {expected[mismatch][0]!r}"
    )


@pytest.mark.parametrize("case", CASE_PARAMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_output_is_bit_identical_to_inferable(adapter, case):
    params = case_params(case)
    built = adapter.build(case, params)
    x = forward_inputs(case, params)
    _assert_same_bits(adapter.forward(built, x, False), adapter.inferable(built, x), x,
                      f"{adapter.name} {case.id}: eval vs convert2inferable()")


@pytest.mark.parametrize("case", CASE_PARAMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_training_forward_is_bit_identical_to_eval(adapter, case):
    params = case_params(case)
    built = adapter.build(case, params)
    x = forward_inputs(case, params)
    _assert_same_bits(adapter.forward(built, x, True), adapter.forward(built, x, False), x,
                      f"{adapter.name} {case.id}: training vs eval forward")


@pytest.mark.parametrize("case", DQA_CASE_PARAMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_dqa_eval_mid_schedule_is_bit_identical_to_inferable(adapter, case):
    params = case_params(case)
    built = adapter.build(case, params, dqa_step=DQA_MID_STEP)
    x = forward_inputs(case, params)
    adapter.forward(built, x, True)  # a training step in between changes nothing in eval mode
    _assert_same_bits(adapter.forward(built, x, False), adapter.inferable(built, x), x,
                      f"{adapter.name} {case.id}: eval mid-schedule vs convert2inferable()")
