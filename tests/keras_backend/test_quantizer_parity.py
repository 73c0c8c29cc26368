"""Parity of every built-in Keras quantizer with its inferable quantizer (bit for bit) and the numpy reference."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.keras_backend.parity import (
    MIN_THRESHOLD,
    ULPS,
    Case,
    all_cases,
    build_quantizer,
    case_params,
    forward_errors,
    forward_inputs,
    gradient_inputs,
    reference_forward,
    reference_grads,
    run,
    run_grads,
)
from trainable_infra import QuantizationMethod, TrainableQuantizerActivationConfig, VariableGroup
from trainable_infra.common import numerics as nm
from trainable_infra.keras_backend import (
    LSQSymmetricActivationQuantizer,
    LSQSymmetricWeightQuantizer,
    LSQUniformActivationQuantizer,
    LSQUniformWeightQuantizer,
    STESymmetricWeightQuantizer,
)

CASES = all_cases()
IDS = [case.id for case in CASES]


def bits(a: np.ndarray) -> np.ndarray:
    """The raw bits of float32 values, so that equality also tells +0.0 from -0.0."""
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_eval_output_is_bit_identical_to_inferable_quantizer(case: Case):
    params = case_params(case)
    quantizer = build_quantizer(case, params)
    x = forward_inputs(case, params)
    inferable = quantizer.convert2inferable()
    np.testing.assert_array_equal(bits(run(quantizer, x, training=False)), bits(inferable(tf.constant(x)).numpy()),
                                  err_msg=case.id)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_training_output_matches_reference_and_equals_eval_output(case: Case):
    params = case_params(case)
    quantizer = build_quantizer(case, params)
    x = forward_inputs(case, params)
    y = run(quantizer, x, training=True)
    away_from_ties_ulps, at_ties_steps = forward_errors(case, params, y, x)
    assert away_from_ties_ulps <= ULPS, f"{case.id}: {away_from_ties_ulps} ulps from the reference away from ties"
    assert at_ties_steps <= 1 + 1e-5, f"{case.id}: {at_ties_steps} steps from the reference at a tie"
    # What is trained is what is deployed: the training forward is the eval forward, bit for bit.
    np.testing.assert_array_equal(bits(y), bits(run(quantizer, x, training=False)), err_msg=case.id)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradients_match_reference(case: Case):
    params = case_params(case)
    quantizer = build_quantizer(case, params)
    x = gradient_inputs(case, params)
    dy = np.random.default_rng(3).normal(size=case.shape).astype(np.float32)
    ours = run_grads(case, quantizer, x, dy)
    expected = reference_grads(case, params, x, dy)
    assert sorted(ours) == sorted(expected), case.id
    for name in ours:
        assert ours[name].shape == np.shape(expected[name]), f"{case.id}: {name}"
        np.testing.assert_allclose(ours[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=f"{case.id}: {name}")
    if case.is_lsq:
        assert any(np.any(ours[name] != 0) for name in ours if name != "input"), f"{case.id}: no parameter gradient"


@pytest.mark.parametrize("n_bits", [2, 4, 8])
def test_exact_ties_round_half_up_like_tensorflow(n_bits):
    # A power-of-two threshold makes Δ a power of two: grid points and ties are exact in float32.
    case = Case(STESymmetricWeightQuantizer, QuantizationMethod.POWER_OF_TWO, n_bits, "per-tensor")
    params = {"threshold": np.array([1.0])}
    quantizer = build_quantizer(case, params)
    q_min, q_max = nm.symmetric_int_range(n_bits, True)
    delta = 2.0 ** -(n_bits - 1)
    x = np.resize((np.arange(q_min, q_max) + 0.5) * delta, case.shape).astype(np.float32)
    y = run(quantizer, x, training=True)
    np.testing.assert_array_equal(y, reference_forward(case, params, x))
    half_even = nm.fake_quant_symmetric(x, 1.0, n_bits, power_of_two=True, rounding="half_even")
    assert np.any(y != half_even), "the inputs hold ties whose rounding differs between the two rules"


def _trained(quantizer_cls, config, shape, steps=3):
    """A quantizer whose parameters took a few SGD steps away from their initial (round) values."""
    quantizer = quantizer_cls(config)
    layer = keras.layers.Layer()
    quantizer.initialize_quantization(shape, "x", layer)
    rng = np.random.default_rng(5)
    x = tf.constant(rng.normal(size=(4, *shape[1:])).astype(np.float32) * 2)
    variables = quantizer.get_trainable_variables(VariableGroup.QPARAMS)
    optimizer = keras.optimizers.SGD(0.37)
    for _ in range(steps):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum((quantizer(x, True) - x * 0.9) ** 2)
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
    return quantizer, x


@pytest.mark.parametrize(
    ("quantizer_cls", "method", "params"),
    [
        (LSQSymmetricActivationQuantizer, QuantizationMethod.SYMMETRIC, {"threshold": 1.0, "is_signed": True}),
        (LSQSymmetricActivationQuantizer, QuantizationMethod.POWER_OF_TWO, {"threshold": 1.0, "is_signed": False}),
        (LSQUniformActivationQuantizer, QuantizationMethod.UNIFORM, {"range_min": -1.0, "range_max": 2.0}),
    ],
    ids=["symmetric", "power-of-two", "uniform"],
)
def test_learned_parameters_convert_bit_exactly(quantizer_cls, method, params):
    config = TrainableQuantizerActivationConfig(method, 4, params, True, MIN_THRESHOLD)
    quantizer, x = _trained(quantizer_cls, config, (None, 7, 3))
    initial = quantizer_cls(config)
    initial.initialize_quantization((None, 7, 3), "x", keras.layers.Layer())
    learned = quantizer.get_trainable_variables(VariableGroup.QPARAMS)
    assert any(not np.array_equal(v.numpy(), w.numpy()) for v, w in
               zip(learned, initial.get_trainable_variables(VariableGroup.QPARAMS), strict=True))
    np.testing.assert_array_equal(bits(quantizer(x, False).numpy()), bits(quantizer.convert2inferable()(x).numpy()))


def test_lsq_threshold_below_min_threshold_is_clamped_and_gets_no_gradient():
    case = Case(LSQSymmetricWeightQuantizer, QuantizationMethod.SYMMETRIC, 4, "axis-1")
    params = case_params(case)
    params["threshold"][1] = MIN_THRESHOLD / 4
    quantizer = build_quantizer(case, params)
    x = gradient_inputs(case, params)
    dy = np.ones(case.shape, np.float32)
    grads = run_grads(case, quantizer, x, dy)
    assert grads["threshold"][1] == 0.0
    assert np.all(grads["threshold"][[0, 2, 3, 4, 5]] != 0.0)
    np.testing.assert_allclose(grads["threshold"], reference_grads(case, params, x, dy)["threshold"],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(bits(run(quantizer, x, False)), bits(quantizer.convert2inferable()(x).numpy()))


@pytest.mark.parametrize("quantizer_cls", [LSQSymmetricActivationQuantizer, LSQUniformActivationQuantizer])
def test_activation_grad_scale_from_unknown_shape_equals_static(quantizer_cls):
    method = QuantizationMethod.UNIFORM if quantizer_cls is LSQUniformActivationQuantizer else (
        QuantizationMethod.SYMMETRIC)
    params = ({"range_min": -1.0, "range_max": 2.0} if method is QuantizationMethod.UNIFORM
              else {"threshold": 2.0, "is_signed": True})
    config = TrainableQuantizerActivationConfig(method, 8, params, True, MIN_THRESHOLD)
    x = tf.constant(np.random.default_rng(0).normal(size=(3, 4, 5)).astype(np.float32))
    grads = []
    for shape in [(None, 4, 5), (None, None, 5)]:
        quantizer = quantizer_cls(config)
        quantizer.initialize_quantization(shape, "x", keras.layers.Layer())
        variables = quantizer.get_trainable_variables(VariableGroup.QPARAMS)
        with tf.GradientTape() as tape:
            y = tf.reduce_sum(quantizer(x, True) * x)
        grads.append([g.numpy() for g in tape.gradient(y, variables)])
    for static, dynamic in zip(*grads, strict=True):
        np.testing.assert_allclose(dynamic, static, rtol=1e-6)


@pytest.mark.parametrize("quantizer_cls", [LSQSymmetricWeightQuantizer, LSQUniformWeightQuantizer])
def test_lsq_weight_parameters_train_and_still_convert_bit_exactly(quantizer_cls):
    method = QuantizationMethod.UNIFORM if quantizer_cls is LSQUniformWeightQuantizer else (
        QuantizationMethod.SYMMETRIC)
    case = Case(quantizer_cls, method, 4, "axis2")
    params = case_params(case)
    quantizer = build_quantizer(case, params)
    x = tf.constant(forward_inputs(case, params))
    variables = quantizer.get_trainable_variables(VariableGroup.QPARAMS)
    before = [v.numpy().copy() for v in variables]
    optimizer = keras.optimizers.Adam(0.05)
    for _ in range(3):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum((quantizer(x, True) - x) ** 2)
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
    moved = {v.name.removeprefix("x_"): v.numpy() != b for v, b in zip(variables, before, strict=True)}
    if method is QuantizationMethod.UNIFORM:
        # A range end that is moved to zero to include it passes no gradient and stays where it is.
        np.testing.assert_array_equal(moved["range_min"], params["range_min"] <= 0)
        np.testing.assert_array_equal(moved["range_max"], params["range_max"] >= 0)
    else:
        assert np.all(moved["threshold"])
    np.testing.assert_array_equal(bits(quantizer(x, False).numpy()), bits(quantizer.convert2inferable()(x).numpy()))
