"""Every built-in PyTorch quantizer against its inferable quantizer (rule 1) and the numpy reference (rule 2).

DQA quantizers are built at the end of their temperature schedule, where they train as their b-bit quantizer and
all of this holds; their mixture is tested by tests/numerics and test_dqa.py.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from mct_quantizers.pytorch.quantizers import WeightsUniformInferableQuantizer

from tests.parity import assert_rule2, probe_inputs
from trainable_infra import (
    QuantizationMethod,
    TrainableQuantizerActivationConfig,
    TrainableQuantizerWeightsConfig,
    TrainingMethod,
    VariableGroup,
)
from trainable_infra.common import numerics as nm
from trainable_infra.pytorch_backend import (
    DQASymmetricActivationQuantizer,
    DQASymmetricWeightQuantizer,
    DQAUniformActivationQuantizer,
    DQAUniformWeightQuantizer,
    LSQSymmetricActivationQuantizer,
    LSQSymmetricWeightQuantizer,
    LSQUniformActivationQuantizer,
    LSQUniformWeightQuantizer,
    STESymmetricActivationQuantizer,
    STESymmetricWeightQuantizer,
    STEUniformActivationQuantizer,
    STEUniformWeightQuantizer,
)

SYM, POT, UNI = QuantizationMethod.SYMMETRIC, QuantizationMethod.POWER_OF_TWO, QuantizationMethod.UNIFORM
QUANTIZERS = {
    (TrainingMethod.STE, "weights", False): STESymmetricWeightQuantizer,
    (TrainingMethod.STE, "weights", True): STEUniformWeightQuantizer,
    (TrainingMethod.STE, "activation", False): STESymmetricActivationQuantizer,
    (TrainingMethod.STE, "activation", True): STEUniformActivationQuantizer,
    (TrainingMethod.LSQ, "weights", False): LSQSymmetricWeightQuantizer,
    (TrainingMethod.LSQ, "weights", True): LSQUniformWeightQuantizer,
    (TrainingMethod.LSQ, "activation", False): LSQSymmetricActivationQuantizer,
    (TrainingMethod.LSQ, "activation", True): LSQUniformActivationQuantizer,
    (TrainingMethod.DQA, "weights", False): DQASymmetricWeightQuantizer,
    (TrainingMethod.DQA, "weights", True): DQAUniformWeightQuantizer,
    (TrainingMethod.DQA, "activation", False): DQASymmetricActivationQuantizer,
    (TrainingMethod.DQA, "activation", True): DQAUniformActivationQuantizer,
}
MIN_THRESHOLD = 2.0**-16
# CPU always; CUDA too where a GPU is present (the fused kernels are the CUDA path).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@dataclasses.dataclass(frozen=True)
class Case:
    training: TrainingMethod
    method: QuantizationMethod
    target: str  # "weights" or "activation"
    n_bits: int
    layout: str  # weights: "per-channel-axis0", "per-channel-axis-1", "per-tensor"; activation: "signed", ...

    @property
    def id(self) -> str:
        return f"{self.training.name}-{self.method.name}-{self.target}-{self.n_bits}bit-{self.layout}"

    @property
    def shape(self) -> tuple[int, ...]:
        return (6, 3, 3, 4) if self.target == "weights" else (5, 4, 3, 3)

    @property
    def axis(self) -> int | None:
        return {"per-channel-axis0": 0, "per-channel-axis-1": -1}.get(self.layout)

    @property
    def signed(self) -> bool:
        return self.target == "weights" or self.layout == "signed"


def _cases() -> list[Case]:
    cases = []
    for training in TrainingMethod:
        for n_bits in (2, 4, 8):
            for method in (SYM, POT, UNI):
                for layout in ("per-channel-axis0", "per-channel-axis-1", "per-tensor"):
                    cases.append(Case(training, method, "weights", n_bits, layout))
                ranges = ("positive-range", "negative-range", "straddling")
                for layout in ranges if method is UNI else ("signed", "unsigned"):
                    cases.append(Case(training, method, "activation", n_bits, layout))
    return cases


CASES = _cases()


def _params(case: Case, rng: np.random.Generator) -> dict:
    channels = case.shape[case.axis] if case.axis is not None else 1
    if case.method is UNI:
        if case.layout == "positive-range":
            low, high = rng.uniform(0.1, 0.5, channels), rng.uniform(2.0, 4.0, channels)
        elif case.layout == "negative-range":
            low, high = rng.uniform(-4.0, -2.0, channels), rng.uniform(-0.5, -0.1, channels)
        else:
            low, high = rng.uniform(-3.0, -0.2, channels), rng.uniform(0.3, 3.0, channels)
        return {"range_min": low, "range_max": high}
    params = {"threshold": rng.uniform(0.3, 3.0, channels)}
    if case.target == "activation":
        params["is_signed"] = case.signed
    return params


def build(case: Case, seed: int = 0, device: str = "cpu"):
    """The quantizer of `case`, initialized on a bare module on `device`, and the numpy view of its parameters."""
    rng = np.random.default_rng(seed)
    params = _params(case, rng)
    if case.target == "weights":
        per_channel = case.axis is not None
        config = TrainableQuantizerWeightsConfig(
            case.method, case.n_bits, params, True, case.axis if per_channel else None, per_channel, MIN_THRESHOLD
        )
    else:
        config = TrainableQuantizerActivationConfig(case.method, case.n_bits, params, True, MIN_THRESHOLD)
    quantizer = QUANTIZERS[(case.training, case.target, case.method is UNI)](config)
    layer = torch.nn.Module()
    quantizer.initialize_quantization(case.shape if case.target == "weights" else None, "t", layer)
    if case.training is TrainingMethod.DQA:
        quantizer.step.fill_(quantizer.temperature_schedule.t_end)
    layer.to(device)
    return quantizer, layer, params


def reference(case: Case, params: dict, x: np.ndarray) -> dict:
    """Reference forward, grid and (for a random upstream gradient) gradients."""
    axis = case.axis
    if case.method is UNI:
        low, high = params["range_min"], params["range_max"]
        delta, zero_point = nm.uniform_grid(low, high, case.n_bits)
        view = nm.broadcast_shape(x.ndim, axis) if axis is not None else ()
        delta = delta.astype(np.float32).reshape(view)
        zero_point = zero_point.astype(np.float32).reshape(view)
        forward = nm.fake_quant_uniform(x, low if axis is not None else low[0], high if axis is not None else high[0],
                                        case.n_bits, channel_axis=axis)
        return {"forward": forward, "delta": delta, "steps": x / delta + zero_point}
    threshold = params["threshold"] if axis is not None else params["threshold"][0]
    power_of_two = case.method is POT
    t = nm.effective_threshold(threshold, MIN_THRESHOLD, power_of_two)
    view = nm.broadcast_shape(x.ndim, axis) if axis is not None else ()
    delta = (np.asarray(t, np.float32) / np.float32(2 ** (case.n_bits - int(case.signed)))).reshape(view)
    forward = nm.fake_quant_symmetric(x, threshold, case.n_bits, case.signed, min_threshold=MIN_THRESHOLD,
                                      power_of_two=power_of_two, channel_axis=axis)
    return {"forward": forward, "delta": delta, "steps": x / delta}


def reference_grads(case: Case, params: dict, x: np.ndarray, grad_out: np.ndarray) -> dict:
    axis = case.axis
    n = (nm.lsq_num_elements_weights(x.shape, axis) if case.target == "weights"
         else nm.lsq_num_elements_activations(x.shape))
    if case.method is UNI:
        low, high = params["range_min"], params["range_max"]
        return nm.lsq_grads_uniform(x, grad_out, low, high, case.n_bits, num_elements=n, channel_axis=axis)
    return nm.lsq_grads_symmetric(
        x, grad_out, params["threshold"], case.n_bits, case.signed, num_elements=n, min_threshold=MIN_THRESHOLD,
        power_of_two=case.method is POT, channel_axis=axis,
    )


def probe(case: Case, ref_delta: np.ndarray, params: dict, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if case.method is UNI:
        low, high = nm.adjust_range_to_include_zero(params["range_min"], params["range_max"], case.n_bits)
        view = ref_delta.shape
        low, high = low.astype(np.float32).reshape(view), high.astype(np.float32).reshape(view)
    else:
        q_min, q_max = nm.symmetric_int_range(case.n_bits, case.signed)
        low, high = ref_delta * q_min, ref_delta * q_max
    return probe_inputs(rng, case.shape, ref_delta, low, high)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_eval_output_is_bit_identical_to_inferable(case, device):
    quantizer, _, params = build(case, device=device)
    grid = reference(case, params, np.zeros(case.shape, np.float32))
    x = torch.from_numpy(probe(case, grid["delta"], params)).to(device)
    trained = quantizer(x, training=False)
    deployed = quantizer.convert2inferable()(x.clone())
    assert torch.equal(trained, deployed), f"{case.id}: max |Δ| {float((trained - deployed).abs().max())}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_training_forward_matches_reference(case, device):
    quantizer, _, params = build(case, device=device)
    x_np = probe(case, reference(case, params, np.zeros(case.shape, np.float32))["delta"], params)
    ref = reference(case, params, x_np)
    x = torch.from_numpy(x_np).to(device)
    out = quantizer(x.clone().requires_grad_(), training=True).detach().cpu().numpy()
    assert_rule2(out, ref["forward"], ref["steps"], ref["delta"], case.id)
    np.testing.assert_array_equal(out, quantizer(x, training=False).cpu().numpy())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_gradients_match_reference(case, device):
    quantizer, _, params = build(case, device=device)
    rng = np.random.default_rng(2)
    grid = reference(case, params, np.zeros(case.shape, np.float32))
    # Random values only (no constructed ties): the parameter gradient sums rounding errors, which a tie flips.
    x_np = probe(case, grid["delta"], params)
    x_np = np.where(np.abs(x_np) >= 1e6, x_np, (x_np + rng.uniform(-1e-3, 1e-3, x_np.shape)).astype(np.float32))
    grad_out = rng.normal(size=case.shape).astype(np.float32)
    x = torch.from_numpy(x_np).to(device).requires_grad_()
    quantizer(x, training=True).backward(torch.from_numpy(grad_out).to(device))
    ref = reference_grads(case, params, x_np, grad_out)
    np.testing.assert_array_equal(x.grad.cpu().numpy(), ref["input"], err_msg=f"{case.id}: input gradient")
    names = ["range_min", "range_max"] if case.method is UNI else ["threshold"]
    learning = []
    for name in names:
        variable = quantizer.get_quantizer_variable(name)
        if case.training is not TrainingMethod.LSQ:
            assert variable.grad is None, f"{case.id}: {case.training.name} {name} must not be trained"
            continue
        expected = np.asarray(ref[name], np.float64).reshape(-1)
        grad = variable.grad.cpu().numpy()
        np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6, err_msg=f"{case.id}: gradient of {name}")
        # A range end clamped to 0 (range_min > 0 or range_max < 0) is the one parameter without a gradient.
        assert np.any(grad != 0) == np.any(expected != 0), f"{case.id}: {name}"
        learning.append(np.any(expected != 0))
    if case.training is TrainingMethod.LSQ:
        assert any(learning), f"{case.id}: no quantization parameter receives a gradient"


@pytest.mark.parametrize("training", list(TrainingMethod))
def test_trainable_variables_follow_method_and_freeze(training):
    case = Case(training, SYM, "weights", 4, "per-channel-axis0")
    quantizer, layer, _ = build(case)
    expected = 1 if training is TrainingMethod.LSQ else 0
    assert len(quantizer.get_trainable_variables(VariableGroup.QPARAMS)) == expected
    # DQA's attention logits are trained with the weights.
    dqa = training is TrainingMethod.DQA
    assert len(quantizer.get_trainable_variables(VariableGroup.WEIGHTS)) == int(dqa)
    assert [name for name, _ in layer.named_parameters()] == ["t_threshold"] + ["t_attention"] * dqa
    frozen = type(quantizer)(quantizer.quantization_config, freeze_quant_params=True)
    frozen.initialize_quantization(case.shape, "t", torch.nn.Module())
    assert frozen.get_trainable_variables(VariableGroup.QPARAMS) == []
    assert not frozen.get_quantizer_variable("threshold").requires_grad


def test_power_of_two_threshold_is_exact_near_powers_of_two():
    case = Case(TrainingMethod.STE, POT, "activation", 8, "signed")
    quantizer, _, _ = build(case)
    with torch.no_grad():
        quantizer.threshold.copy_(torch.tensor([np.nextafter(np.float32(4.0), np.float32(5.0))]))
    assert quantizer.effective_threshold().item() == 8.0
    with torch.no_grad():
        quantizer.threshold.fill_(4.0)
    assert quantizer.effective_threshold().item() == 4.0


def test_uniform_inferable_gets_the_trained_zero_point():
    case = Case(TrainingMethod.STE, UNI, "weights", 8, "per-tensor")
    quantizer, _, _ = build(case)
    with torch.no_grad():
        quantizer.range_min.fill_(-2.6509883)
        quantizer.range_max.fill_(0.3504363)
    delta, zero_point = quantizer.grid()
    assert int(zero_point) == 225
    d, z = float(delta), float(zero_point)
    if not torch.cuda.is_available():  # mct-quantizers derives it on the GPU when there is one
        # Its own float32 derivation from this (exact) adjusted range truncates the zero point to 224.
        assert int(WeightsUniformInferableQuantizer(8, [-z * d], [(255 - z) * d], False).zero_points) == 224
    inferable = quantizer.convert2inferable()
    assert torch.equal(inferable.zero_points, zero_point)
    x = torch.linspace(-4, 4, 1001)
    assert torch.equal(quantizer(x, training=False), inferable(x.clone()))
    reference = nm.fake_quant_uniform(x.numpy(), -2.6509883, 0.3504363, 8)
    assert_rule2(inferable(x.clone()).numpy(), reference, x.numpy() / d + z, d, "uniform zero point")


def test_get_config_round_trip_rebuilds_equal_quantizer():
    case = Case(TrainingMethod.LSQ, UNI, "weights", 4, "per-channel-axis0")
    quantizer, _, _ = build(case)
    rebuilt = type(quantizer).from_config(quantizer.get_config())
    assert rebuilt.quantization_config == quantizer.quantization_config
    assert rebuilt.get_config() == quantizer.get_config()
