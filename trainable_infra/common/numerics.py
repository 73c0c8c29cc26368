"""NumPy reference of the quantization maths (DESIGN.md §4): the oracle every backend is tested against.

Notation: n = n_bits, s = 1 if signed else 0, K = 2^n - 1.

- Symmetric: t = max(threshold, min_threshold); power-of-two: t = 2^ceil(log2(t)).
  Δ = t / 2^(n-s); q_min = -s·2^(n-s); q_max = 2^(n-s) - 1; Q(x) = Δ·clip(round(x/Δ), q_min, q_max).
- Uniform: the range [a, b] is widened to contain zero (a_c = min(a, 0), b_c = max(b, 0)), then zero is put
  on the grid through the zero point: Δ = (b_c - a_c)/K, z = round(-a_c/Δ), a' = -z·Δ, b' = (K - z)·Δ
  (for a < 0 < b this is DESIGN.md's a' = Δ·round(a/Δ), b' = b - a + a'). Q(x) = (clip(round(x/Δ + z), 0, K) - z)·Δ,
  which is Δ·clip(round((x-a')/Δ), 0, K) + a' written so that zero is exact in floating point, as in torch's
  fake-quant kernels and TensorFlow's nudged range. A range narrower than min_threshold (training can push
  range_max to or below range_min) is held at that width: b_c = max(b_c, a_c + min_threshold), so Δ > 0.
- Straight-through gradient: ∂Q/∂x = 1 for x in [Δ·q_min, Δ·q_max] (uniform: [a', b']), else 0.
- LSQ (Esser et al., 2019): with u = x/Δ (uniform: (x-a')/Δ) and r = round(u), ∂Q/∂Δ is r - u inside the
  range and the clipping level (q_min or q_max) outside; the threshold gradient is ∂Q/∂Δ / 2^(n-s).
  Uniform ranges: inside, ∂Q/∂a = -(r-u)/K and ∂Q/∂b = (r-u)/K; below the range ∂Q/∂a = 1; above it
  ∂Q/∂b = 1. Parameter gradients are scaled by g = 1/sqrt(N·q_max) (uniform: q_max = K), N being the
  number of elements one parameter acts on (weights: per channel or per tensor; activations: the features
  of one sample, the paper's N_F), and pass through the clamps above only where the clamp is
  inactive (threshold >= min_threshold, a <= 0, b >= 0, range not held at its minimal width); the
  power-of-two rounding of t passes straight through.
- DQA (Boukli Hacene et al., 2021): in training, y = Σ α_i·Q_{b_i}(x) over the candidates b_i = (b, 2b, 4b),
  each capped at 16 bits, on the same threshold or range; α = softmax(ℓ - r/T) with three learned logits ℓ,
  r_i = log2(b_i/b) and a temperature T annealed to 0, where α = (1, 0, 0) and y is the b-bit Q(x). The input
  gradient is Σ α_i times each candidate's straight-through mask, the logits' gradient softmax's Jacobian.

Rounding is a parameter: "half_even" is what torch's fake-quant kernels do, "half_up" is what TensorFlow's
`fake_quant_with_min_max_vars*` ops (used by mct-quantizers' Keras quantizers) do. All maths runs in the
floating dtype of `x`, as the backends do, so results are comparable bit for bit away from rounding ties.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from trainable_infra.common.errors import QuantizationConfigError

Rounding = Literal["half_even", "half_up"]
ROUNDING_MODES = ("half_even", "half_up")
DEFAULT_MIN_THRESHOLD = 2.0**-16


# ---------------------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------------------


def normalize_axis(axis: int, ndim: int, name: str = "channel_axis") -> int:
    """Return `axis` as a non-negative index into a tensor of rank `ndim`, or raise."""
    if not -ndim <= axis < ndim:
        raise QuantizationConfigError(f"{name} {axis} is out of range for a tensor of rank {ndim}")
    return axis % ndim


def channel_vector(value: float | np.ndarray, shape: tuple[int, ...], axis: int, name: str) -> np.ndarray:
    """Return a per-channel parameter as a 1-D float64 array of length `shape[axis]`.

    Accepted forms: a scalar or a length-1 array (the same value for every channel), a 1-D array of length C,
    or an array already shaped for broadcasting against `shape` with C along `axis` (MCT's form).
    """
    axis = normalize_axis(axis, len(shape))
    channels = shape[axis]
    array = np.asarray(value, dtype=np.float64)
    if array.size == 1:
        return np.full(channels, array.reshape(()), dtype=np.float64)
    if array.ndim == 1 and array.size == channels:
        return array.copy()
    broadcast_form = [1] * len(shape)
    broadcast_form[axis] = channels
    if array.shape == tuple(broadcast_form) or (
        array.ndim <= len(shape) and array.size == channels
        and array.shape == tuple(broadcast_form[len(shape) - array.ndim:])
    ):
        return array.reshape(-1).copy()
    raise QuantizationConfigError(
        f"{name} has shape {array.shape}, which does not fit a tensor of shape {tuple(shape)} with channel axis "
        f"{axis}: give one value, a 1-D array of length {channels}, or an array of shape {tuple(broadcast_form)}"
    )


def broadcast_shape(ndim: int, axis: int | None) -> tuple[int, ...]:
    """The shape that makes a length-C vector broadcast along `axis` of a rank-`ndim` tensor."""
    if axis is None:
        return ()
    shape = [1] * ndim
    shape[normalize_axis(axis, ndim)] = -1
    return tuple(shape)


def _param(value: float | np.ndarray, x: np.ndarray, axis: int | None, name: str) -> np.ndarray:
    """A parameter in x's dtype, shaped to broadcast against x (per-tensor when `axis` is None)."""
    if axis is None:
        array = np.asarray(value, dtype=np.float64)
        if array.size != 1:
            raise QuantizationConfigError(f"{name} must be a single value for per-tensor use, got {value!r}")
        return array.reshape(()).astype(x.dtype)
    return channel_vector(value, x.shape, axis, name).reshape(broadcast_shape(x.ndim, axis)).astype(x.dtype)


def _as_float_array(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    return x if x.dtype.kind == "f" else x.astype(np.float64)


def _reduce_to(grad: np.ndarray, like: float | np.ndarray, axis: int | None) -> np.ndarray:
    """Sum a per-element parameter gradient to the shape the parameter was given in."""
    target_shape = np.shape(like)
    if axis is None:
        return np.asarray(grad.sum(dtype=np.float64)).reshape(target_shape)
    axis = normalize_axis(axis, grad.ndim)
    reduce_axes = tuple(i for i in range(grad.ndim) if i != axis)
    per_channel = grad.sum(axis=reduce_axes, dtype=np.float64)
    if np.size(like) == 1:
        return np.asarray(per_channel.sum()).reshape(target_shape)
    return per_channel.reshape(target_shape)


# ---------------------------------------------------------------------------------------------------------
# Rounding and grids
# ---------------------------------------------------------------------------------------------------------


def round_values(x: np.ndarray, rounding: Rounding = "half_even") -> np.ndarray:
    """Round to integers: ties to even ("half_even", torch) or ties up ("half_up", TensorFlow's fake-quant)."""
    if rounding == "half_even":
        return np.rint(x)
    if rounding == "half_up":
        return np.floor(x + x.dtype.type(0.5)) if isinstance(x, np.ndarray) else np.floor(x + 0.5)
    raise QuantizationConfigError(f"rounding must be one of {ROUNDING_MODES}, got {rounding!r}")


def symmetric_int_range(n_bits: int, signed: bool) -> tuple[int, int]:
    """(q_min, q_max) of the symmetric integer grid."""
    s = int(signed)
    return -s * 2 ** (n_bits - s), 2 ** (n_bits - s) - 1


def power_of_two_threshold(threshold: float | np.ndarray) -> np.ndarray:
    """The smallest power of two >= `threshold` (> 0)."""
    # frexp is exact (t = m·2^e, m in [0.5, 1)), where ceil(log2(t)) can round the wrong way near 2^k.
    mantissa, exponent = np.frexp(np.asarray(threshold, dtype=np.float64))
    return np.ldexp(1.0, exponent - (mantissa == 0.5))


def effective_threshold(
    threshold: float | np.ndarray, min_threshold: float = DEFAULT_MIN_THRESHOLD, power_of_two: bool = False
) -> np.ndarray:
    """The threshold the grid uses: clamped below by `min_threshold`, rounded up to 2^k for power-of-two."""
    t = np.maximum(np.asarray(threshold, dtype=np.float64), min_threshold)
    return power_of_two_threshold(t) if power_of_two else t


def _include_zero(
    range_min: float | np.ndarray, range_max: float | np.ndarray, min_threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a_c, b_c, held): the range widened to contain zero and to be at least `min_threshold` wide, and where
    that width was imposed (the range had collapsed)."""
    a = np.asarray(range_min)
    b = np.asarray(range_max)
    dtype = np.result_type(a.dtype, b.dtype, np.float32)
    zero = dtype.type(0)
    a_c, b_c = np.minimum(a.astype(dtype), zero), np.maximum(b.astype(dtype), zero)
    narrowest = a_c + dtype.type(min_threshold)
    held = b_c < narrowest
    return a_c, np.maximum(b_c, narrowest), held


def uniform_grid(
    range_min: float | np.ndarray,
    range_max: float | np.ndarray,
    n_bits: int,
    rounding: Rounding = "half_even",
    *,
    min_threshold: float = DEFAULT_MIN_THRESHOLD,
) -> tuple[np.ndarray, np.ndarray]:
    """(Δ, z): the step and the integer zero point of the uniform grid on [range_min, range_max] widened to 0
    (and to a width of at least `min_threshold`)."""
    a_c, b_c, _ = _include_zero(range_min, range_max, min_threshold)
    dtype = a_c.dtype
    levels = 2**n_bits - 1
    delta = (b_c - a_c) / dtype.type(levels)
    zero_point = np.clip(round_values(-a_c / delta, rounding), 0, levels)
    return delta, zero_point


def adjust_range_to_include_zero(
    range_min: float | np.ndarray,
    range_max: float | np.ndarray,
    n_bits: int,
    rounding: Rounding = "half_even",
    *,
    min_threshold: float = DEFAULT_MIN_THRESHOLD,
) -> tuple[np.ndarray, np.ndarray]:
    """(a', b'): the range moved so that zero is a grid point, keeping its width where it straddles zero."""
    delta, zero_point = uniform_grid(range_min, range_max, n_bits, rounding, min_threshold=min_threshold)
    return -zero_point * delta, (2**n_bits - 1 - zero_point) * delta


# ---------------------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------------------


def _symmetric_grid(x, threshold, n_bits, signed, min_threshold, power_of_two, channel_axis):
    t = _param(effective_threshold(threshold, min_threshold, power_of_two), x, channel_axis, "threshold")
    q_min, q_max = symmetric_int_range(n_bits, signed)
    delta = t / x.dtype.type(2 ** (n_bits - int(signed)))
    return delta, q_min, q_max


def fake_quant_symmetric(
    x: np.ndarray,
    threshold: float | np.ndarray,
    n_bits: int,
    signed: bool = True,
    *,
    min_threshold: float = DEFAULT_MIN_THRESHOLD,
    power_of_two: bool = False,
    channel_axis: int | None = None,
    rounding: Rounding = "half_even",
) -> np.ndarray:
    """Symmetric (or power-of-two) fake quantization, per-tensor or per-channel along `channel_axis`."""
    x = _as_float_array(x)
    delta, q_min, q_max = _symmetric_grid(x, threshold, n_bits, signed, min_threshold, power_of_two, channel_axis)
    return delta * np.clip(round_values(x / delta, rounding), q_min, q_max)


def _uniform_grid(x, range_min, range_max, n_bits, channel_axis, rounding, min_threshold):
    a = _param(range_min, x, channel_axis, "range_min")
    b = _param(range_max, x, channel_axis, "range_max")
    delta, zero_point = uniform_grid(a, b, n_bits, rounding, min_threshold=min_threshold)
    delta, zero_point = delta.astype(x.dtype), zero_point.astype(x.dtype)
    levels = 2**n_bits - 1
    return delta, zero_point, -zero_point * delta, (levels - zero_point) * delta, levels


def fake_quant_uniform(
    x: np.ndarray,
    range_min: float | np.ndarray,
    range_max: float | np.ndarray,
    n_bits: int,
    *,
    channel_axis: int | None = None,
    rounding: Rounding = "half_even",
    min_threshold: float = DEFAULT_MIN_THRESHOLD,
) -> np.ndarray:
    """Uniform (affine) fake quantization on the range adjusted to include zero."""
    x = _as_float_array(x)
    delta, zero_point, _, _, levels = _uniform_grid(
        x, range_min, range_max, n_bits, channel_axis, rounding, min_threshold
    )
    return (np.clip(round_values(x / delta + zero_point, rounding), 0, levels) - zero_point) * delta


# ---------------------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------------------


def ste_mask_symmetric(
    x: np.ndarray,
    threshold: float | np.ndarray,
    n_bits: int,
    signed: bool = True,
    *,
    min_threshold: float = DEFAULT_MIN_THRESHOLD,
    power_of_two: bool = False,
    channel_axis: int | None = None,
) -> np.ndarray:
    """∂Q/∂x of the straight-through estimator: True where x lies in [Δ·q_min, Δ·q_max]."""
    x = _as_float_array(x)
    delta, q_min, q_max = _symmetric_grid(x, threshold, n_bits, signed, min_threshold, power_of_two, channel_axis)
    return (x >= delta * q_min) & (x <= delta * q_max)


def ste_mask_uniform(
    x: np.ndarray,
    range_min: float | np.ndarray,
    range_max: float | np.ndarray,
    n_bits: int,
    *,
    channel_axis: int | None = None,
    rounding: Rounding = "half_even",
    min_threshold: float = DEFAULT_MIN_THRESHOLD,
) -> np.ndarray:
    """∂Q/∂x of the straight-through estimator: True where x lies in the adjusted range [a', b']."""
    x = _as_float_array(x)
    _, _, a_adj, b_adj, _ = _uniform_grid(x, range_min, range_max, n_bits, channel_axis, rounding, min_threshold)
    return (x >= a_adj) & (x <= b_adj)


def lsq_grad_scale(num_elements: int, q_max: int) -> float:
    """LSQ's gradient scale g = 1/sqrt(N·q_max) (N taken as 1 for an empty tensor, which has no gradient)."""
    return 1.0 / float(np.sqrt(max(num_elements, 1) * q_max))


def lsq_num_elements_weights(shape: tuple[int, ...], channel_axis: int | None) -> int:
    """N of LSQ for a weight: the elements one threshold acts on (per channel, or the whole tensor)."""
    size = int(np.prod(shape, dtype=np.int64))
    if channel_axis is None:
        return size
    return size // max(int(shape[normalize_axis(channel_axis, len(shape))]), 1)


def lsq_num_elements_activations(shape: tuple[int, ...]) -> int:
    """N of LSQ for an activation: the features of one sample (the paper's N_F), i.e. all but the batch axis."""
    return int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1


def lsq_grads_symmetric(
    x: np.ndarray,
    grad_output: np.ndarray,
    threshold: float | np.ndarray,
    n_bits: int,
    signed: bool = True,
    *,
    num_elements: int,
    min_threshold: float = DEFAULT_MIN_THRESHOLD,
    power_of_two: bool = False,
    channel_axis: int | None = None,
    rounding: Rounding = "half_even",
) -> dict[str, np.ndarray]:
    """Gradients of sum(grad_output·Q(x)) for LSQ with a learnable threshold.

    Returns a dict with "input" (shape of x) and "threshold" (shape of `threshold` as given).
    `num_elements` is N in g = 1/sqrt(N·q_max).
    """
    x = _as_float_array(x)
    grad_output = np.asarray(grad_output, dtype=x.dtype)
    delta, q_min, q_max = _symmetric_grid(x, threshold, n_bits, signed, min_threshold, power_of_two, channel_axis)
    u = x / delta
    below, above = x < delta * q_min, x > delta * q_max
    inside = (x >= delta * q_min) & (x <= delta * q_max)  # not "~below & ~above": NaN is not inside
    d_delta = np.where(below, q_min, np.where(above, q_max, round_values(u, rounding) - u))
    scale = lsq_grad_scale(num_elements, q_max) / 2 ** (n_bits - int(signed))
    d_threshold = _reduce_to(grad_output.astype(np.float64) * d_delta * scale, threshold, channel_axis)
    active = np.asarray(threshold, dtype=np.float64) >= min_threshold
    return {"input": grad_output * inside, "threshold": d_threshold * active}


def lsq_grads_uniform(
    x: np.ndarray,
    grad_output: np.ndarray,
    range_min: float | np.ndarray,
    range_max: float | np.ndarray,
    n_bits: int,
    *,
    num_elements: int,
    channel_axis: int | None = None,
    rounding: Rounding = "half_even",
    min_threshold: float = DEFAULT_MIN_THRESHOLD,
) -> dict[str, np.ndarray]:
    """Gradients of sum(grad_output·Q(x)) for LSQ with learnable range_min / range_max.

    Returns a dict with "input", "range_min" and "range_max" (each parameter in the shape it was given).
    """
    x = _as_float_array(x)
    grad_output = np.asarray(grad_output, dtype=x.dtype).astype(np.float64)
    delta, zero_point, a_adj, b_adj, levels = _uniform_grid(
        x, range_min, range_max, n_bits, channel_axis, rounding, min_threshold
    )
    u = x / delta + zero_point
    below, above = x < a_adj, x > b_adj
    inside = (x >= a_adj) & (x <= b_adj)  # not "~below & ~above": NaN is not inside
    # NaN is not clipped either: its rounding error (NaN) reaches the range gradients.
    rounding_error = np.where(below | above, 0, round_values(u, rounding) - u).astype(np.float64)
    g = lsq_grad_scale(num_elements, levels)
    d_min = grad_output * (np.where(below, 1.0, 0.0) - rounding_error / levels) * g
    d_max = grad_output * (np.where(above, 1.0, 0.0) + rounding_error / levels) * g
    # A range held at its minimal width does not follow its ends: neither gets a gradient there.
    _, _, held = _include_zero(np.asarray(range_min, x.dtype), np.asarray(range_max, x.dtype), min_threshold)
    return {
        "input": (grad_output * inside).astype(x.dtype),
        "range_min": _reduce_to(d_min, range_min, channel_axis) * ((np.asarray(range_min) <= 0) & ~held),
        "range_max": _reduce_to(d_max, range_max, channel_axis) * ((np.asarray(range_max) >= 0) & ~held),
    }


# ---------------------------------------------------------------------------------------------------------
# DQA: a learned mixture of b, 2b and 4b-bit quantizations, annealed to b bits
# ---------------------------------------------------------------------------------------------------------

# The widest DQA candidate: the library's widest grid (and the widest TensorFlow's fused op takes).
DQA_MAX_CANDIDATE_BITS = 16
# DQA's b: at most 8, so that 2b <= 16 and the three candidates are distinct grids.
DQA_MAX_BITS = 8


def dqa_candidate_bits(n_bits: int) -> tuple[int, int, int]:
    """DQA's candidate bit widths (b, 2b, 4b), each at most 16."""
    if isinstance(n_bits, bool) or not isinstance(n_bits, (int, np.integer)) or not 2 <= n_bits <= DQA_MAX_BITS:
        raise QuantizationConfigError(f"n_bits must be an int in 2..{DQA_MAX_BITS} for DQA, got {n_bits!r}")
    b = int(n_bits)
    return b, min(2 * b, DQA_MAX_CANDIDATE_BITS), min(4 * b, DQA_MAX_CANDIDATE_BITS)


def dqa_penalties(n_bits: int) -> np.ndarray:
    """r_i = log2(b_i / b): how much wider each candidate is than b bits (0, 1, 2, or less where capped at 16)."""
    return np.log2(np.asarray(dqa_candidate_bits(n_bits), dtype=np.float64) / n_bits)


def dqa_attention(logits: np.ndarray, temperature: float, n_bits: int) -> np.ndarray:
    """The attention α = softmax(ℓ - r/T) over the candidates (float64).

    `logits` ℓ are the three learned values, r = `dqa_penalties(n_bits)`; T = 0 gives (1, 0, 0) exactly: the
    b-bit quantizer alone.
    """
    logits = np.asarray(logits, dtype=np.float64).reshape(-1)
    if logits.shape != (3,):
        raise QuantizationConfigError(f"logits must hold 3 values (one per candidate), got shape {logits.shape}")
    temperature = float(temperature)
    if not (np.isfinite(temperature) and temperature >= 0):
        raise QuantizationConfigError(f"temperature must be a finite number >= 0, got {temperature!r}")
    r = dqa_penalties(n_bits)
    with np.errstate(divide="ignore"):
        penalty = np.where(r > 0, r / temperature if temperature > 0 else np.inf, 0.0)
    z = logits - penalty
    e = np.exp(z - z.max())
    return e / e.sum()


def _dqa(x, grad_output, n_bits, logits, temperature, quantize, mask):
    """The mixture Σ α_i·Q_i(x) (in x's dtype) and, given `grad_output`, its gradients."""
    x = _as_float_array(x)
    alpha = dqa_attention(logits, temperature, n_bits)
    candidates = [quantize(x, bits) for bits in dqa_candidate_bits(n_bits)]
    if grad_output is None:
        # Summed from the b-bit term, not from 0: 0 + (-0.0) would turn the b-bit quantizer's -0.0 into +0.0.
        y = x.dtype.type(alpha[0]) * candidates[0]
        for a, q in zip(alpha[1:], candidates[1:], strict=True):
            y = y + x.dtype.type(a) * q
        return y
    g = np.asarray(grad_output, dtype=x.dtype).astype(np.float64)
    inside = sum(a * mask(x, bits) for a, bits in zip(alpha, dqa_candidate_bits(n_bits), strict=True))
    # ∂y/∂ℓ_j = α_j·(Q_j - Σ_i α_i·Q_i): softmax's Jacobian; r/T does not depend on ℓ.
    totals = np.array([np.sum(g * q.astype(np.float64)) for q in candidates])
    return {"input": (g * inside).astype(x.dtype), "logits": alpha * (totals - np.dot(alpha, totals))}


def fake_quant_dqa_symmetric(
    x: np.ndarray,
    threshold: float | np.ndarray,
    n_bits: int,
    signed: bool = True,
    *,
    logits: np.ndarray,
    temperature: float,
    min_threshold: float = DEFAULT_MIN_THRESHOLD,
    power_of_two: bool = False,
    channel_axis: int | None = None,
    rounding: Rounding = "half_even",
) -> np.ndarray:
    """DQA's training forward on a symmetric (or power-of-two) grid: Σ α_i·Q_{b_i}(x), all on the same threshold.

    α = `dqa_attention(logits, temperature, n_bits)`; at temperature 0 this is `fake_quant_symmetric` at n_bits.
    """
    def quantize(v, bits):
        return fake_quant_symmetric(v, threshold, bits, signed, min_threshold=min_threshold,
                                    power_of_two=power_of_two, channel_axis=channel_axis, rounding=rounding)

    return _dqa(x, None, n_bits, logits, temperature, quantize, None)


def fake_quant_dqa_uniform(
    x: np.ndarray,
    range_min: float | np.ndarray,
    range_max: float | np.ndarray,
    n_bits: int,
    *,
    logits: np.ndarray,
    temperature: float,
    channel_axis: int | None = None,
    rounding: Rounding = "half_even",
    min_threshold: float = DEFAULT_MIN_THRESHOLD,
) -> np.ndarray:
    """DQA's training forward on a uniform grid: Σ α_i·Q_{b_i}(x), each candidate on the range adjusted to include
    zero at its own bit width."""
    def quantize(v, bits):
        return fake_quant_uniform(v, range_min, range_max, bits, channel_axis=channel_axis, rounding=rounding,
                                  min_threshold=min_threshold)

    return _dqa(x, None, n_bits, logits, temperature, quantize, None)


def dqa_grads_symmetric(
    x: np.ndarray,
    grad_output: np.ndarray,
    threshold: float | np.ndarray,
    n_bits: int,
    signed: bool = True,
    *,
    logits: np.ndarray,
    temperature: float,
    min_threshold: float = DEFAULT_MIN_THRESHOLD,
    power_of_two: bool = False,
    channel_axis: int | None = None,
    rounding: Rounding = "half_even",
) -> dict[str, np.ndarray]:
    """Gradients of sum(grad_output·y) for DQA's training forward on a symmetric grid.

    Returns "input" (Σ α_i times each candidate's straight-through mask) and "logits" (3 values:
    α_j·(G_j - Σ_i α_i·G_i) with G_i = sum(grad_output·Q_{b_i}(x))). The threshold is fixed.
    """
    def quantize(v, bits):
        return fake_quant_symmetric(v, threshold, bits, signed, min_threshold=min_threshold,
                                    power_of_two=power_of_two, channel_axis=channel_axis, rounding=rounding)

    def mask(v, bits):
        return ste_mask_symmetric(v, threshold, bits, signed, min_threshold=min_threshold, power_of_two=power_of_two,
                                  channel_axis=channel_axis)

    return _dqa(x, grad_output, n_bits, logits, temperature, quantize, mask)


def dqa_grads_uniform(
    x: np.ndarray,
    grad_output: np.ndarray,
    range_min: float | np.ndarray,
    range_max: float | np.ndarray,
    n_bits: int,
    *,
    logits: np.ndarray,
    temperature: float,
    channel_axis: int | None = None,
    rounding: Rounding = "half_even",
    min_threshold: float = DEFAULT_MIN_THRESHOLD,
) -> dict[str, np.ndarray]:
    """Gradients of sum(grad_output·y) for DQA's training forward on a uniform grid ("input" and "logits", as
    `dqa_grads_symmetric`). The range is fixed."""
    def quantize(v, bits):
        return fake_quant_uniform(v, range_min, range_max, bits, channel_axis=channel_axis, rounding=rounding,
                                  min_threshold=min_threshold)

    def mask(v, bits):
        return ste_mask_uniform(v, range_min, range_max, bits, channel_axis=channel_axis, rounding=rounding,
                                min_threshold=min_threshold)

    return _dqa(x, grad_output, n_bits, logits, temperature, quantize, mask)


# ---------------------------------------------------------------------------------------------------------
# Initial parameters
# ---------------------------------------------------------------------------------------------------------


def _reduce_axes(x: np.ndarray, channel_axis: int | None) -> tuple[int, ...] | None:
    if channel_axis is None:
        return None
    axis = normalize_axis(channel_axis, x.ndim)
    return tuple(i for i in range(x.ndim) if i != axis)


def max_abs_threshold(
    x: np.ndarray, channel_axis: int | None = None, min_threshold: float = DEFAULT_MIN_THRESHOLD
) -> np.ndarray:
    """max |x| per channel (or over the tensor), at least `min_threshold`."""
    x = _as_float_array(x)
    return np.maximum(np.abs(x).max(axis=_reduce_axes(x, channel_axis)).astype(np.float64), min_threshold)


def min_max_range(x: np.ndarray, channel_axis: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(min, max) per channel (or over the tensor), widened where min == max so that min < max."""
    x = _as_float_array(x)
    axes = _reduce_axes(x, channel_axis)
    low = x.min(axis=axes).astype(np.float64)
    high = x.max(axis=axes).astype(np.float64)
    flat = high <= low
    width = np.maximum(np.abs(low), 1.0) * 1e-3
    return np.where(flat, low - width, low), np.where(flat, high + width, high)


def mse_threshold(
    x: np.ndarray,
    n_bits: int,
    signed: bool = True,
    *,
    channel_axis: int | None = None,
    power_of_two: bool = False,
    min_threshold: float = DEFAULT_MIN_THRESHOLD,
    rounding: Rounding = "half_even",
    num_candidates: int = 100,
) -> np.ndarray:
    """The threshold (per channel or per tensor) minimising the mean squared quantization error.

    Candidates are fractions of max |x| from 1/num_candidates to 1 (symmetric), or the powers of two from
    2^-8 to 1 times the power of two covering max |x| (power-of-two).
    """
    x = _as_float_array(x)
    axes = _reduce_axes(x, channel_axis)
    max_abs = max_abs_threshold(x, channel_axis, min_threshold)
    if power_of_two:
        top = power_of_two_threshold(max_abs)
        scales = 2.0 ** -np.arange(9)
    else:
        top = max_abs
        scales = np.linspace(1.0, 1.0 / num_candidates, num_candidates)
    best = top.copy()
    best_err = np.full(np.shape(top), np.inf)
    for scale in scales:
        candidate = np.maximum(top * scale, min_threshold)
        q = fake_quant_symmetric(
            x, candidate, n_bits, signed, min_threshold=min_threshold, power_of_two=power_of_two,
            channel_axis=channel_axis, rounding=rounding,
        )
        err = np.mean((q.astype(np.float64) - x) ** 2, axis=axes)
        better = err < best_err
        best = np.where(better, candidate, best)
        best_err = np.where(better, err, best_err)
    return best


def mse_range(
    x: np.ndarray,
    n_bits: int,
    *,
    channel_axis: int | None = None,
    rounding: Rounding = "half_even",
    num_candidates: int = 50,
) -> tuple[np.ndarray, np.ndarray]:
    """The (range_min, range_max) minimising the mean squared uniform quantization error.

    Candidates shrink the observed [min, max] towards zero by a common factor from 1 down to 1/num_candidates.
    """
    x = _as_float_array(x)
    axes = _reduce_axes(x, channel_axis)
    low, high = min_max_range(x, channel_axis)
    best_low, best_high = low.copy(), high.copy()
    best_err = np.full(np.shape(low), np.inf)
    for scale in np.linspace(1.0, 1.0 / num_candidates, num_candidates):
        q = fake_quant_uniform(x, low * scale, high * scale, n_bits, channel_axis=channel_axis, rounding=rounding)
        err = np.mean((q.astype(np.float64) - x) ** 2, axis=axes)
        better = err < best_err
        best_low = np.where(better, low * scale, best_low)
        best_high = np.where(better, high * scale, best_high)
        best_err = np.where(better, err, best_err)
    return best_low, best_high
