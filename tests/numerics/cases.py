"""The matrix of the numerics suite, its parameters, its inputs and the numpy reference of each case.

A case is one quantizer configuration: training method (STE, LSQ, DQA) × quantization method (SYMMETRIC,
POWER_OF_TWO, UNIFORM) × target (weights, activation) × n_bits {2, 3, 4, 8} × layout. Weights are signed and
per-tensor or per-channel along axis 0, 1 or -1 of a rank-4 tensor; symmetric activations are signed or
unsigned; uniform activations have a range across zero, above it or below it. Everything here is numpy: the
backends are reached through `tests.numerics.adapters`.

A DQA quantizer trains a mixture of its b, 2b and 4b-bit quantizations until its temperature reaches 0, then the
b-bit quantizer alone. The matrix builds DQA cases at the end of their schedule (with random attention logits),
where every promise of the STE quantizers must hold in training too; the mixture itself is checked at
`DQA_MID_STEP` against `common.numerics.fake_quant_dqa_*` / `dqa_grads_*` (`reference_dqa`).
"""

from __future__ import annotations

import dataclasses
import itertools
import zlib

import numpy as np

from trainable_infra import QuantizationMethod, QuantizationTarget, TrainingMethod
from trainable_infra.common import numerics as nm
from trainable_infra.common.dqa import default_temperature_schedule

f32 = np.float32
SYM, POT, UNI = QuantizationMethod.SYMMETRIC, QuantizationMethod.POWER_OF_TWO, QuantizationMethod.UNIFORM
METHODS = (SYM, POT, UNI)
TRAININGS = (TrainingMethod.STE, TrainingMethod.LSQ, TrainingMethod.DQA)
BITS = (2, 3, 4, 8)
# DQA at 2 and 4 bits: its candidates (2/4/8 and 4/8/16 bits) reach the 16-bit cap, and at the end of its schedule
# it is the b-bit quantizer whose 3- and 8-bit grids the STE cases cover (the suite's run time stays in budget).
DQA_BITS = (2, 4)
MIN_THRESHOLD = 2.0**-16
WEIGHT_SHAPE = (4, 3, 2, 5)  # 4, 3 or 5 channels along axis 0, 1 or -1
ACTIVATION_SHAPE = (8, 4, 5)  # batch first: LSQ's N (features per sample) is 20
WEIGHT_LAYOUTS = {"per-tensor": None, "axis0": 0, "axis1": 1, "axis-1": -1}
SYMMETRIC_ACTIVATION_LAYOUTS = ("signed", "unsigned")
UNIFORM_ACTIVATION_LAYOUTS = ("across-zero", "positive", "negative")
# |frac(x/Δ + z) - 1/2| below this counts as within float rounding of a rounding tie (float32, |x/Δ| <= 2^9).
TIE_WINDOW = 1e-3
# The same for grids of up to 16 bits (DQA's wider candidates), where |x/Δ| reaches 2^16.
WIDE_TIE_WINDOW = 1e-2
# The zero point z = round(-a/Δ) of a uniform grid: parameters keep -a/Δ this far from a tie, because the
# backends round it differently (torch half to even in float32, the TensorFlow op half up).
ZERO_POINT_MARGIN = 0.05


@dataclasses.dataclass(frozen=True)
class Case:
    """One quantizer configuration of the matrix."""

    training: TrainingMethod
    method: QuantizationMethod
    target: str  # "weights" or "activation"
    n_bits: int
    layout: str  # weights: a WEIGHT_LAYOUTS key; activations: signed/unsigned or a uniform range kind

    @property
    def id(self) -> str:
        return f"{self.training.name}-{self.method.name}-{self.target}-{self.n_bits}b-{self.layout}"

    @property
    def is_weights(self) -> bool:
        return self.target == "weights"

    @property
    def quantization_target(self) -> QuantizationTarget:
        return QuantizationTarget.Weights if self.is_weights else QuantizationTarget.Activation

    @property
    def is_uniform(self) -> bool:
        return self.method is UNI

    @property
    def is_lsq(self) -> bool:
        return self.training is TrainingMethod.LSQ

    @property
    def is_dqa(self) -> bool:
        return self.training is TrainingMethod.DQA

    @property
    def axis(self) -> int | None:
        """The channel axis (as configured, possibly negative), None for per-tensor."""
        return WEIGHT_LAYOUTS[self.layout] if self.is_weights else None

    @property
    def signed(self) -> bool:
        return self.is_weights or self.layout == "signed"

    @property
    def shape(self) -> tuple[int, ...]:
        return WEIGHT_SHAPE if self.is_weights else ACTIVATION_SHAPE

    @property
    def channels(self) -> int:
        return 1 if self.axis is None else self.shape[self.axis]

    @property
    def int_range(self) -> tuple[int, int]:
        """(k_min, k_max): the integer grid, counted from the zero point."""
        if self.is_uniform:
            return 0, 2**self.n_bits - 1
        return nm.symmetric_int_range(self.n_bits, self.signed)

    @property
    def param_names(self) -> tuple[str, ...]:
        return ("range_min", "range_max") if self.is_uniform else ("threshold",)

    @property
    def learnable_names(self) -> tuple[str, ...]:
        """The quantization parameters that receive gradients: LSQ's, none for STE."""
        return self.param_names if self.is_lsq else ()


