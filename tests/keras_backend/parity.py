"""The parity matrix of the Keras quantizers: cases, inputs with grid points and ties, and the comparisons.

Oracles: the mct-quantizers Keras inferable quantizer from `convert2inferable()` (eval, bit for bit) and the
numpy reference `trainable_infra.common.numerics` with TensorFlow's half-up rounding (training forward and
gradients). `python -m tests.keras_backend.parity` prints the worst error of each case.
"""

from __future__ import annotations

import dataclasses
import itertools

import keras
import numpy as np
import tensorflow as tf

from trainable_infra import (
    QuantizationMethod,
    TrainableQuantizerActivationConfig,
    TrainableQuantizerWeightsConfig,
    VariableGroup,
)
from trainable_infra.common import numerics as nm
from trainable_infra.keras_backend import (
    LSQSymmetricActivationQuantizer,
    LSQSymmetricWeightQuantizer,
    LSQUniformActivationQuantizer,
    LSQUniformWeightQuantizer,
    STESymmetricActivationQuantizer,
    STESymmetricWeightQuantizer,
    STEUniformActivationQuantizer,
    STEUniformWeightQuantizer,
)

f32 = np.float32
MIN_THRESHOLD = 2.0**-16
ROUNDING = "half_up"  # TensorFlow's fake-quant op, used by mct-quantizers' Keras inferable quantizers
WEIGHT_SHAPE = (3, 3, 5, 6)
ACTIVATION_SHAPE = (4, 5, 6)  # batch first: LSQ's N is 30
BITS = (2, 4, 8)
SYMMETRIC_METHODS = (QuantizationMethod.SYMMETRIC, QuantizationMethod.POWER_OF_TWO)
# Per-channel along the last axis (the op's native layout), along a middle axis (transposed), per-tensor.
WEIGHT_LAYOUTS = {"axis-1": -1, "axis2": 2, "per-tensor": None}
# Uniform activation ranges: across zero, all positive (min moved to 0), all negative (max moved to 0).
ACTIVATION_RANGES = {"across-zero": (-1.7, 3.1), "positive": (0.4, 2.9), "negative": (-2.6, -0.3)}
# Tolerance of "exact up to float rounding": TensorFlow's op computes its step as (max - min) / (2^n - 1), which
# may differ from the reference's threshold / 2^(n-s) in the last bit.
ULPS = 4
TIE_WINDOW = 1e-3  # |frac(x/Δ) - 1/2| below this counts as within float rounding of a rounding tie


@dataclasses.dataclass(frozen=True)
class Case:
    """One entry of the matrix."""

    quantizer: type
    method: QuantizationMethod
    n_bits: int
    layout: str  # weights: a WEIGHT_LAYOUTS key; symmetric activations: signed/unsigned; uniform: a range kind

    @property
    def is_weights(self) -> bool:
        return "Weight" in self.quantizer.__name__

    @property
    def is_lsq(self) -> bool:
        return self.quantizer.__name__.startswith("LSQ")

    @property
    def is_uniform(self) -> bool:
        return self.method is QuantizationMethod.UNIFORM

    @property
    def axis(self) -> int | None:
        return WEIGHT_LAYOUTS[self.layout] if self.is_weights else None

    @property
    def signed(self) -> bool:
        return self.is_weights or self.layout == "signed"

    @property
    def shape(self) -> tuple[int, ...]:
        return WEIGHT_SHAPE if self.is_weights else ACTIVATION_SHAPE

    @property
    def id(self) -> str:
        return f"{self.quantizer.__name__}-{self.method.name}-{self.n_bits}b-{self.layout}"


