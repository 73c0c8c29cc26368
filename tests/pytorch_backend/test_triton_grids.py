"""The Triton kernels' own grid maths: (Δ, z) from a quantizer's parameters, the integer bias, and what a training
pass launches.

The LSQ kernels compute each channel's grid from the threshold or range (`kernel_grid()`) instead of being handed
(Δ, z): that grid must be `grid()`'s bit for bit, over parameter values at and beyond every edge (below
min_threshold, powers of two and their neighbours, overflow, Inf, NaN, inverted and narrow ranges). The CPU runs
the kernels under Triton's interpreter; CUDA (where present) runs them compiled.
"""

from __future__ import annotations

import contextlib
import gc
from unittest import mock

import numpy as np
import pytest
import torch
from torch import nn

from tests.pytorch_backend.exact import same_bits
from tests.pytorch_backend.test_quantizers import DEVICES, MIN_THRESHOLD, POT, SYM, UNI
from trainable_infra import (
    QATConfig,
    TrainableQuantizerActivationConfig,
    TrainableQuantizerWeightsConfig,
    TrainingMethod,
)
from trainable_infra.pytorch_backend import (
    LSQSymmetricActivationQuantizer,
    LSQSymmetricWeightQuantizer,
    LSQUniformActivationQuantizer,
    LSQUniformWeightQuantizer,
    STESymmetricWeightQuantizer,
    quantize_model,
)
from trainable_infra.pytorch_backend.integer import quantize_bias
from trainable_infra.pytorch_backend.quantizers import triton_kernels

if not triton_kernels.available():
    pytest.skip("triton is not installed, or was not imported before TensorFlow (run with `pytest -p triton`)",
                allow_module_level=True)

F32 = np.float32

# Thresholds around every edge of max(t, min_threshold) and of the power-of-two rounding.
THRESHOLDS = np.array([
    0.0, -1.0, MIN_THRESHOLD / 2, MIN_THRESHOLD, np.nextafter(F32(MIN_THRESHOLD), F32(1)), 0.3, 0.5, 1.0,
    np.nextafter(F32(1), F32(2)), np.nextafter(F32(1), F32(0)), 2.0, 3.0, 6.0, 1000.0, 2.0**100,
    np.nextafter(F32(2.0**127), F32(0)), 3e38, np.finfo(F32).max, np.inf, np.nan,
], dtype=F32)
# (range_min, range_max) pairs: straddling, one-sided, inverted, collapsed, narrower than min_threshold, wide.
RANGES = np.array([
    (-1.0, 1.0), (-0.3, 2.7), (0.5, 3.0), (-4.0, -1.0), (2.0, 1.0), (0.0, 0.0), (-0.0, 0.0),
    (-MIN_THRESHOLD / 4, MIN_THRESHOLD / 8), (-1e-3, 1e-3), (-1e30, 1e30), (-3e38, 3e38), (-1.0, np.nan),
    (np.nan, 1.0), (-7.1, 0.0), (0.0, 5.5), (-2.0**-10, 2.0**-11),
], dtype=F32)


def _quantizer(method, weights: bool, channels: int, params: dict, n_bits: int, signed: bool = True):
    params = dict(params)
    if weights:
        config = TrainableQuantizerWeightsConfig(method, n_bits, params, True, 0, True, MIN_THRESHOLD)
        cls = LSQUniformWeightQuantizer if method is UNI else LSQSymmetricWeightQuantizer
        shape = (channels, 3)
    else:
        if method is not UNI:
            params["is_signed"] = signed
        config = TrainableQuantizerActivationConfig(method, n_bits, params, True, MIN_THRESHOLD)
        cls = LSQUniformActivationQuantizer if method is UNI else LSQSymmetricActivationQuantizer
        shape = None
    quantizer = cls(config)
    quantizer.initialize_quantization(shape, "t", nn.Module())
    return quantizer


def _write(quantizer, **values: np.ndarray) -> None:
    """Set parameters to values the config's validation would refuse (a trained state can reach them)."""
    with torch.no_grad():
        for name, value in values.items():
            quantizer.get_quantizer_variable(name).copy_(torch.from_numpy(value))
    quantizer.forget_grid()


def _triton(device: str) -> contextlib.AbstractContextManager[None]:
    return triton_kernels.force_interpreter() if device == "cpu" else triton_kernels.triton_mode("auto")


