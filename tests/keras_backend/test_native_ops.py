"""The Keras backend's compiled LSQ gradient op (native.py) against TensorFlow's ops, and its build and fallback.

The op must give the fake-quant gradient op's input gradient bit for bit, its two clipped sums and the rounding-error
sum in a fixed summation order (emulated here in numpy, so equal bits prove the result independent of the thread
count), and the non-finite behaviour of the TensorFlow-ops path it replaces.
"""

from __future__ import annotations

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainable_infra import QuantizationMethod, TrainableQuantizerActivationConfig
from trainable_infra.keras_backend import LSQSymmetricActivationQuantizer, LSQUniformActivationQuantizer, native

f32 = np.float32
BLOCK, VECTORS, WIDTH = 4096, 4, 4  # kernels/lsq_gradient.cc: elements per block, accumulators of four floats

@pytest.fixture(autouse=True, scope="module")
def _built():
    """Builds the op on first use (a few seconds, once per cache), skipping where it cannot be built."""
    if native.ops() is None:
        pytest.skip("the op could not be built here (see the warning)")


def op(dy, x, y, low, high, n_bits, narrow_range=False):
    return native.ops().trainable_infra_fake_quant_lsq_gradient(
        dy, x, y, f32(low), f32(high), num_bits=n_bits, narrow_range=narrow_range
    )


def tensorflow_ops(dy, x, y, low, high, n_bits, narrow_range=False):
    """The TensorFlow-ops path of fake_quant._FusedLSQ.sums, per tensor."""
    dx, below, above = tf.quantization.fake_quant_with_min_max_vars_gradient(
        dy, x, f32(low), f32(high), num_bits=n_bits, narrow_range=narrow_range
    )
    rounding = tf.reduce_sum(tf.math.multiply_no_nan(y - x, dx))
    rounding = tf.where(tf.math.is_nan(tf.reduce_max(x)), f32(np.nan), rounding)
    return dx, below, above, rounding


def fixed_order_sum(terms: np.ndarray) -> float:
    """The op's sum of float32 `terms`: per block of 4096, sixteen float lanes (element i to lane i mod 16) each
    summed in order, the lanes then added in double; the last block's tail past a multiple of 16 in one float;
    the block sums added in double, in order."""
    total = 0.0
    for begin in range(0, terms.size, BLOCK):
        block = terms[begin:begin + BLOCK]
        whole = block.size - block.size % (VECTORS * WIDTH)
        lanes = block[:whole].reshape(-1, VECTORS * WIDTH)
        block_sum = 0.0
        if lanes.size:
            lane_sums = np.cumsum(lanes, axis=0, dtype=f32)[-1]  # cumsum adds in order, in float32
            for lane in lane_sums:
                block_sum += float(lane)
        tail = f32(0.0)
        for term in block[whole:]:
            tail = f32(tail + term)
        total += block_sum + float(tail) if block[whole:].size else block_sum
    return float(f32(total))


def grid_inputs(rng: np.random.Generator, size: int, low: float, high: float, n_bits: int) -> np.ndarray:
    """Values on the grid, half a step off it (ties), one ulp around those, beyond both ends, and random."""
    step = (high - low) / (2**n_bits - 1)
    k = rng.integers(-3, 2**n_bits + 3, size=size).astype(np.float64)
    kinds = rng.integers(0, 5, size=size)
    x = np.where(kinds == 0, low + k * step, low + (k + 0.5) * step).astype(f32)
    x = np.where(kinds == 2, np.nextafter(x, f32(np.inf)), x)
    x = np.where(kinds == 3, np.nextafter(x, f32(-np.inf)), x)
    return np.where(kinds == 4, rng.uniform(low - 2 * step, high + 2 * step, size=size), x).astype(f32)


RANGES = {
    "signed": lambda n: (-1.5, 1.5 - 1.5 * 2.0 ** -(n - 1)),
    "unsigned": lambda n: (0.0, 4.0 - 4.0 * 2.0**-n),
    "nudged": lambda n: (-0.37, 1.91),  # a uniform range whose zero point TensorFlow's Nudge rounds
}