def all_cases() -> list[Case]:
    """8 quantizers x n_bits {2,4,8} x per-channel/per-tensor (weights) or signedness / range kind (activations)."""
    cases = []
    for ste, lsq in ((STESymmetricWeightQuantizer, LSQSymmetricWeightQuantizer),):
        for cls, method, bits, layout in itertools.product((ste, lsq), SYMMETRIC_METHODS, BITS, WEIGHT_LAYOUTS):
            cases.append(Case(cls, method, bits, layout))
    for cls, bits, layout in itertools.product((STEUniformWeightQuantizer, LSQUniformWeightQuantizer), BITS,
                                               WEIGHT_LAYOUTS):
        cases.append(Case(cls, QuantizationMethod.UNIFORM, bits, layout))
    for cls, method, bits, layout in itertools.product(
        (STESymmetricActivationQuantizer, LSQSymmetricActivationQuantizer), SYMMETRIC_METHODS, BITS,
        ("signed", "unsigned"),
    ):
        cases.append(Case(cls, method, bits, layout))
    for cls, bits, layout in itertools.product(
        (STEUniformActivationQuantizer, LSQUniformActivationQuantizer), BITS, ACTIVATION_RANGES
    ):
        cases.append(Case(cls, QuantizationMethod.UNIFORM, bits, layout))
    return cases


# ---------------------------------------------------------------------------------------------------------
# Parameters, quantizers
# ---------------------------------------------------------------------------------------------------------


def case_params(case: Case, seed: int = 0) -> dict[str, np.ndarray]:
    """Per-channel (length C) or per-tensor (length 1) parameters; some thresholds are powers of two, whose
    steps make exact grid points and exact ties representable."""
    rng = np.random.default_rng(seed)
    channels = 1 if case.axis is None else case.shape[case.axis]
    if case.is_uniform:
        if not case.is_weights:
            low, high = ACTIVATION_RANGES[case.layout]
            return {"range_min": np.array([low]), "range_max": np.array([high])}
        low = -rng.uniform(0.3, 2.0, channels)
        high = rng.uniform(0.3, 2.0, channels)
        if channels > 2:  # one all-positive and one all-negative channel
            low[1], high[1] = 0.25, 1.5
            low[2], high[2] = -1.5, -0.25
        return {"range_min": low.astype(f32).astype(np.float64), "range_max": high.astype(f32).astype(np.float64)}
    threshold = rng.uniform(0.3, 3.0, channels).astype(f32).astype(np.float64)
    threshold[0] = 1.0
    return {"threshold": threshold}


def make_config(case: Case, params: dict[str, np.ndarray]):
    """The quantization config of `case` with `params` (per-tensor ones as a single float)."""
    values = {k: (float(v[0]) if v.size == 1 and case.axis is None else v) for k, v in params.items()}
    if case.is_weights:
        return TrainableQuantizerWeightsConfig(
            case.method, case.n_bits, values, True, case.axis if case.axis is not None else -1,
            case.axis is not None, MIN_THRESHOLD,
        )
    if not case.is_uniform:
        values["is_signed"] = case.signed
    return TrainableQuantizerActivationConfig(case.method, case.n_bits, values, True, MIN_THRESHOLD)


def build_quantizer(case: Case, params: dict[str, np.ndarray]):
    """The quantizer of `case`, initialised on a scratch layer for a tensor of the case's shape."""
    quantizer = case.quantizer(make_config(case, params))
    shape = case.shape if case.is_weights else (None, *case.shape[1:])
    quantizer.initialize_quantization(shape, "x", keras.layers.Layer())
    return quantizer


# ---------------------------------------------------------------------------------------------------------
# The reference grid
# ---------------------------------------------------------------------------------------------------------


def _broadcast(values: np.ndarray, case: Case) -> np.ndarray:
    if case.axis is None:
        return np.asarray(values, np.float64).reshape(())
    return np.asarray(values, np.float64).reshape(nm.broadcast_shape(len(case.shape), case.axis))