def _check_grid(quantizer, device: str, what: str) -> None:
    """The kernel's Δ, its fake-quantized probe and its mask against `grid()` and the torch path, bit for bit,
    on every channel whose Δ is finite (over three blocks of the kernel per channel)."""
    quantizer._layer.to(device)
    delta, zero_point = quantizer._compute_grid()
    finite = delta.isfinite() & (delta > 0)
    steps = torch.arange(-1300, 1300, dtype=torch.float32, device=device) / 2
    x = (steps[None, :] * torch.where(finite, delta, torch.ones_like(delta))[:, None]).contiguous()
    axis = 0 if quantizer.axis is not None else None
    with _triton(device):
        out, mask, step = triton_kernels.fake_quantize(x if axis is not None else x.reshape(-1),
                                                       quantizer.kernel_grid(), axis, quantizer.q_min,
                                                       quantizer.q_max, with_mask=True, with_step=True)
    same = same_bits(step.cpu(), delta.cpu())
    assert bool(same.all()), f"{what}: Δ {step.cpu()[~same].tolist()} vs {delta.cpu()[~same].tolist()}"
    out, mask = out.reshape(x.shape).cpu(), mask.reshape(x.shape).cpu()
    with triton_kernels.triton_mode("off"):
        expected = quantizer.fake_quantize(x.cpu().reshape(out.shape) if axis is not None else x.cpu().reshape(-1),
                                           delta.cpu(), zero_point.cpu()).reshape(x.shape)
    low, high = quantizer.bounds(delta.cpu(), zero_point.cpu())
    inside = (x.cpu() >= low.reshape(-1, 1)) & (x.cpu() <= high.reshape(-1, 1))
    for channel in torch.nonzero(finite.cpu()).flatten().tolist():
        same = same_bits(out[channel], expected[channel])
        assert bool(same.all()), f"{what}, channel {channel}: {int((~same).sum())} outputs differ"
        assert torch.equal(mask[channel], inside[channel]), f"{what}, channel {channel}: mask"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_bits", [2, 8, 16])
@pytest.mark.parametrize("method", [SYM, POT], ids=["symmetric", "power-of-two"])
def test_symmetric_grid_from_thresholds(method, n_bits, device):
    """Per-channel weights (every edge threshold at once) and signed / unsigned per-tensor activations."""
    quantizer = _quantizer(method, True, len(THRESHOLDS), {"threshold": np.ones(len(THRESHOLDS))}, n_bits)
    _write(quantizer, threshold=THRESHOLDS)
    _check_grid(quantizer, device, f"{method.name} weights, {n_bits} bits")
    for signed in (True, False):
        for threshold in THRESHOLDS:
            quantizer = _quantizer(method, False, 1, {"threshold": 1.0}, n_bits, signed)
            _write(quantizer, threshold=np.asarray(threshold, F32).reshape(quantizer.threshold.shape))
            _check_grid(quantizer, device, f"{method.name} activation, signed={signed}, t={threshold!r}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_bits", [2, 8, 16])
def test_uniform_grid_from_ranges(n_bits, device):
    quantizer = _quantizer(UNI, True, len(RANGES), {"range_min": -np.ones(len(RANGES)),
                                                     "range_max": np.ones(len(RANGES))}, n_bits)
    _write(quantizer, range_min=np.ascontiguousarray(RANGES[:, 0]), range_max=np.ascontiguousarray(RANGES[:, 1]))
    _check_grid(quantizer, device, f"uniform weights, {n_bits} bits")
    for low, high in RANGES:
        quantizer = _quantizer(UNI, False, 1, {"range_min": -1.0, "range_max": 1.0}, n_bits)
        shape = quantizer.range_min.shape
        _write(quantizer, range_min=np.asarray(low, F32).reshape(shape), range_max=np.asarray(high, F32).reshape(shape))
        _check_grid(quantizer, device, f"uniform activation [{low!r}, {high!r}]")


def test_power_of_two_below_normal_min_threshold_is_handed_the_grid():
    """A min_threshold below the smallest normal float32 would make the bit rounding wrong: the grid is given,
    and the threshold's gradient is still masked where the threshold is under min_threshold."""
    config = TrainableQuantizerActivationConfig(POT, 8, {"threshold": 1.0, "is_signed": True}, True, 2.0**-130)
    quantizer = LSQSymmetricActivationQuantizer(config)
    quantizer.initialize_quantization(None, "t", nn.Module())
    assert quantizer.kernel_grid().kind == triton_kernels.GIVEN
    assert _quantizer(POT, False, 1, {"threshold": 1.0}, 8).kernel_grid().kind == triton_kernels.POWER_OF_TWO
    x = torch.linspace(-3, 3, 50).reshape(2, 25)
    for threshold in (1.5, -0.5):
        _write(quantizer, threshold=np.asarray(threshold, F32).reshape(quantizer.threshold.shape))
        grads = []
        for mode in ("off", "interpret"):
            quantizer.threshold.grad = None
            with triton_kernels.triton_mode(mode):
                quantizer(x.clone().requires_grad_(), True).square().sum().backward()
            grads.append(quantizer.threshold.grad.clone())
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)
        assert bool((grads[1] != 0).all()) == (threshold > 0), f"threshold {threshold}: {grads[1]}"