def all_cases() -> list[Case]:
    """Every case of the matrix (190: 76 for STE and for LSQ, 38 for DQA)."""
    cases = []
    for training, method, n_bits in itertools.product(TRAININGS, METHODS, BITS):
        if training is TrainingMethod.DQA and n_bits not in DQA_BITS:
            continue
        for layout in WEIGHT_LAYOUTS:
            cases.append(Case(training, method, "weights", n_bits, layout))
        activation_layouts = UNIFORM_ACTIVATION_LAYOUTS if method is UNI else SYMMETRIC_ACTIVATION_LAYOUTS
        for layout in activation_layouts:
            cases.append(Case(training, method, "activation", n_bits, layout))
    return cases


CASES = all_cases()


DQA_CASES = [case for case in CASES if case.is_dqa]


def find_case(case_id: str) -> Case:
    return next(case for case in CASES if case.id == case_id)


# ---------------------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------------------


def _rng(case: Case, salt: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(f"{case.id}/{salt}".encode()))


def _zero_point_is_clear(low: np.ndarray, high: np.ndarray, n_bits: int) -> bool:
    """Whether -a/Δ is ZERO_POINT_MARGIN away from a tie, in float32 (torch) and in float64 (mct-quantizers)."""
    levels = 2**n_bits - 1
    for dtype in (np.float32, np.float64):
        a, b = np.minimum(low, 0).astype(dtype), np.maximum(high, 0).astype(dtype)
        u = -a / ((b - a) / dtype(levels))
        if np.any(np.abs(u - np.floor(u) - 0.5) < ZERO_POINT_MARGIN):
            return False
    return True


def _uniform_range(rng: np.random.Generator, kinds: list[str], n_bits: int) -> tuple[np.ndarray, np.ndarray]:
    bounds = {"across-zero": ((-2.5, -0.2), (0.2, 2.5)), "positive": ((0.2, 0.8), (1.0, 2.5)),
              "negative": ((-2.5, -1.0), (-0.8, -0.2))}
    while True:
        low = np.array([rng.uniform(*bounds[k][0]) for k in kinds]).astype(f32)
        high = np.array([rng.uniform(*bounds[k][1]) for k in kinds]).astype(f32)
        if _zero_point_is_clear(low, high, n_bits):
            return low.astype(np.float64), high.astype(np.float64)


def case_params(case: Case) -> dict[str, np.ndarray]:
    """The case's quantization parameters: float32 values held in 1-D float64 arrays (length C or 1).

    Per-channel uniform weights have one channel above zero and one below it; per-channel symmetric weights
    have a power-of-two first channel, on whose grid every point and every tie is exact in float32.
    """
    rng = _rng(case, "params")
    if case.is_uniform:
        if case.is_weights:
            kinds = ["across-zero"] * case.channels
            if case.channels >= 3:
                kinds[1], kinds[2] = "positive", "negative"
        else:
            kinds = [case.layout]
        low, high = _uniform_range(rng, kinds, case.n_bits)
        return {"range_min": low, "range_max": high}
    threshold = rng.uniform(0.3, 3.0, case.channels).astype(f32).astype(np.float64)
    if case.channels > 1:
        threshold[0] = 1.0
    return {"threshold": threshold}