def reference_grid(case: Case, params: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(Δ, offset, k_min, k_max) broadcast to the tensor: Q(x) = Δ·clip(round(x/Δ + offset), k_min, k_max) - ..."""
    if case.is_uniform:
        delta, zero = nm.uniform_grid(
            _broadcast(params["range_min"], case).astype(f32), _broadcast(params["range_max"], case).astype(f32),
            case.n_bits, ROUNDING,
        )
        return delta.astype(np.float64), zero.astype(np.float64), 0, 2**case.n_bits - 1
    t = nm.effective_threshold(params["threshold"], MIN_THRESHOLD, case.method is QuantizationMethod.POWER_OF_TWO)
    delta = _broadcast(t, case).astype(f32).astype(np.float64) / 2 ** (case.n_bits - int(case.signed))
    q_min, q_max = nm.symmetric_int_range(case.n_bits, case.signed)
    return delta, np.zeros_like(delta), q_min, q_max


def reference_forward(case: Case, params: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """The numpy reference output (half-up rounding)."""
    if case.is_uniform:
        return nm.fake_quant_uniform(
            x, params["range_min"], params["range_max"], case.n_bits, channel_axis=case.axis, rounding=ROUNDING
        )
    return nm.fake_quant_symmetric(
        x, params["threshold"], case.n_bits, case.signed, min_threshold=MIN_THRESHOLD,
        power_of_two=case.method is QuantizationMethod.POWER_OF_TWO, channel_axis=case.axis, rounding=ROUNDING,
    )


def reference_grads(case: Case, params: dict[str, np.ndarray], x: np.ndarray, dy: np.ndarray) -> dict:
    """Reference gradients of sum(dy·Q(x)): "input" always, the learnable parameters for LSQ."""
    pot = case.method is QuantizationMethod.POWER_OF_TWO
    if not case.is_lsq:
        if case.is_uniform:
            mask = nm.ste_mask_uniform(
                x, params["range_min"], params["range_max"], case.n_bits, channel_axis=case.axis, rounding=ROUNDING
            )
        else:
            mask = nm.ste_mask_symmetric(
                x, params["threshold"], case.n_bits, case.signed, min_threshold=MIN_THRESHOLD, power_of_two=pot,
                channel_axis=case.axis,
            )
        return {"input": dy * mask}
    n = (nm.lsq_num_elements_weights(case.shape, case.axis) if case.is_weights
         else nm.lsq_num_elements_activations(case.shape))
    like = {k: (v if case.axis is not None else v.reshape(())) for k, v in params.items()}
    if case.is_uniform:
        return nm.lsq_grads_uniform(
            x, dy, like["range_min"], like["range_max"], case.n_bits, num_elements=n, channel_axis=case.axis,
            rounding=ROUNDING,
        )
    return nm.lsq_grads_symmetric(
        x, dy, like["threshold"], case.n_bits, case.signed, num_elements=n, min_threshold=MIN_THRESHOLD,
        power_of_two=pot, channel_axis=case.axis, rounding=ROUNDING,
    )


# ---------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------


def _from_steps(case: Case, params: dict[str, np.ndarray], u: np.ndarray) -> np.ndarray:
    """x whose position on the reference grid is `u` steps (from the zero point, for uniform)."""
    delta, offset, _, _ = reference_grid(case, params)
    return ((u - offset) * delta).astype(f32)


def forward_inputs(case: Case, params: dict[str, np.ndarray], seed: int = 1) -> np.ndarray:
    """Random values, exact grid points, rounding ties, both ends of the range and values beyond it."""
    rng = np.random.default_rng(seed)
    _, _, k_min, k_max = reference_grid(case, params)
    span = k_max - k_min
    steps = np.concatenate([
        rng.uniform(k_min - 0.2 * span - 2, k_max + 0.2 * span + 2, 6),  # random, some clipped
        [k_min, k_max, k_min - 1, k_max + 1, 0],  # the ends of the range, just beyond, zero
    ])
    u = np.broadcast_to(rng.choice(steps, size=case.shape), case.shape).copy()
    integers = rng.integers(k_min, k_max + 1, size=case.shape)
    which = rng.uniform(size=case.shape)
    u = np.where(which < 0.25, integers, u)  # grid points
    u = np.where((which >= 0.25) & (which < 0.5), integers + 0.5, u)  # ties
    return _from_steps(case, params, u)


def gradient_inputs(case: Case, params: dict[str, np.ndarray], seed: int = 2) -> np.ndarray:
    """Values at least 0.01 step away from every grid point, tie and range end, inside and outside the range."""
    rng = np.random.default_rng(seed)
    _, _, k_min, k_max = reference_grid(case, params)
    integers = rng.integers(k_min - 2, k_max + 3, size=case.shape)
    fraction = rng.uniform(0.01, 0.45, size=case.shape) * rng.choice([-1.0, 1.0], size=case.shape)
    return _from_steps(case, params, integers + fraction)


def near_tie(case: Case, params: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Where x is within float rounding of a rounding tie of the reference grid."""
    delta, offset, _, _ = reference_grid(case, params)
    u = x.astype(np.float64) / delta + offset
    return np.abs(u - np.floor(u) - 0.5) < TIE_WINDOW


# ---------------------------------------------------------------------------------------------------------
# Running the Keras quantizer
# ---------------------------------------------------------------------------------------------------------


def run(quantizer, x: np.ndarray, training: bool) -> np.ndarray:
    return quantizer(tf.constant(x), training).numpy()


def run_grads(case: Case, quantizer, x: np.ndarray, dy: np.ndarray) -> dict[str, np.ndarray]:
    """Gradients of sum(dy·Q(x)) in training mode, by name ("input", "threshold", "range_min", ...)."""
    xt = tf.constant(x)
    variables = quantizer.get_trainable_variables(VariableGroup.QPARAMS)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        loss = tf.reduce_sum(quantizer(xt, True) * dy)
    grads = tape.gradient(loss, [xt, *variables])
    names = ["input"] + [v.name.removeprefix("x_") for v in variables]
    return {name: np.asarray(g) for name, g in zip(names, grads, strict=True)}


def ulp_tolerance(*values: np.ndarray) -> np.ndarray:
    return ULPS * np.spacing(np.max(np.abs(np.stack(np.broadcast_arrays(*values))), axis=0).astype(f32))


def forward_errors(case: Case, params: dict[str, np.ndarray], y: np.ndarray, x: np.ndarray) -> tuple[float, float]:
    """(worst error away from ties in ulps of the tolerance, worst error at ties in steps Δ) against the reference."""
    ref = reference_forward(case, params, x)
    delta, _, _, _ = reference_grid(case, params)
    error = np.abs(y.astype(np.float64) - ref)
    ties = near_tie(case, params, x)
    scale = ulp_tolerance(ref, y, np.broadcast_to(delta, x.shape).astype(f32)) / ULPS
    away = np.where(ties, 0.0, error / scale)
    at_ties = np.where(ties, error / np.broadcast_to(delta, x.shape), 0.0)
    return float(away.max()), float(at_ties.max())


def main() -> None:
    """Print the worst errors of every case."""
    worst = {"eval_vs_inferable": 0.0, "train_ulps": 0.0, "train_tie_steps": 0.0, "grad_rel": 0.0}
    for case in all_cases():
        params = case_params(case)
        quantizer = build_quantizer(case, params)
        x = forward_inputs(case, params)
        y_eval = run(quantizer, x, False)
        y_inf = quantizer.convert2inferable()(tf.constant(x)).numpy()
        ulps, steps = forward_errors(case, params, run(quantizer, x, True), x)
        xg = gradient_inputs(case, params)
        dy = np.random.default_rng(3).normal(size=case.shape).astype(f32)
        ours, ref = run_grads(case, quantizer, xg, dy), reference_grads(case, params, xg, dy)
        rel = max(float(np.max(np.abs(ours[k] - ref[k]) / (1e-6 + 1e-5 * np.abs(ref[k])))) for k in ours)
        row = {"eval_vs_inferable": float(np.max(np.abs(y_eval - y_inf))), "train_ulps": ulps,
               "train_tie_steps": steps, "grad_rel": rel}
        worst = {k: max(worst[k], row[k]) for k in worst}
        print(f"{case.id:60s} " + " ".join(f"{k}={v:.3g}" for k, v in row.items()))
    print(f"{len(all_cases())} cases; worst: " + " ".join(f"{k}={v:.3g}" for k, v in worst.items()))


if __name__ == "__main__":
    main()