@pytest.mark.parametrize("device", DEVICES)
def test_bias_kernel_matches_the_torch_rounding(device):
    """Exact ties (power-of-two steps), values rounding to ±0, saturation at the int32 range, NaN; per-channel and
    per-tensor weight steps."""
    rng = np.random.default_rng(0)
    x_step = torch.tensor([2.0**-4], device=device)
    w_exact = (2.0 ** -rng.integers(3, 12, 64)).astype(F32)
    ties = (np.arange(-32, 32) + 0.5).astype(F32) * w_exact * F32(2.0**-4)
    bias = np.concatenate([ties, rng.normal(size=64).astype(F32), -0.3 * w_exact * F32(2.0**-4),
                           np.array([0.0, -0.0, 3e38, -3e38, 1e7, -1e7, 2.0**31, np.inf, -np.inf, np.nan], F32)])
    w_steps = np.concatenate([w_exact, rng.uniform(1e-4, 1e-2, 64).astype(F32), w_exact,
                              rng.uniform(1e-4, 1e-2, 10).astype(F32)])
    bias_t = torch.from_numpy(bias).to(device)
    for w_step in (torch.from_numpy(w_steps), torch.tensor([3e-3])):
        w_step = w_step.to(device)
        with triton_kernels.triton_mode("off"):
            expected = quantize_bias(bias_t.cpu(), x_step.cpu(), w_step.cpu())
        with _triton(device), mock.patch.object(triton_kernels, "_launch", wraps=triton_kernels._launch) as launch:
            actual = quantize_bias(bias_t, x_step, w_step)
        assert launch.call_count == 1
        same = same_bits(actual.cpu(), expected)
        assert bool(same.all()), f"{int((~same).sum())} differ: {actual.cpu()[~same]} vs {expected[~same]}"