def nudged_range(low: float, high: float, n_bits: int, narrow_range: bool = False) -> tuple[f32, f32]:
    """TensorFlow's Nudge (fake_quant_ops_functor.h) in float32: the range the gradient op clips at."""
    quant_min, quant_max = f32(int(narrow_range)), f32(2**n_bits - 1)
    scale = (f32(high) - f32(low)) / (quant_max - quant_min)
    zero = quant_min - f32(low) / scale
    zero_point = f32(np.clip(np.sign(zero) * np.floor(np.abs(zero) + 0.5), quant_min, quant_max))  # half away
    return (quant_min - zero_point) * scale, (quant_max - zero_point) * scale


CASES = [(size, n_bits, kind, False) for size in [1, 15, 16, 17, 4096, 4097, 3 * 4096 + 21] for n_bits in [2, 8, 16]
         for kind in sorted(RANGES)]
CASES += [(size, n_bits, kind, True) for size in [17, 4097] for n_bits in [2, 8] for kind in sorted(RANGES)]


@pytest.mark.parametrize(("size", "n_bits", "kind", "narrow_range"), CASES)
def test_matches_the_gradient_op_and_a_fixed_summation_order(size, n_bits, kind, narrow_range):
    rng = np.random.default_rng([size, n_bits, sorted(RANGES).index(kind), narrow_range])
    low, high = RANGES[kind](n_bits)
    x = grid_inputs(rng, size, low, high, n_bits)
    dy = rng.normal(size=size).astype(f32)
    y = tf.quantization.fake_quant_with_min_max_vars(
        x, f32(low), f32(high), num_bits=n_bits, narrow_range=narrow_range
    ).numpy()
    dx, below, above, rounding = (t.numpy() for t in op(dy, x, y, low, high, n_bits, narrow_range))
    want = [t.numpy() for t in tensorflow_ops(dy, x, y, low, high, n_bits, narrow_range)]

    np.testing.assert_array_equal(dx.view(np.int32), want[0].view(np.int32))
    nudged_low, nudged_high = nudged_range(low, high, n_bits, narrow_range)
    np.testing.assert_array_equal(dx, dy * ((x >= nudged_low) & (x <= nudged_high)))  # the range emulated right
    errors = np.where(dx == 0, f32(0), (y - x) * dx)
    assert below == fixed_order_sum(dy * (x < nudged_low))
    assert above == fixed_order_sum(dy * (x > nudged_high))
    assert rounding == fixed_order_sum(errors)
    # TensorFlow adds in another order: the same sums up to float rounding.
    for got, expected, terms in [(below, want[1], dy), (above, want[2], dy), (rounding, want[3], errors)]:
        assert abs(float(got) - float(expected)) <= 1e-6 * float(np.abs(terms).sum())


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal values with equal signs, or NaN on both sides."""
    a, b = np.asarray(a, f32), np.asarray(b, f32)
    return bool(np.all((np.isnan(a) & np.isnan(b)) | ((a == b) & (np.signbit(a) == np.signbit(b)))))


@pytest.mark.parametrize(
    "special", ["x+inf", "x-inf", "x-nan", "x-nan-once", "dy+inf", "dy-nan", "dy-inf-outside", "all-nan"]
)
@pytest.mark.parametrize("size", [5, 48, 5000])
def test_non_finite_values_as_the_tensorflow_ops(special, size):
    rng = np.random.default_rng(size)
    low, high = -1.0, 1.0 - 2.0**-7
    x = rng.uniform(-1.2, 1.2, size=size).astype(f32)
    dy = rng.normal(size=size).astype(f32)
    at = rng.choice(size, size=max(1, size // 10), replace=False)
    if special == "x-nan-once":
        x[size // 2] = np.nan  # one NaN, in the vectorized part of the loop where the size is a multiple of 16
    elif special.startswith("x"):
        x[at] = {"x+inf": np.inf, "x-inf": -np.inf, "x-nan": np.nan}[special]
    elif special == "dy-inf-outside":
        x[at], dy[at] = 3.0, np.inf  # clipped: dy·0 is NaN in the gradient op, and in its sum above the range
    elif special == "all-nan":
        x[:] = np.nan
    else:
        dy[at] = {"dy+inf": np.inf, "dy-nan": np.nan}[special]
    y = tf.quantization.fake_quant_with_min_max_vars(x, f32(low), f32(high)).numpy()
    got = [t.numpy() for t in op(dy, x, y, low, high, 8)]
    want = [t.numpy() for t in tensorflow_ops(dy, x, y, low, high, 8)]
    assert same_bits(got[0], want[0]), "input gradient"
    for name, g, w in zip(["below", "above", "rounding"], got[1:], want[1:], strict=True):
        assert np.isnan(g) == np.isnan(w), f"{name}: {g} vs {w}"
        assert np.isnan(g) or np.isclose(g, w, rtol=1e-5, atol=1e-5), f"{name}: {g} vs {w}"


@pytest.mark.parametrize("nan_inputs", [False, True])
def test_a_zero_range_passes_everything_through_as_the_gradient_op(nan_inputs):
    rng = np.random.default_rng(1)
    x = rng.normal(size=100).astype(f32)
    dy = rng.normal(size=100).astype(f32)
    if nan_inputs:  # in the vectorized part and in the tail: dx is still dy there
        x[[3, 50, 98]] = np.nan
        x[[4, 99]] = np.inf
    y = np.zeros_like(x)
    got = [t.numpy() for t in op(dy, x, y, 0.0, 0.0, 8)]
    want = [t.numpy() for t in tensorflow_ops(dy, x, y, 0.0, 0.0, 8)]
    assert same_bits(got[0], dy)
    assert same_bits(want[0], dy)
    assert got[1] == want[1] == 0
    assert got[2] == want[2] == 0
    if nan_inputs:
        assert np.isnan(got[3])
        assert np.isnan(want[3])
    else:
        assert got[3] == pytest.approx(float(want[3]), rel=1e-6)


def test_empty_and_shaped_tensors():
    dx, below, above, rounding = op(np.zeros((0, 3), f32), np.zeros((0, 3), f32), np.zeros((0, 3), f32), -1, 1, 8)
    assert dx.shape == (0, 3)
    assert float(below) == float(above) == float(rounding) == 0.0
    x = np.linspace(-2, 2, 2 * 3 * 5, dtype=f32).reshape(2, 3, 5)
    dx, *_ = op(np.ones_like(x), x, x, -1.0, 1.0, 8)
    assert dx.shape == x.shape


def test_bad_arguments_are_rejected_by_the_op():
    x = np.ones(4, f32)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="must have one shape"):
        op(np.ones(3, f32), x, x, -1.0, 1.0, 8)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="num_bits"):
        op(x, x, x, -1.0, 1.0, 1)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="must be scalars"):
        native.ops().trainable_infra_fake_quant_lsq_gradient(x, x, x, np.zeros(2, f32), f32(1))


# ---------------------------------------------------------------------------------------------------------
# In the quantizers, and without the op
# ---------------------------------------------------------------------------------------------------------


def activation_quantizer(kind: str):
    if kind == "uniform":
        config = TrainableQuantizerActivationConfig(
            QuantizationMethod.UNIFORM, 8, {"range_min": -1.3, "range_max": 2.2}, True, 2**-16
        )
        return LSQUniformActivationQuantizer(config)
    config = TrainableQuantizerActivationConfig(
        QuantizationMethod.SYMMETRIC, 8, {"threshold": 2.0, "is_signed": True}, True, 2**-16
    )
    return LSQSymmetricActivationQuantizer(config)


def quantizer_gradients(kind: str, x: np.ndarray, dy: np.ndarray):
    """(input gradient, parameter gradients, op types of the traced backward) of a fresh quantizer."""
    layer = keras.layers.Layer()
    quantizer = activation_quantizer(kind)
    quantizer.initialize_quantization(x.shape, "act", layer)
    variables = [v.value for v in layer.trainable_weights] or [v.value for v in layer.weights]

    @tf.function
    def grads(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = quantizer(x, training=True)
        return tape.gradient(y, [x, *variables], output_gradients=tf.constant(dy))

    x = tf.constant(x)
    op_types = {o.type for o in grads.get_concrete_function(x).graph.get_operations()}
    values = [g.numpy() for g in grads(x)]
    return values[0], values[1:], op_types


@pytest.mark.parametrize("kind", ["symmetric", "uniform"])
def test_quantizers_give_the_same_gradients_with_and_without_the_op(kind, monkeypatch):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(8, 9, 10, 11)).astype(f32)
    dy = rng.normal(size=x.shape).astype(f32)
    dx, params, op_types = quantizer_gradients(kind, x, dy)
    assert "TrainableInfraFakeQuantLsqGradient" in op_types
    monkeypatch.setattr(native, "ops", lambda: None)
    dx_tf, params_tf, op_types_tf = quantizer_gradients(kind, x, dy)
    assert "TrainableInfraFakeQuantLsqGradient" not in op_types_tf
    assert params
    assert len(params) == len(params_tf)
    np.testing.assert_array_equal(dx.view(np.int32), dx_tf.view(np.int32))
    for got, want in zip(params, params_tf, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("compiled", ["forward and gradient", "forward only"])
def test_xla_compiled_gradients_use_the_tensorflow_ops(compiled):
    """Under XLA (no kernel for the op there) the quantizer keeps TensorFlow's ops, also where only the forward
    is compiled and the gradient taken outside: XLA compiles that backward too."""
    quantizer = activation_quantizer("symmetric")
    layer = keras.layers.Layer()
    quantizer.initialize_quantization((4, 8), "act", layer)
    x = tf.constant(np.linspace(-3, 3, 32, dtype=f32).reshape(4, 8))
    forward = tf.function(lambda x: quantizer(x, training=True), jit_compile=compiled == "forward only")

    @tf.function(jit_compile=compiled == "forward and gradient")
    def grads(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = forward(x)
        return tape.gradient(y, [x, *layer.trainable_weights])

    expected = quantizer_gradients("symmetric", x.numpy(), np.ones((4, 8), f32))
    got = [g.numpy() for g in grads(x)]
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_allclose(got[1], expected[1][0], rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------------------


def test_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setenv(native.DISABLE_ENV, "0")
    native.ops.cache_clear()
    try:
        assert native.ops() is None
    finally:
        monkeypatch.delenv(native.DISABLE_ENV)
        native.ops.cache_clear()
    assert native.ops() is not None


def test_a_failed_build_warns_and_falls_back(monkeypatch, tmp_path):
    compiler = tmp_path / "broken-c++"
    compiler.write_text("#!/bin/sh\necho 'fatal error: no headers here' >&2\nexit 3\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("CXX", str(compiler))
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path / "cache"))
    native.ops.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="could not be built.*exited with 3: fatal error: no headers here"):
            assert native.ops() is None
        assert list((tmp_path / "cache").glob("*.so")) == []  # no partial library left behind
    finally:
        monkeypatch.undo()
        native.ops.cache_clear()
    assert native.ops() is not None


def logging_compiler(directory, log):
    """A C++ compiler command that appends a line to `log` per call and runs the real one."""
    wrapper = directory / "logging-c++"
    wrapper.write_text(f"#!/bin/sh\necho called >> '{log}'\nexec {native.compiler()} \"$@\"\n")
    wrapper.chmod(0o755)
    return str(wrapper)


def test_a_fresh_cache_builds_once_and_is_then_reused(tmp_path, monkeypatch):
    """Two processes on an empty cache: both load the op, one of them compiles (the lock), the library is
    readable by others; later loads do not run the compiler."""
    log = tmp_path / "calls.log"
    cxx = logging_compiler(tmp_path, log)
    cache = tmp_path / "cache"
    env = {**os.environ, native.CACHE_ENV: str(cache), "CXX": cxx}
    code = ("import trainable_infra; from trainable_infra.keras_backend import native; "
            "assert native.ops() is not None; print(native.library_path(native.compiler()))")
    runs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert all(run.returncode == 0 for run in runs), outputs
    paths = {out.strip() for out, _ in outputs}
    assert len(paths) == 1
    assert [p.name for p in cache.glob("*.so")] == [os.path.basename(paths.pop())]
    builds = [line for line in log.read_text().splitlines() if line == "called"]
    # One build; the compiler's --version (part of the cache key) is asked once per process.
    assert len(builds) == 3, builds
    library = next(cache.glob("*.so"))
    assert library.stat().st_mode & 0o755 == 0o755

    monkeypatch.setenv(native.CACHE_ENV, str(cache))
    monkeypatch.setenv("CXX", cxx)

    def no_compiler(command, *args, **kwargs):
        if "--version" not in command:
            raise AssertionError(f"compiler called: {command}")
        return subprocess.CompletedProcess(command, 0, stdout="", stderr="")

    assert native.build(cxx) == library
    monkeypatch.setattr(subprocess, "run", no_compiler)
    assert native.build(cxx) == library


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path / "explicit"))
    assert native.cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv(native.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert native.cache_dir() == tmp_path / "xdg" / "trainable_infra"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setattr(native.Path, "home", classmethod(lambda cls: (_ for _ in ()).throw(RuntimeError("no home"))))
    assert native.cache_dir().parent == native.Path(native.tempfile.gettempdir())
