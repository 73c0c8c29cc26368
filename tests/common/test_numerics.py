"""The numpy reference: hand-computed cases, gradients, parameter helpers and properties of the grids."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from trainable_infra import QuantizationConfigError
from trainable_infra.common import numerics as nm

f32 = np.float32


# --- hand-computed forward cases --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rounding", "expected"),
    [
        ("half_even", [-1, -1, -0.5, -0.5, 0, 0, 0.75, 0.75]),
        ("half_up", [-1, -1, -0.5, -0.25, 0, 0.25, 0.75, 0.75]),
    ],
)
def test_symmetric_signed_3_bits(rounding, expected):
    # t = 1, n = 3: Δ = 1/4, integers in [-4, 3]; -0.375 and 0.125 are ties (-1.5 and 0.5 steps).
    x = np.array([-2, -1, -0.6, -0.375, 0.1, 0.125, 0.8, 5], dtype=f32)
    np.testing.assert_array_equal(nm.fake_quant_symmetric(x, 1.0, 3, True, rounding=rounding), np.array(expected, f32))


def test_symmetric_unsigned_2_bits():
    # t = 1, n = 2, unsigned: Δ = 1/4, integers in [0, 3].
    x = np.array([-1, 0.3, 0.9], dtype=f32)
    np.testing.assert_array_equal(nm.fake_quant_symmetric(x, 1.0, 2, False), np.array([0, 0.25, 0.75], f32))


def test_power_of_two_rounds_threshold_up():
    # t = 0.3 -> 0.5, n = 2 signed: Δ = 0.25, integers in [-2, 1].
    x = np.array([0.3, -0.6, 0.26], dtype=f32)
    q = nm.fake_quant_symmetric(x, 0.3, 2, True, power_of_two=True)
    np.testing.assert_array_equal(q, np.array([0.25, -0.5, 0.25], f32))


def test_min_threshold_clamps_threshold():
    x = np.array([0.001, 0.1], dtype=f32)
    q = nm.fake_quant_symmetric(x, 1e-6, 8, True, min_threshold=0.5)
    np.testing.assert_allclose(q, [0.0, 0.1015625], rtol=0)  # Δ = 0.5/128


@pytest.mark.parametrize("threshold", [[1.0, 2.0, 4.0], [[1.0, 2.0, 4.0]]], ids=["vector", "mct-broadcast-shape"])
def test_symmetric_per_channel_along_axis_1(threshold):
    # n = 2 signed: Δ = t/2 per channel, integers in [-2, 1].
    x = np.array([[0.6, 0.6, 0.6], [-5, -5, -5]], dtype=f32)
    q = nm.fake_quant_symmetric(x, np.array(threshold), 2, True, channel_axis=1)
    np.testing.assert_array_equal(q, np.array([[0.5, 1.0, 0.0], [-1, -2, -4]], f32))


def test_negative_channel_axis_equals_positive():
    x = np.random.default_rng(0).normal(size=(4, 3, 5)).astype(f32)
    t = np.array([0.5, 1.0, 2.0, 3.0, 4.0])
    np.testing.assert_array_equal(
        nm.fake_quant_symmetric(x, t, 4, channel_axis=-1), nm.fake_quant_symmetric(x, t, 4, channel_axis=2)
    )


@pytest.mark.parametrize(
    ("range_min", "range_max", "n_bits", "expected"),
    [
        (-1.3, 2.1, 3, (-3 * 3.4 / 7, 2.1 + 1.3 - 3 * 3.4 / 7)),  # Δ = 3.4/7, zero point round(2.676) = 3
        (0.5, 2.0, 2, (0.0, 2.0)),  # all positive: a' = 0, b kept
        (-3.0, -1.0, 2, (-3.0, 0.0)),  # all negative: b' = 0, a kept
        (-1.0, 2.0, 2, (-1.0, 2.0)),  # already on the grid
    ],
)
def test_adjust_range_to_include_zero(range_min, range_max, n_bits, expected):
    a, b = nm.adjust_range_to_include_zero(range_min, range_max, n_bits)
    np.testing.assert_allclose([a, b], expected, rtol=1e-12)


def test_uniform_hand_cases():
    # a > 0: range [0, 2], Δ = 2/3; 1.0 is 1.5 steps (tie -> 2 with half-even).
    q = nm.fake_quant_uniform(np.array([1.0, 0.2, 3.0], f32), 0.5, 2.0, 2)
    np.testing.assert_allclose(q, [4 / 3, 0.0, 2.0], rtol=1e-6)
    # b < 0: range [-3, 0], Δ = 1.
    q = nm.fake_quant_uniform(np.array([-1.6, 0.5, -7.0], f32), -3.0, -1.0, 2)
    np.testing.assert_array_equal(q, np.array([-2.0, 0.0, -3.0], f32))


def test_uniform_per_channel_uses_each_range():
    x = np.array([[0.3, 0.3], [7.0, 7.0]], dtype=f32)
    q = nm.fake_quant_uniform(x, np.array([-1.0, 0.0]), np.array([2.0, 6.0]), 2, channel_axis=1)
    np.testing.assert_allclose(q, [[0.0, 0.0], [2.0, 6.0]], rtol=1e-6)


def test_computation_keeps_input_dtype():
    assert nm.fake_quant_symmetric(np.ones(3, f32), 1.0, 8).dtype == f32
    assert nm.fake_quant_uniform(np.ones(3, np.float64), -1.0, 1.0, 8).dtype == np.float64


def test_unknown_rounding_is_refused():
    with pytest.raises(QuantizationConfigError, match="rounding must be one of"):
        nm.fake_quant_symmetric(np.ones(2, f32), 1.0, 8, rounding="nearest")


def test_per_tensor_use_of_several_values_is_refused():
    with pytest.raises(QuantizationConfigError, match="threshold must be a single value"):
        nm.fake_quant_symmetric(np.ones(2, f32), [1.0, 2.0], 8)


# --- gradients --------------------------------------------------------------------------------------------


def test_ste_mask_is_inclusive_on_unrounded_input():
    # t = 1, n = 2: Δ = 0.5, range [-1, 0.5]; 0.6 rounds to 0.5 but lies outside, so no gradient.
    x = np.array([-1.0001, -1.0, 0.0, 0.5, 0.6], dtype=f32)
    np.testing.assert_array_equal(nm.ste_mask_symmetric(x, 1.0, 2), [False, True, True, True, False])
    mask = nm.ste_mask_uniform(np.array([-1.01, -1.0, 2.0, 2.01], f32), -1.0, 2.0, 2)
    np.testing.assert_array_equal(mask, [False, True, True, False])


def test_lsq_symmetric_hand_case():
    # t = 1, n = 2 signed: Δ = 0.5, integers [-2, 1]. Elements: inside (u = 0.6, r - u = 0.4), above (q_max = 1),
    # below (q_min = -2). g = 1/sqrt(N·q_max) = 1/sqrt(3); dt = Σ dQ/dΔ · g / 2^(n-1).
    x = np.array([0.3, 2.0, -3.0], dtype=f32)
    grads = nm.lsq_grads_symmetric(x, np.ones(3, f32), 1.0, 2, True, num_elements=3)
    np.testing.assert_array_equal(grads["input"], [1, 0, 0])
    np.testing.assert_allclose(grads["threshold"], (0.4 + 1 - 2) / np.sqrt(3) / 2, rtol=1e-6)
    assert np.shape(grads["threshold"]) == ()


def test_lsq_symmetric_per_channel_reduces_per_channel_and_masks_clamped_threshold():
    x = np.array([[0.3, 0.3], [2.0, 2.0]], dtype=f32)  # channels along axis 1
    grads = nm.lsq_grads_symmetric(
        x, np.ones_like(x), np.array([1.0, 1e-9]), 2, True, num_elements=2, channel_axis=1, min_threshold=1e-6
    )
    # Channel 0: (0.4 + 1) · g / 2 with g = 1/sqrt(2); channel 1's threshold is below min_threshold: no gradient.
    np.testing.assert_allclose(grads["threshold"], [1.4 / np.sqrt(2) / 2, 0.0], rtol=1e-6)


def test_lsq_uniform_hand_case():
    # a = -1, b = 2, n = 2: K = 3, Δ = 1, a' = -1. Inside u = 1.3 (r - u = -0.3), above, below. g = 1/sqrt(3·3).
    x = np.array([0.3, 3.0, -2.0], dtype=f32)
    grads = nm.lsq_grads_uniform(x, np.ones(3, f32), -1.0, 2.0, 2, num_elements=3)
    np.testing.assert_array_equal(grads["input"], [1, 0, 0])
    np.testing.assert_allclose(grads["range_min"], (0.3 / 3 + 1) / 3, rtol=1e-6)
    np.testing.assert_allclose(grads["range_max"], (-0.3 / 3 + 1) / 3, rtol=1e-6)


def test_lsq_uniform_clamped_range_end_gets_no_gradient():
    grads = nm.lsq_grads_uniform(np.array([-1.0, 0.4], f32), np.ones(2, f32), 0.5, 2.0, 2, num_elements=2)
    assert grads["range_min"] == 0.0
    assert grads["range_max"] != 0.0


def test_lsq_grad_scale_and_element_counts():
    assert nm.lsq_grad_scale(16, 4) == pytest.approx(1 / 8)
    assert nm.lsq_num_elements_weights((3, 3, 8, 16), channel_axis=-1) == 72
    assert nm.lsq_num_elements_weights((3, 3, 8, 16), channel_axis=None) == 1152
    assert nm.lsq_num_elements_activations((32, 10, 10, 4)) == 400


# --- parameter shapes and initial parameters --------------------------------------------------------------


def test_channel_vector_accepts_both_forms_and_rejects_others():
    shape = (3, 3, 2, 4)
    for value in (np.arange(1, 5), np.arange(1, 5).reshape(1, 1, 1, 4), np.arange(1, 5).reshape(1, 4)):
        np.testing.assert_array_equal(nm.channel_vector(value, shape, 3, "threshold"), [1, 2, 3, 4])
    np.testing.assert_array_equal(nm.channel_vector(2.0, shape, 3, "threshold"), [2, 2, 2, 2])
    with pytest.raises(QuantizationConfigError, match=r"threshold has shape \(3,\).*length 4"):
        nm.channel_vector(np.ones(3), shape, 3, "threshold")
    with pytest.raises(QuantizationConfigError, match="channel_axis 4 is out of range for a tensor of rank 4"):
        nm.channel_vector(np.ones(4), shape, 4, "threshold")


def test_max_abs_and_min_max_per_channel():
    x = np.array([[1.0, -3.0], [-2.0, 0.0]], dtype=f32)
    np.testing.assert_array_equal(nm.max_abs_threshold(x, channel_axis=1), [2.0, 3.0])
    np.testing.assert_array_equal(nm.max_abs_threshold(np.zeros(3, f32), min_threshold=0.25), 0.25)
    low, high = nm.min_max_range(x, channel_axis=0)
    np.testing.assert_array_equal(low, [-3.0, -2.0])
    np.testing.assert_array_equal(high, [1.0, 0.0])
    low, high = nm.min_max_range(np.full((2, 2), 5.0, f32))
    assert low < 5.0 < high


@pytest.mark.parametrize("power_of_two", [False, True])
def test_mse_threshold_is_no_worse_than_max_abs(power_of_two):
    rng = np.random.default_rng(1)
    x = rng.standard_t(df=3, size=(64, 4)).astype(f32)  # heavy tails: clipping pays off
    best = nm.mse_threshold(x, 4, channel_axis=1, power_of_two=power_of_two)
    naive = nm.max_abs_threshold(x, channel_axis=1)

    def mse(t):
        return ((nm.fake_quant_symmetric(x, t, 4, channel_axis=1, power_of_two=power_of_two) - x) ** 2).mean(0)

    assert best.shape == (4,)
    assert np.all(mse(best) <= mse(naive))
    assert np.any(mse(best) < mse(naive))
    if power_of_two:
        np.testing.assert_array_equal(np.log2(best), np.round(np.log2(best)))


# --- properties -------------------------------------------------------------------------------------------

inputs = hnp.arrays(
    np.float32, hnp.array_shapes(min_dims=1, max_dims=2, max_side=16),
    elements=st.floats(-100, 100, width=32, allow_nan=False),
)
thresholds = st.floats(1e-3, 50.0)
bits = st.integers(2, 8)


@settings(max_examples=200, deadline=None)
@given(x=inputs, t=thresholds, n=bits, signed=st.booleans(), pot=st.booleans(),
       rounding=st.sampled_from(nm.ROUNDING_MODES))
def test_symmetric_properties(x, t, n, signed, pot, rounding):
    q = nm.fake_quant_symmetric(x, t, n, signed, power_of_two=pot, rounding=rounding)
    t_eff = float(nm.effective_threshold(t, power_of_two=pot))
    delta = f32(t_eff / 2 ** (n - int(signed)))
    q_min, q_max = nm.symmetric_int_range(n, signed)
    steps = np.round(q / delta)
    np.testing.assert_array_equal(q, delta * steps)  # on the grid
    assert steps.min() >= q_min
    assert steps.max() <= q_max
    assert len(np.unique(q)) <= 2**n
    np.testing.assert_array_equal(nm.fake_quant_symmetric(q, t, n, signed, power_of_two=pot, rounding=rounding), q)
    order = np.argsort(x.ravel(), kind="stable")
    assert np.all(np.diff(q.ravel()[order]) >= 0)  # monotone
    if pot:
        assert t_eff == 2.0 ** round(np.log2(t_eff))
        assert t_eff >= t


@settings(max_examples=200, deadline=None)
@given(x=inputs, a=st.floats(-50, 50), width=st.floats(1e-2, 100), n=bits, rounding=st.sampled_from(nm.ROUNDING_MODES))
def test_uniform_properties(x, a, width, n, rounding):
    b = a + width
    q = nm.fake_quant_uniform(x, a, b, n, rounding=rounding)
    a_adj, b_adj = nm.adjust_range_to_include_zero(a, b, n, rounding)
    assert a_adj <= 0 <= b_adj
    assert nm.fake_quant_uniform(np.zeros(1, f32), a, b, n, rounding=rounding)[0] == 0  # zero is on the grid
    assert len(np.unique(q)) <= 2**n
    np.testing.assert_array_equal(nm.fake_quant_uniform(q, a, b, n, rounding=rounding), q)
    order = np.argsort(x.ravel(), kind="stable")
    assert np.all(np.diff(q.ravel()[order]) >= 0)
    tol = 1e-5 * max(abs(a_adj), abs(b_adj))
    assert q.min() >= a_adj - tol
    assert q.max() <= b_adj + tol