class _Ops(torch.utils._python_dispatch.TorchDispatchMode):
    """The torch ops that launch a kernel (not views, allocations or metadata)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not (func.is_view or func.__name__.startswith(("empty", "detach", "alias", "lift_fresh", "_to_copy"))):
            self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _kernels_of(fn) -> tuple[list[str], list[str]]:
    """(Triton launches, torch kernels) of `fn`, under the interpreter."""
    launched: list[str] = []
    original = triton_kernels._launch

    def launch(kernel, *args, **kwargs):
        launched.append(kernel.fn.__name__)
        with torch.utils._python_dispatch._disable_current_modes():
            original(kernel, *args, **kwargs)

    ops = _Ops()
    with triton_kernels.force_interpreter(), mock.patch.object(triton_kernels, "_launch", launch), ops:
        fn()
    return launched, ops.ops


@pytest.mark.parametrize("method", [SYM, POT, UNI], ids=lambda m: m.name)
@pytest.mark.parametrize("weights", [True, False], ids=["weights", "activation"])
def test_lsq_pass_is_one_kernel_forward_and_two_backward(method, weights):
    """No small torch kernels for the grid or the parameter gradients: what CUDA launches per quantizer pass."""
    params = {"range_min": -np.ones(4), "range_max": np.ones(4)} if method is UNI else {"threshold": np.ones(4)}
    if not weights:
        params = {name: value[:1].item() for name, value in params.items()}
    quantizer = _quantizer(method, weights, 4, params, 8)
    x = torch.randn(4, 3, requires_grad=True) if weights else torch.randn(2, 5, 3, requires_grad=True)
    quantizer(x, True).backward(torch.ones_like(x))  # decorate the kernels outside the count
    held = {}
    forward = _kernels_of(lambda: held.update(out=quantizer(x, True)))
    backward = _kernels_of(lambda: held["out"].backward(torch.ones_like(x)))
    assert forward == (["_pass_kernel"], []), forward
    # ones_like is the test's own upstream gradient; the parameters' gradients accumulate into .grad (add_).
    assert backward[0] == ["_pass_kernel", "_finish_kernel"], backward
    assert [op for op in backward[1] if op not in ("ones_like", "add_")] == [], backward


def test_lsq_keeps_the_step_its_output_lies_on():
    quantizer = _quantizer(SYM, False, 1, {"threshold": 2.0}, 8)
    x = torch.randn(2, 8)
    out = quantizer(x, True)
    kept = quantizer.step_for(out)
    assert torch.equal(kept, quantizer.grid()[0])
    assert quantizer.step_for(out) is kept, "the step of the latest output is handed over, not computed"
    assert quantizer.step_for(out.flatten()[1:]) is kept, "a view holds the same grid's values"
    assert quantizer.step_for(out.clone()) is not kept, "any other tensor gets the grid's own step"
    assert quantizer.step_for(None) is not kept
    with torch.no_grad():
        quantizer.threshold.mul_(2.0)
    # `out` still lies on the grid it was quantized with: its step is handed over, not the new grid's.
    assert quantizer.step_for(out) is kept
    assert torch.equal(quantizer.step_for(out.clone()), quantizer._compute_grid()[0])
    assert not torch.equal(kept, quantizer._compute_grid()[0])
    del out
    gc.collect()
    assert quantizer.__dict__["_output_step"][0]() is None, "the kept reference must not hold the output alive"
    quantizer.forget_grid()
    assert "_output_step" not in quantizer.__dict__


def _lsq_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3),
                          nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    config = QATConfig(weight_training_method=TrainingMethod.LSQ, activation_training_method=TrainingMethod.LSQ)
    return quantize_model(model, config, [torch.randn(4, 3, 8, 8)], progress=False)


def test_lsq_model_step_on_the_kernels_matches_the_torch_path():
    """A whole LSQ model: outputs and input gradient bit-identical to the torch path, the bias on the same grid,
    parameter gradients within float32 summation order; no quantizer grid computed in torch on the way."""
    x = torch.randn(4, 3, 8, 8)
    results = []
    for mode in ("off", "interpret"):
        model = _lsq_model().train()
        data = x.clone().requires_grad_()
        with triton_kernels.triton_mode(mode):
            out = model(data)
            out.square().sum().backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((out.detach(), data.grad, grads))
    (out_off, dx_off, grads_off), (out_on, dx_on, grads_on) = results
    assert bool(same_bits(out_on, out_off).all())
    assert bool(same_bits(dx_on, dx_off).all())
    assert grads_on.keys() == grads_off.keys()
    assert any("threshold" in name for name in grads_on)
    for name, grad in grads_on.items():
        torch.testing.assert_close(grad, grads_off[name], rtol=1e-5, atol=1e-6, msg=name)
    model = _lsq_model().train()
    model(x)  # decorate the kernels outside the count
    launched, ops = _kernels_of(lambda: model(x))
    assert not {"clamp_min", "div", "zeros_like"} & set(ops), f"a grid computed in torch: {ops}"
    assert launched.count("_bias_kernel") == 3, launched  # both convolutions and the linear layer


def test_ste_quantizer_hands_its_kept_grid_to_the_kernel():
    config = TrainableQuantizerWeightsConfig(SYM, 8, {"threshold": np.ones(4)}, True, 0, True, MIN_THRESHOLD)
    quantizer = STESymmetricWeightQuantizer(config)
    quantizer.initialize_quantization((4, 3), "t", nn.Module())
    x = torch.randn(4, 3, requires_grad=True)
    quantizer(x, True)
    launched, ops = _kernels_of(lambda: quantizer(x, True).sum().backward())
    assert launched == ["_pass_kernel"]
    assert not {"div", "clamp_min", "mul", "zeros_like"} & set(ops), ops


def test_model_with_kept_steps_saves_whole(tmp_path):
    """torch.save of a whole model after LSQ calls (the kept steps are weak references, left out of the pickle)."""
    model = _lsq_model().train()
    x = torch.randn(4, 3, 8, 8)
    model(x)
    model.eval()
    expected = model(x)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert torch.equal(loaded(x), expected)


def test_compiled_lsq_model_with_kept_steps_is_one_graph():
    """Steps kept by eager calls are not read in a traced graph (the grid is computed there): fullgraph holds."""
    model = _lsq_model().train()
    x = torch.randn(4, 3, 8, 8)
    eager = model(x)  # every LSQ quantizer keeps a step now
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.sum().backward()
    assert torch.equal(out.detach(), eager.detach())
