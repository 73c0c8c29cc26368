"""NaN, ±Inf and runaway parameters in training, both backends (docs/concepts.md, "Non-finite values").

tests/numerics/test_nonfinite.py pins what every quantizer kind does with NaN and ±Inf inputs: NaN gives NaN,
±Inf the range ends, neither gets an input gradient, a NaN input makes LSQ parameter gradients NaN and ±Inf inputs
leave them finite. Here: what an optimizer step then does to a quantizer, the guards that keep a threshold pushed
to or below zero and a collapsed uniform range usable (and converted as used), NaN and ±Inf parameters, and the
`check_finite` debugging mode.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.numerics.adapters import ADAPTERS
from tests.numerics.cases import MIN_THRESHOLD, case_params, find_case, forward_inputs
from tests.numerics.params import backend_case_params
from trainable_infra import (
    NonFiniteError,
    QuantizationConfigError,
    QuantizationMethod,
    TrainableQuantizerActivationConfig,
    TrainableQuantizerWeightsConfig,
    check_finite,
)
from trainable_infra.common import numerics as nm
from trainable_infra.common.debug import FINITE_CHECKS

torch = pytest.importorskip("torch")
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
from trainable_infra import keras_backend as kb  # noqa: E402 - after the import guards
from trainable_infra import pytorch_backend as pb  # noqa: E402

f32 = np.float32
# One case per quantizer kind that learns its parameters (8 bits): weights per-channel, activations per-tensor.
LSQ_KINDS = [find_case(f"LSQ-{method}-{target}-8b-{layout}") for method in ("SYMMETRIC", "POWER_OF_TWO", "UNIFORM")
             for target, layout in (("weights", "axis0"), ("activation", "across-zero" if method == "UNIFORM"
                                                                        else "signed"))]
THRESHOLD_KINDS = [case for case in LSQ_KINDS if not case.is_uniform]
RANGE_KINDS = [case for case in LSQ_KINDS if case.is_uniform]


def _assign(backend: str, variable, values) -> None:
    """Set a quantizer variable to `values` (broadcast to its shape), as an optimizer would."""
    if backend == "keras":
        variable.assign(np.broadcast_to(np.asarray(values, f32), variable.shape))
    else:
        with torch.no_grad():
            variable.copy_(torch.from_numpy(np.array(np.broadcast_to(np.asarray(values, f32), variable.shape))))


def _value(variable) -> np.ndarray:
    return np.asarray(variable.detach() if isinstance(variable, torch.Tensor) else variable.numpy(), np.float64)


def _sgd_step(backend: str, built, grads: dict[str, np.ndarray], lr: float) -> None:
    for name, variable in ADAPTERS[backend].trainable(built).items():
        value = _value(variable)
        _assign(backend, variable, (value.reshape(-1) - lr * grads[name]).reshape(value.shape))


# --- What an optimizer step does with NaN and ±Inf inputs ---------------------------------------------------------


@pytest.mark.parametrize(("backend", "case"), backend_case_params(LSQ_KINDS))
def test_one_nan_input_makes_its_lsq_parameters_nan_and_then_all_their_outputs(backend, case):
    """After one SGD step on a batch with one NaN, the parameters it reached (per-tensor: all; per-channel: its
    channel's) are NaN, and so is every output they quantize; the other channels are untouched."""
    adapter = ADAPTERS[backend]
    params = case_params(case)
    built = adapter.build(case, params)
    x = forward_inputs(case, params)
    poisoned = x.copy()
    where = np.unravel_index(7, x.shape)
    poisoned[where] = np.nan
    _sgd_step(backend, built, adapter.gradients(built, poisoned, np.ones_like(x)), lr=0.01)
    hit = np.zeros(case.channels, bool)
    hit[where[case.axis] if case.axis is not None else 0] = True
    for name, variable in adapter.trainable(built).items():
        value = _value(variable).reshape(-1)
        assert np.array_equal(np.isnan(value), hit), f"{backend} {case.id}: {name} = {value}"
    outputs_hit = hit.reshape(nm.broadcast_shape(x.ndim, case.axis)) if case.axis is not None else hit[0]
    for training in (True, False):
        y = adapter.forward(built, x, training)
        assert np.array_equal(np.isnan(y), np.broadcast_to(outputs_hit, y.shape)), f"{backend} {case.id}"


@pytest.mark.parametrize(("backend", "case"), backend_case_params(LSQ_KINDS))
def test_infinite_inputs_train_lsq_parameters_like_clipped_values(backend, case):
    """±Inf inputs pull the range ends as the largest finite values would: the parameters stay finite."""
    adapter = ADAPTERS[backend]
    params = case_params(case)
    x = forward_inputs(case, params)
    infinite, largest = x.copy(), x.copy()
    infinite.reshape(-1)[::9] = np.resize([np.inf, -np.inf], infinite.reshape(-1)[::9].size)
    largest.reshape(-1)[::9] = np.resize([np.finfo(f32).max, -np.finfo(f32).max], largest.reshape(-1)[::9].size)
    built = adapter.build(case, params)
    with_infinities = adapter.gradients(built, infinite, np.ones_like(x))
    with_largest = adapter.gradients(built, largest, np.ones_like(x))
    for name in case.learnable_names:
        assert np.all(np.isfinite(with_infinities[name])), f"{backend} {case.id}: {name} {with_infinities[name]}"
        np.testing.assert_allclose(with_infinities[name], with_largest[name], rtol=1e-6, atol=1e-7)
    _sgd_step(backend, built, with_infinities, lr=0.01)
    assert np.all(np.isfinite(adapter.forward(built, x, True)))


# --- Guards: a threshold at or below zero, a collapsed uniform range -----------------------------------------------


def _drive_down(backend: str, case, built, x: np.ndarray) -> None:
    """One SGD step with a huge learning rate on a loss whose gradient pushes the threshold down (range: range_max
    down and range_min up, across each other)."""
    adapter = ADAPTERS[backend]
    if case.is_uniform:
        center = (_value(adapter.trainable(built)["range_min"]).mean() + _value(adapter.trainable(built)["range_max"])
                  .mean()) / 2
        dy = np.where(x > center, 1.0, -1.0).astype(f32)
    else:
        dy = np.sign(x).astype(f32)
    _sgd_step(backend, built, adapter.gradients(built, x, dy), lr=1e6)


def _effective_threshold(backend: str, quantizer) -> np.ndarray:
    if backend == "keras":
        return np.asarray(quantizer.current_threshold(), np.float64)
    return quantizer.effective_threshold().cpu().numpy().astype(np.float64)


def _exported_threshold(backend: str, inferable) -> np.ndarray:
    # mct-quantizers keeps the threshold as `threshold` (Keras) and `threshold_np` (PyTorch).
    return np.asarray(inferable.threshold if backend == "keras" else inferable.threshold_np, np.float64).reshape(-1)


def _assert_within_one_step(got: np.ndarray, expected: np.ndarray, delta: np.ndarray, label: str) -> None:
    """Rule 2: equal but for a step Δ at rounding ties (and a few float32 ulps, TensorFlow's op)."""
    error = np.abs(got - expected)
    bound = np.broadcast_to(delta, got.shape) * (1 + 1e-6) + 4 * np.spacing(np.abs(expected).astype(f32))
    assert np.all(error <= bound), f"{label}: {int((error > bound).sum())} outputs off by {error.max()}"


@pytest.mark.parametrize("value", [0.0, -1.0, 1e-30, "sgd"])
@pytest.mark.parametrize(("backend", "case"), backend_case_params(THRESHOLD_KINDS))
def test_threshold_at_or_below_zero_quantizes_and_converts_as_min_threshold(backend, case, value):
    adapter = ADAPTERS[backend]
    params = case_params(case)
    built = adapter.build(case, params)
    x = forward_inputs(case, params)
    variable = adapter.trainable(built)["threshold"]
    if value == "sgd":
        _drive_down(backend, case, built, x)
        assert np.all(_value(variable) < -1e3), _value(variable)
    else:
        _assign(backend, variable, value)
    effective = _effective_threshold(backend, built.quantizer)
    np.testing.assert_array_equal(effective, np.full(case.channels, MIN_THRESHOLD))  # a power of two already
    np.testing.assert_array_equal(_exported_threshold(backend, built.quantizer.convert2inferable()), effective)
    small = x * f32(MIN_THRESHOLD)  # inputs over the minimal range and beyond it
    for inputs in (x, small):
        y = adapter.forward(built, inputs, False)
        assert np.all(np.isfinite(y))
        np.testing.assert_array_equal(adapter.forward(built, inputs, True), y)
        np.testing.assert_array_equal(adapter.inferable(built, inputs), y)  # what is trained is what is deployed
        threshold = _value(variable).reshape(-1)
        expected = nm.fake_quant_symmetric(
            inputs, threshold if case.axis is not None else threshold[0], case.n_bits, case.signed,
            min_threshold=MIN_THRESHOLD, power_of_two=case.method is QuantizationMethod.POWER_OF_TWO,
            channel_axis=case.axis, rounding=adapter.rounding,
        )
        _assert_within_one_step(y, expected, MIN_THRESHOLD / 2 ** (case.n_bits - 1), f"{backend} {case.id}")
    grads = adapter.gradients(built, small, np.ones_like(x))
    assert np.all(grads["threshold"] == 0), "a threshold held at min_threshold gets no gradient"


COLLAPSED_RANGES = {"zero": (0.0, 0.0), "crossed": (0.3, -0.2), "narrow": (-1e-7, 1e-7), "sgd": None}


@pytest.mark.parametrize("kind", list(COLLAPSED_RANGES))
@pytest.mark.parametrize(("backend", "case"), backend_case_params(RANGE_KINDS))
def test_collapsed_uniform_range_is_held_at_min_threshold_wide(backend, case, kind):
    adapter = ADAPTERS[backend]
    params = case_params(case)
    built = adapter.build(case, params)
    x = forward_inputs(case, params)
    named = adapter.trainable(built)
    if kind == "sgd":
        _drive_down(backend, case, built, x)
        assert np.all(_value(named["range_max"]) < 0)
        assert np.all(_value(named["range_min"]) > 0)
    else:
        _assign(backend, named["range_min"], COLLAPSED_RANGES[kind][0])
        _assign(backend, named["range_max"], COLLAPSED_RANGES[kind][1])
    low, high = (_value(named[name]).reshape(-1) for name in ("range_min", "range_max"))
    a_c = np.minimum(low, 0).astype(f32)
    assert np.all(np.maximum(high, 0).astype(f32) < a_c + f32(MIN_THRESHOLD)), "the guard is not in use"
    # The effective range: [a, a + min_threshold] with a = min(range_min, 0), in both backends.
    if backend == "keras":
        effective = np.asarray(built.quantizer.current_range(), np.float64)
    else:
        effective = np.stack([t.cpu().numpy() for t in built.quantizer.effective_range()]).astype(np.float64)
    np.testing.assert_array_equal(effective, np.stack([a_c, a_c + f32(MIN_THRESHOLD)]).astype(np.float64))
    small = x * f32(MIN_THRESHOLD)
    for inputs in (x, small):
        y = adapter.forward(built, inputs, False)
        assert np.all(np.isfinite(y))
        np.testing.assert_array_equal(adapter.forward(built, inputs, True), y)
        np.testing.assert_array_equal(adapter.inferable(built, inputs), y)
        expected = nm.fake_quant_uniform(inputs, low if case.axis is not None else low[0],
                                         high if case.axis is not None else high[0], case.n_bits,
                                         channel_axis=case.axis, rounding=adapter.rounding,
                                         min_threshold=MIN_THRESHOLD)
        delta, _ = nm.uniform_grid(low, high, case.n_bits, min_threshold=MIN_THRESHOLD)
        delta = delta.reshape(nm.broadcast_shape(x.ndim, case.axis)) if case.axis is not None else delta[0]
        _assert_within_one_step(y, expected, delta, f"{backend} {case.id} {kind}")
    grads = adapter.gradients(built, small, np.ones_like(x))
    for name in ("range_min", "range_max"):
        assert np.all(grads[name] == 0), f"{name} of a range held at its minimal width gets {grads[name]}"


# --- NaN and ±Inf parameters ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
@pytest.mark.parametrize(("backend", "case"), backend_case_params(LSQ_KINDS))
def test_nonfinite_parameter_gives_nan_outputs_and_is_refused_by_conversion(backend, case, value):
    adapter = ADAPTERS[backend]
    params = case_params(case)
    built = adapter.build(case, params)
    name = "range_max" if case.is_uniform else "threshold"
    _assign(backend, adapter.trainable(built)[name], value)
    x = forward_inputs(case, params)
    for training in (True, False):
        y = adapter.forward(built, x, training)
        assert np.all(np.isnan(y)), f"{backend} {case.id}: {name} = {value} gives {np.unique(y[~np.isnan(y)])[:4]}"
    with pytest.raises(NonFiniteError, match=rf"{type(built.quantizer).__name__} cannot be converted .*{name} is "
                                             r"not finite"):
        built.quantizer.convert2inferable()


# --- check_finite ---------------------------------------------------------------------------------------------------


def test_check_finite_works_as_a_function_and_as_a_context_manager():
    assert not FINITE_CHECKS.enabled
    check_finite(True)
    try:
        assert FINITE_CHECKS.enabled
        with check_finite(False):
            assert not FINITE_CHECKS.enabled
            with check_finite():
                assert FINITE_CHECKS.enabled
            assert not FINITE_CHECKS.enabled
        assert FINITE_CHECKS.enabled
    finally:
        check_finite(False)
    assert not FINITE_CHECKS.enabled
    with pytest.raises(QuantizationConfigError, match="enabled must be a bool, got 'yes'"):
        check_finite("yes")
    assert not FINITE_CHECKS.enabled


def _symmetric(method=QuantizationMethod.SYMMETRIC):
    return TrainableQuantizerActivationConfig(method, 8, {"threshold": 2.0, "is_signed": True}, True, MIN_THRESHOLD)


def _uniform():
    return TrainableQuantizerActivationConfig(QuantizationMethod.UNIFORM, 8, {"range_min": -1.0, "range_max": 3.0},
                                              True, MIN_THRESHOLD)


def _weights():
    return TrainableQuantizerWeightsConfig(QuantizationMethod.SYMMETRIC, 8, {"threshold": 1.0}, True, 0, True,
                                           MIN_THRESHOLD)


class _Torch:
    """A holder (LSQ symmetric), a wrapped Linear (LSQ weights) and a holder (LSQ uniform), in PyTorch."""

    name = "pytorch"

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(
            pb.PytorchTrainableActivationQuantizationHolder(pb.LSQSymmetricActivationQuantizer(_symmetric())),
            pb.PytorchTrainableQuantizationWrapper(torch.nn.Linear(6, 4),
                                                   {"weight": pb.LSQSymmetricWeightQuantizer(_weights())}),
            pb.PytorchTrainableActivationQuantizationHolder(pb.LSQUniformActivationQuantizer(_uniform())),
        )
        self.holder, self.wrapper, self.uniform = (self.model[i] for i in range(3))
        self.weight = self.wrapper.module.weight
        self.holder_pattern = r"PytorchTrainableActivationQuantizationHolder\(LSQSymmetricActivationQuantizer\)"
        self.wrapper_pattern = r"the 'weight' quantizer \(LSQSymmetricWeightQuantizer\) of " \
                               r"PytorchTrainableQuantizationWrapper\(Linear"

    def variable(self, layer, key: str):
        quantizer = getattr(layer, "activation_holder_quantizer", None) or layer.weights_quantizers["weight"]
        return quantizer.get_quantizer_variable(key)

    def run(self, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """The output of a training step's forward pass, and the gradients of its sum."""
        out = self.model(torch.from_numpy(x))
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(out.sum(), parameters)
        return out.detach().numpy(), [g.numpy() for g in grads]


class _Keras:
    """The same in Keras: a holder, a wrapped Dense and a uniform holder."""

    name = "keras"

    def __init__(self) -> None:
        keras.utils.set_random_seed(0)
        self.holder = kb.KerasActivationQuantizationHolder(kb.LSQSymmetricActivationQuantizer(_symmetric()),
                                                           name="in_q")
        self.wrapper = kb.KerasTrainableQuantizationWrapper(
            keras.layers.Dense(4, name="dense"), {"kernel": kb.LSQSymmetricWeightQuantizer(
                TrainableQuantizerWeightsConfig(QuantizationMethod.SYMMETRIC, 8, {"threshold": 1.0}, True, -1, True,
                                                MIN_THRESHOLD))})
        self.uniform = kb.KerasActivationQuantizationHolder(kb.LSQUniformActivationQuantizer(_uniform()), name="out_q")
        self.model = keras.Sequential([keras.Input((6,)), self.holder, self.wrapper, self.uniform])
        self.weight = self.wrapper.layer.kernel
        self.holder_pattern = r"layer 'in_q' \(LSQSymmetricActivationQuantizer\)"
        self.wrapper_pattern = r"layer 'quant_dense', the 'kernel' quantizer \(LSQSymmetricWeightQuantizer\)"

    def variable(self, layer, key: str):
        quantizer = getattr(layer, "activation_holder_quantizer", None) or layer.weights_quantizers["kernel"]
        return next(entry.variable for name, entry in quantizer.quantizer_parameters.items() if name.endswith(key))

    def run(self, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        with tf.GradientTape() as tape:
            out = self.model(x, training=True)
            total = tf.reduce_sum(out)
        grads = tape.gradient(total, self.model.trainable_variables)
        return out.numpy(), [g.numpy() for g in grads]


BACKENDS = [_Torch, _Keras]
X = np.random.default_rng(0).normal(size=(5, 6)).astype(f32)


def _with(x: np.ndarray, value: float) -> np.ndarray:
    x = x.copy()
    x[2, 3] = value
    return x


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_check_finite_names_the_layer_and_tensor_of_a_nonfinite_input(backend):
    net = backend()
    with check_finite():
        with pytest.raises(NonFiniteError, match=net.holder_pattern + r" received its input with 1 NaN of 30 values, "
                                                 r"the first at index \(2, 3\)"):
            net.run(_with(X, np.nan))
        with pytest.raises(NonFiniteError, match=net.holder_pattern + r" received its input with 1 -Inf of 30"):
            net.run(_with(X, -np.inf))
        original = _value(net.weight)
        _assign(net.name, net.weight, np.where(np.arange(original.size).reshape(original.shape) == 5, np.inf,
                                               original))
        with pytest.raises(NonFiniteError, match=net.wrapper_pattern + r".* received \w+\.(weight|kernel) with "
                                                                         r"1 \+Inf of 24 values"):
            net.run(X)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_check_finite_rejects_nan_nonpositive_threshold_and_empty_range(backend):
    net = backend()
    threshold = net.variable(net.holder, "threshold")
    with check_finite():
        _assign(net.name, threshold, np.nan)
        with pytest.raises(NonFiniteError, match=net.holder_pattern + r" has variable '\w*threshold' with 1 NaN"):
            net.run(X)
        _assign(net.name, threshold, -0.5)
        with pytest.raises(NonFiniteError, match=r"has variable '\w*threshold' <= 0: \[?-0\.5\]?; a threshold must"):
            net.run(X)
        _assign(net.name, threshold, 2.0)
        weight_threshold = net.variable(net.wrapper, "threshold")
        _assign(net.name, weight_threshold, [1.0, 0.0, 1.0, 1.0])
        with pytest.raises(NonFiniteError, match=net.wrapper_pattern + r".*<= 0: \[1\.0, 0\.0, 1\.0, 1\.0\]"):
            net.run(X)
        _assign(net.name, weight_threshold, 1.0)
        _assign(net.name, net.variable(net.uniform, "range_min"), 0.5)
        _assign(net.name, net.variable(net.uniform, "range_max"), 0.5)
        with pytest.raises(NonFiniteError, match=r"has an empty range: '\w*range_max' = \[?0\.5\]? is not above "
                                                 r"'\w*range_min'"):
            net.run(X)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_check_finite_is_silent_on_finite_values_and_changes_nothing(backend):
    net = backend()
    out, grads = net.run(X)
    with check_finite():
        checked_out, checked_grads = net.run(X)
    np.testing.assert_array_equal(checked_out, out)
    assert len(checked_grads) == len(grads) == 6  # the weight, the bias and four quantizer parameters
    for checked, plain in zip(checked_grads, grads, strict=True):
        np.testing.assert_array_equal(checked, plain)
    # Off, a NaN passes silently: NaN outputs, NaN LSQ gradients.
    out, grads = net.run(_with(X, np.nan))
    assert np.isnan(out).any()
    assert any(np.isnan(g).any() for g in grads)


# TensorFlow says that functions running eagerly does not extend to tf.data's: the checks need only the model's.
@pytest.mark.filterwarnings("ignore:Even though the `tf.config.experimental_run_functions_eagerly`:UserWarning")
def test_check_finite_makes_keras_fit_raise_even_for_a_model_fitted_before():
    net = _Keras()
    net.model.compile(optimizer="sgd", loss="mse")
    y = np.zeros((len(X), 4), f32)
    net.model.fit(X, y, epochs=1, verbose=0)  # traces the training step without the checks
    eager_before = tf.config.functions_run_eagerly()
    with check_finite():
        assert tf.config.functions_run_eagerly()
        with pytest.raises(NonFiniteError, match=net.holder_pattern + " received its input with 1 NaN"):
            net.model.fit(_with(X, np.nan), y, epochs=1, verbose=0)
    assert tf.config.functions_run_eagerly() is eager_before
    net.model.fit(_with(X, np.nan), y, epochs=1, verbose=0)  # off again: the traced step, no checks
    assert np.isnan(_value(net.variable(net.holder, "threshold"))).all()


def test_check_finite_adds_nothing_to_a_compiled_pytorch_graph_when_off():
    net = _Torch()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(net.model)(torch.from_numpy(X))
    assert explained.graph_break_count == 0
    assert explained.graph_count == 1
    targets = " ".join(str(node.target) for graph in explained.graphs for node in graph.graph.nodes)
    assert "isfinite" not in targets
    compiled = torch.compile(net.model, backend="eager")
    np.testing.assert_array_equal(compiled(torch.from_numpy(X)).detach().numpy(), net.run(X)[0])
    with check_finite(), pytest.raises(NonFiniteError, match=net.holder_pattern):
        compiled(torch.from_numpy(_with(X, np.nan)))
    torch._dynamo.reset()
