"""DQA's numpy reference (candidates, attention, mixture, gradients) and its temperature schedule."""

import re

import numpy as np
import pytest

from trainable_infra import LinearAnnealing, QuantizationConfigError
from trainable_infra.common import numerics as nm
from trainable_infra.common.dqa import check_temperature_schedule, temperature_schedule_for

f32 = np.float32
LOGITS = np.array([0.3, -0.2, 0.5])


@pytest.mark.parametrize(("n_bits", "bits", "penalties"), [
    (2, (2, 4, 8), [0, 1, 2]), (4, (4, 8, 16), [0, 1, 2]), (5, (5, 10, 16), [0, 1, np.log2(16 / 5)]),
    (8, (8, 16, 16), [0, 1, 1]),
])
def test_candidates_are_b_2b_4b_capped_at_16(n_bits, bits, penalties):
    assert nm.dqa_candidate_bits(n_bits) == bits
    np.testing.assert_allclose(nm.dqa_penalties(n_bits), penalties)


def test_attention_is_softmax_of_logits_minus_penalty_over_temperature():
    expected = np.exp(LOGITS - np.array([0, 1, 2]) / 0.5)
    np.testing.assert_allclose(nm.dqa_attention(LOGITS, 0.5, 3), expected / expected.sum(), rtol=1e-12)
    # T = 0 is the b-bit quantizer alone, exactly, whatever the logits.
    assert nm.dqa_attention([0.0, 50.0, 80.0], 0.0, 3).tolist() == [1.0, 0.0, 0.0]


def test_mixture_by_hand():
    # t = 1, b = 2 signed: Q_2(0.3) = 0.5, Q_4(0.3) = 0.25, Q_8(0.3) = 38/128; logits 0, T = 1.
    alpha = nm.dqa_attention(np.zeros(3), 1.0, 2)
    expected = alpha[0] * 0.5 + alpha[1] * 0.25 + alpha[2] * 38 / 128
    y = nm.fake_quant_dqa_symmetric(np.array([0.3], f32), 1.0, 2, logits=np.zeros(3), temperature=1.0)
    assert y.dtype == f32
    assert y[0] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("uniform", [False, True], ids=["symmetric", "uniform"])
def test_temperature_zero_is_the_b_bit_quantizer_bit_for_bit(uniform):
    x = np.concatenate([np.linspace(-2, 2, 101), [-1e-3, -0.0, 0.0]]).astype(f32)
    if uniform:
        y = nm.fake_quant_dqa_uniform(x, -1.2, 0.9, 3, logits=LOGITS, temperature=0.0)
        expected = nm.fake_quant_uniform(x, -1.2, 0.9, 3)
    else:
        y = nm.fake_quant_dqa_symmetric(x, 1.1, 3, logits=LOGITS, temperature=0.0)
        expected = nm.fake_quant_symmetric(x, 1.1, 3)
    np.testing.assert_array_equal(y.view(np.uint32), expected.view(np.uint32))  # -0.0 stays -0.0


@pytest.mark.parametrize("uniform", [False, True], ids=["symmetric", "uniform"])
def test_gradients_match_finite_differences_and_masks(uniform):
    rng = np.random.default_rng(0)
    x = rng.uniform(-1.5, 1.5, (4, 6))
    dy = rng.normal(size=x.shape)
    kwargs = {"channel_axis": 0, "temperature": 0.8}
    if uniform:
        args, forward, grads = (np.array([-1.0, -0.5, -1.2, 0.1]), np.array([0.8, 1.0, -0.1, 1.3]), 3), \
            nm.fake_quant_dqa_uniform, nm.dqa_grads_uniform
        masks = [nm.ste_mask_uniform(x, *args[:2], b, channel_axis=0) for b in nm.dqa_candidate_bits(3)]
    else:
        args, forward, grads = (np.array([1.0, 0.7, 1.2, 0.4]), 3), nm.fake_quant_dqa_symmetric, nm.dqa_grads_symmetric
        masks = [nm.ste_mask_symmetric(x, args[0], b, channel_axis=0) for b in nm.dqa_candidate_bits(3)]
    result = grads(x, dy, *args, logits=LOGITS, **kwargs)
    alpha = nm.dqa_attention(LOGITS, 0.8, 3)
    np.testing.assert_allclose(result["input"], dy * sum(a * m for a, m in zip(alpha, masks, strict=True)))
    for j in range(3):
        step = np.eye(3)[j] * 1e-6
        plus = np.sum(dy * forward(x, *args, logits=LOGITS + step, **kwargs))
        minus = np.sum(dy * forward(x, *args, logits=LOGITS - step, **kwargs))
        assert result["logits"][j] == pytest.approx((plus - minus) / 2e-6, rel=1e-6, abs=1e-9)


def test_bad_reference_arguments_are_refused():
    with pytest.raises(QuantizationConfigError, match=re.escape("n_bits must be an int in 2..8 for DQA, got 9")):
        nm.dqa_candidate_bits(9)
    with pytest.raises(QuantizationConfigError, match="logits must hold 3 values"):
        nm.dqa_attention([0.0, 1.0], 1.0, 4)
    with pytest.raises(QuantizationConfigError, match=re.escape("temperature must be a finite number >= 0, got -1.0")):
        nm.dqa_attention(LOGITS, -1.0, 4)


def test_schedule_runs_in_a_framework_with_its_clip():
    schedule = LinearAnnealing(t_start=10, t_end=20, initial_value=2.0, target_value=0.0)
    steps = np.array([0.0, 15.0, 25.0])
    np.testing.assert_array_equal(schedule(steps, np.clip), [schedule(s) for s in steps])


def test_schedules_for_dqa():
    assert temperature_schedule_for(430) == LinearAnnealing(0, 301, 1.0, 0.0)
    assert temperature_schedule_for(1, anneal_fraction=0.1) == LinearAnnealing(0, 1, 1.0, 0.0)
    assert check_temperature_schedule(None) == LinearAnnealing(0, 10_000, 1.0, 0.0)
    assert check_temperature_schedule({"t_start": 0, "t_end": 5, "initial_value": 3.0, "target_value": 0.0}) == \
        LinearAnnealing(0, 5, 3.0, 0.0)
    for call, message in [
        (lambda: temperature_schedule_for(0), "total_steps must be an int >= 1, got 0"),
        (lambda: temperature_schedule_for(10, anneal_fraction=1.5), "anneal_fraction must be a number in (0, 1]"),
        (lambda: temperature_schedule_for(10, initial_temperature=0.0), "initial_value must be > 0"),
        (lambda: check_temperature_schedule(LinearAnnealing(0, 5, 1.0, 0.1)), "target_value must be 0.0"),
    ]:
        with pytest.raises(QuantizationConfigError) as error:
            call()
        assert message in str(error.value)