def exact_grid_params(case: Case, exponent: int = -1) -> dict[str, np.ndarray]:
    """Parameters whose step Δ is a power of two (2^exponent·2^-(n-s) symmetric, 2^exponent·2^-n uniform), so
    that grid points, ties and range ends are exact in float32."""
    if case.is_uniform:
        levels = 2**case.n_bits - 1
        delta = 2.0 ** (exponent - case.n_bits + 1)
        zero_point = {"across-zero": levels // 3, "positive": 0, "negative": levels}.get(case.layout, levels // 3)
        low = np.full(case.channels, -zero_point * delta)
        high = np.full(case.channels, (levels - zero_point) * delta)
        return {"range_min": low, "range_max": high}
    return {"threshold": np.full(case.channels, 2.0**exponent)}


# ---------------------------------------------------------------------------------------------------------
# The reference (trainable_infra.common.numerics)
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Grid:
    """A case's grid, broadcast against its tensor: Q(x) = Δ·(clip(round(x/Δ + z), k_min, k_max) - z)."""

    delta: np.ndarray
    zero_point: np.ndarray
    k_min: int
    k_max: int

    def steps(self, x: np.ndarray) -> np.ndarray:
        """x/Δ + z in float64: where x lies on the integer grid."""
        return np.asarray(x, np.float64) / self.delta + self.zero_point

    def values(self, k: np.ndarray) -> np.ndarray:
        """The float32 value at grid index k (the index of x is x/Δ + z)."""
        return ((np.asarray(k, np.float64) - self.zero_point) * self.delta).astype(f32)

    @property
    def low(self) -> np.ndarray:
        return self.values(self.k_min)

    @property
    def high(self) -> np.ndarray:
        return self.values(self.k_max)


def _shaped(case: Case, values: np.ndarray, ndim: int) -> np.ndarray:
    values = np.asarray(values, np.float64)
    if case.axis is None:
        return values.reshape(())
    return values.reshape(nm.broadcast_shape(ndim, case.axis))


def _param_arg(case: Case, values: np.ndarray) -> float | np.ndarray:
    return values if case.axis is not None else float(values[0])


def reference_grid(case: Case, params: dict[str, np.ndarray], rounding: nm.Rounding = "half_even",
                   ndim: int | None = None) -> Grid:
    """The float32 grid of `case` with `params`, shaped to broadcast against a rank-`ndim` tensor."""
    ndim = len(case.shape) if ndim is None else ndim
    k_min, k_max = case.int_range
    if case.is_uniform:
        low = _shaped(case, params["range_min"], ndim).astype(f32)
        high = _shaped(case, params["range_max"], ndim).astype(f32)
        delta, zero_point = nm.uniform_grid(low, high, case.n_bits, rounding)
        return Grid(delta.astype(np.float64), zero_point.astype(np.float64), k_min, k_max)
    t = nm.effective_threshold(params["threshold"], MIN_THRESHOLD, case.method is POT)
    delta = _shaped(case, t, ndim).astype(f32).astype(np.float64) / 2 ** (case.n_bits - int(case.signed))
    return Grid(delta, np.zeros_like(delta), k_min, k_max)


def reference_forward(case: Case, params: dict[str, np.ndarray], x: np.ndarray,
                      rounding: nm.Rounding = "half_even") -> np.ndarray:
    """Q(x) by `common.numerics`, in x's dtype."""
    if case.is_uniform:
        return nm.fake_quant_uniform(
            x, _param_arg(case, params["range_min"]), _param_arg(case, params["range_max"]), case.n_bits,
            channel_axis=case.axis, rounding=rounding,
        )
    return nm.fake_quant_symmetric(
        x, _param_arg(case, params["threshold"]), case.n_bits, case.signed, min_threshold=MIN_THRESHOLD,
        power_of_two=case.method is POT, channel_axis=case.axis, rounding=rounding,
    )


def lsq_num_elements(case: Case, shape: tuple[int, ...]) -> int:
    if case.is_weights:
        return nm.lsq_num_elements_weights(shape, case.axis)
    return nm.lsq_num_elements_activations(shape)


def reference_grads(case: Case, params: dict[str, np.ndarray], x: np.ndarray, dy: np.ndarray,
                    rounding: nm.Rounding = "half_even") -> dict[str, np.ndarray]:
    """Gradients of sum(dy·Q(x)) by `common.numerics`: "input", and each learnable parameter (1-D) for LSQ."""
    pot = case.method is POT
    if not case.is_lsq:
        if case.is_uniform:
            mask = nm.ste_mask_uniform(x, _param_arg(case, params["range_min"]),
                                       _param_arg(case, params["range_max"]), case.n_bits,
                                       channel_axis=case.axis, rounding=rounding)
        else:
            mask = nm.ste_mask_symmetric(x, _param_arg(case, params["threshold"]), case.n_bits, case.signed,
                                         min_threshold=MIN_THRESHOLD, power_of_two=pot, channel_axis=case.axis)
        return {"input": np.where(mask, dy, 0).astype(x.dtype)}
    n = lsq_num_elements(case, x.shape)
    if case.is_uniform:
        grads = nm.lsq_grads_uniform(x, dy, params["range_min"], params["range_max"], case.n_bits, num_elements=n,
                                     channel_axis=case.axis, rounding=rounding)
    else:
        grads = nm.lsq_grads_symmetric(x, dy, params["threshold"], case.n_bits, case.signed, num_elements=n,
                                       min_threshold=MIN_THRESHOLD, power_of_two=pot, channel_axis=case.axis,
                                       rounding=rounding)
    return {name: np.asarray(value).reshape(-1) if name != "input" else value for name, value in grads.items()}


# ---------------------------------------------------------------------------------------------------------
# DQA
# ---------------------------------------------------------------------------------------------------------

# The step of the mixture tests: 30% into the default schedule (T = 0.7).
DQA_MID_STEP = 3 * default_temperature_schedule().t_end // 10


def dqa_logits(case: Case) -> np.ndarray:
    """The case's attention logits: float32 values drawn per case, held in float64."""
    return _rng(case, "dqa-logits").normal(0.0, 0.5, 3).astype(f32).astype(np.float64)


def dqa_temperature(step: int) -> float:
    """The temperature of the default schedule at `step`."""
    return float(default_temperature_schedule()(step))


def dqa_alpha(case: Case, step: int) -> np.ndarray:
    """The attention the quantizer of `case` gives its candidates at `step`."""
    return nm.dqa_attention(dqa_logits(case), dqa_temperature(step), case.n_bits)


def dqa_candidates(case: Case) -> list[Case]:
    """The case at each candidate bit width (b, 2b, 4b, capped at 16), for their grids."""
    return [dataclasses.replace(case, n_bits=bits) for bits in nm.dqa_candidate_bits(case.n_bits)]


def reference_dqa(case: Case, params: dict[str, np.ndarray], x: np.ndarray, step: int,
                  rounding: nm.Rounding = "half_even", dy: np.ndarray | None = None):
    """DQA's training forward at `step` by `common.numerics` (in x's dtype), or with `dy` its gradients: "input" and
    "attention" (the logits', 1-D)."""
    state = {"logits": dqa_logits(case), "temperature": dqa_temperature(step), "channel_axis": case.axis,
             "rounding": rounding}
    if case.is_uniform:
        low, high = _param_arg(case, params["range_min"]), _param_arg(case, params["range_max"])
        if dy is None:
            return nm.fake_quant_dqa_uniform(x, low, high, case.n_bits, **state)
        grads = nm.dqa_grads_uniform(x, dy, low, high, case.n_bits, **state)
    else:
        symmetric = {"min_threshold": MIN_THRESHOLD, "power_of_two": case.method is POT, **state}
        threshold = _param_arg(case, params["threshold"])
        if dy is None:
            return nm.fake_quant_dqa_symmetric(x, threshold, case.n_bits, case.signed, **symmetric)
        grads = nm.dqa_grads_symmetric(x, dy, threshold, case.n_bits, case.signed, **symmetric)
    return {"input": grads["input"], "attention": grads["logits"]}


def dqa_tolerance(case: Case, params: dict[str, np.ndarray], x: np.ndarray, step: int, ulps: float,
                  rounding: nm.Rounding = "half_even") -> np.ndarray:
    """What the mixture may differ by, per element: `ulps` float32 ulps of the largest candidate output (the
    attention is a float32 softmax in the backends, float64 here), plus α_i·Δ_i for each candidate i whose
    rounding tie x lies within float rounding of (rule 2, weighted), or everywhere for a uniform candidate whose
    zero point is near a tie."""
    alpha = dqa_alpha(case, step)
    allowed = np.zeros(x.shape, np.float64)
    largest = np.zeros(x.shape, np.float64)
    for weight, candidate in zip(alpha, dqa_candidates(case), strict=True):
        grid = reference_grid(candidate, params, rounding)
        largest = np.maximum(largest, np.abs(reference_forward(candidate, params, x, rounding).astype(np.float64)))
        # Float32 holds x/Δ to about 2^-23 of its size, which reaches 2^15 on a 16-bit grid: a wider window there.
        window = TIE_WINDOW if candidate.n_bits <= 9 else WIDE_TIE_WINDOW
        near = np.abs(grid.steps(x) - np.floor(grid.steps(x)) - 0.5) < window
        if case.is_uniform and not _zero_point_is_clear(params["range_min"], params["range_max"], candidate.n_bits):
            # The parameters keep only the b-bit zero point clear of a tie; a wider candidate's may be rounded
            # differently by the backends, which moves its whole grid by one of its (small) steps.
            near = np.ones(x.shape, bool)
        allowed = allowed + np.where(near, weight * np.broadcast_to(grid.delta, x.shape) * (1 + 1e-5), 0.0)
    spacing = np.spacing(largest.astype(f32)).astype(np.float64)
    return allowed + ulps * spacing


# ---------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------


def forward_inputs(case: Case, params: dict[str, np.ndarray], shape: tuple[int, ...] | None = None,
                   salt: str = "forward") -> np.ndarray:
    """float32 inputs: random values over and beyond the range, exact grid points, ties, both range ends, the
    floats just beyond them, far-away values and zeros."""
    shape = case.shape if shape is None else shape
    rng = _rng(case, salt)
    grid = reference_grid(case, params, ndim=len(shape))
    span = grid.k_max - grid.k_min
    k = rng.integers(grid.k_min, grid.k_max + 1, size=shape)
    u = rng.uniform(grid.k_min - 0.25 * span - 1, grid.k_max + 0.25 * span + 1, size=shape)
    x = grid.values(np.broadcast_to(u, shape))
    low, high = np.broadcast_to(grid.low, shape), np.broadcast_to(grid.high, shape)
    pick = rng.integers(0, 10, size=shape)
    choices = [
        grid.values(k),  # exact grid points
        grid.values(k + 0.5),  # ties (exact when Δ is a power of two)
        low,
        high,
        np.nextafter(low, f32(-np.inf)),  # just beyond the range
        np.nextafter(high, f32(np.inf)),
        f32(1e6) * rng.choice([f32(-1), f32(1)], size=shape),  # far outside
        np.zeros(shape, f32),
    ]
    for index, values in enumerate(choices):
        x = np.where(pick == index, values, x)
    return x.astype(f32)


def gradient_inputs(case: Case, params: dict[str, np.ndarray], shape: tuple[int, ...] | None = None,
                    salt: str = "gradient") -> np.ndarray:
    """float32 inputs at least 0.05 step from every rounding tie and 0.01 step from every grid point and range
    end, inside and up to two steps beyond the range: a tie flips the LSQ rounding error r - u from -1/2 to
    +1/2, and the backends' masks may disagree by an ulp at the range ends."""
    shape = case.shape if shape is None else shape
    rng = _rng(case, salt)
    grid = reference_grid(case, params, ndim=len(shape))
    k = rng.integers(grid.k_min - 2, grid.k_max + 3, size=shape)
    fraction = rng.uniform(0.01, 0.45, size=shape) * rng.choice([-1.0, 1.0], size=shape)
    return grid.values(k + fraction)


def oracle_gradient_inputs(case: Case, params: dict[str, np.ndarray], salt: str = "oracle") -> np.ndarray:
    """Like `gradient_inputs`, but none within half a step beyond the range: torch's learnable fake-quant ops
    decide "inside" on the rounded input, the library (LSQ's paper) on the input itself."""
    rng = _rng(case, salt)
    grid = reference_grid(case, params)
    k = rng.integers(grid.k_min - 2, grid.k_max + 3, size=case.shape)
    u = k + rng.uniform(0.01, 0.45, size=case.shape) * rng.choice([-1.0, 1.0], size=case.shape)
    u = np.where((u > grid.k_max) & (u < grid.k_max + 0.55), u + 1.0, u)
    u = np.where((u < grid.k_min) & (u > grid.k_min - 0.55), u - 1.0, u)
    return grid.values(u)


def upstream_gradient(case: Case, shape: tuple[int, ...] | None = None) -> np.ndarray:
    return _rng(case, "dy").normal(size=case.shape if shape is None else shape).astype(f32)
