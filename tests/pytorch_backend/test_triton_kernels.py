"""The Triton fast path against the torch path it replaces.

Forward outputs and input gradients must be bit-identical; LSQ parameter gradients are the same sums added in
another order, so they are compared with the numerics suite's tolerance for parameter gradients (rtol 1e-5,
atol 1e-6), against the torch path and against the float64 numpy reference. On the CPU the kernels run under
Triton's interpreter (`force_interpreter`), on CUDA (where present) compiled.

Where TensorFlow is installed, mct-quantizers loads it, and triton must be imported before it (its LLVM aborts
the process otherwise): run this file with `pytest -p triton ...`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from unittest import mock

import numpy as np
import pytest
import torch

from tests.parity import probe_inputs
from tests.pytorch_backend.exact import assert_same_bits
from trainable_infra import (
    QuantizationMethod,
    TrainableQuantizerActivationConfig,
    TrainableQuantizerWeightsConfig,
    TrainingMethod,
)
from trainable_infra.common import numerics as nm
from trainable_infra.common.errors import QuantizationConfigError
from trainable_infra.pytorch_backend import (
    LSQSymmetricActivationQuantizer,
    LSQSymmetricWeightQuantizer,
    LSQUniformActivationQuantizer,
    LSQUniformWeightQuantizer,
    STESymmetricActivationQuantizer,
    STESymmetricWeightQuantizer,
    STEUniformActivationQuantizer,
    STEUniformWeightQuantizer,
)
from trainable_infra.pytorch_backend.quantizers import triton_kernels
from trainable_infra.pytorch_backend.quantizers.fake_quant import fake_quantize
from trainable_infra.pytorch_backend.quantizers.triton_kernels import KernelGrid

if not triton_kernels.available():
    pytest.skip("triton is not installed, or was not imported before TensorFlow (run with `pytest -p triton`)",
                allow_module_level=True)

SYM, POT, UNI = QuantizationMethod.SYMMETRIC, QuantizationMethod.POWER_OF_TWO, QuantizationMethod.UNIFORM
STE, LSQ = TrainingMethod.STE, TrainingMethod.LSQ
QUANTIZERS = {
    (STE, True, False): STESymmetricWeightQuantizer, (STE, True, True): STEUniformWeightQuantizer,
    (STE, False, False): STESymmetricActivationQuantizer, (STE, False, True): STEUniformActivationQuantizer,
    (LSQ, True, False): LSQSymmetricWeightQuantizer, (LSQ, True, True): LSQUniformWeightQuantizer,
    (LSQ, False, False): LSQSymmetricActivationQuantizer, (LSQ, False, True): LSQUniformActivationQuantizer,
}
MIN_THRESHOLD = 2.0**-16
# Not multiples of the kernels' block (1024): activations span two blocks, weight channels end mid-block.
WEIGHT_SHAPE = (7, 5, 3, 11)
ACTIVATION_SHAPE = (3, 5, 9, 11)
# The CPU runs the kernels under the interpreter; CUDA (where present) runs them compiled.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@dataclasses.dataclass(frozen=True)
class Kind:
    method: QuantizationMethod
    weights: bool
    layout: str  # weights: "axis0", "axis-1", "per-tensor"; activations: "signed", "unsigned", ranges

    @property
    def id(self) -> str:
        return f"{self.method.name}-{'weights' if self.weights else 'activation'}-{self.layout}"

    @property
    def shape(self) -> tuple[int, ...]:
        return WEIGHT_SHAPE if self.weights else ACTIVATION_SHAPE

    @property
    def axis(self) -> int | None:
        return {"axis0": 0, "axis-1": -1}.get(self.layout)


KINDS = [
    Kind(SYM, True, "axis0"), Kind(POT, True, "per-tensor"), Kind(UNI, True, "axis-1"), Kind(UNI, True, "axis0"),
    Kind(SYM, False, "signed"), Kind(POT, False, "unsigned"), Kind(UNI, False, "straddling"),
    Kind(UNI, False, "positive"),
]


def _params(kind: Kind, rng: np.random.Generator) -> dict:
    channels = kind.shape[kind.axis] if kind.axis is not None else 1
    if kind.method is UNI:
        if kind.layout == "positive":
            return {"range_min": rng.uniform(0.1, 0.5, channels), "range_max": rng.uniform(2.0, 4.0, channels)}
        return {"range_min": rng.uniform(-3.0, -0.2, channels), "range_max": rng.uniform(0.3, 3.0, channels)}
    params = {"threshold": rng.uniform(0.3, 3.0, channels)}
    if not kind.weights:
        params["is_signed"] = kind.layout == "signed"
    return params


def _build(training: TrainingMethod, kind: Kind, device: str, n_bits: int = 8):
    params = _params(kind, np.random.default_rng(0))
    if kind.weights:
        per_channel = kind.axis is not None
        config = TrainableQuantizerWeightsConfig(kind.method, n_bits, params, True, kind.axis, per_channel,
                                                 MIN_THRESHOLD)
    else:
        config = TrainableQuantizerActivationConfig(kind.method, n_bits, params, True, MIN_THRESHOLD)
    quantizer = QUANTIZERS[(training, kind.weights, kind.method is UNI)](config)
    layer = torch.nn.Module()
    quantizer.initialize_quantization(kind.shape if kind.weights else None, "t", layer)
    layer.to(device)
    return quantizer, params


def _probe(quantizer, kind: Kind, seed: int) -> np.ndarray:
    """Values over and beyond the range, with grid points, rounding ties and the range ends mixed in."""
    delta, zero_point = (t.cpu().double().numpy() for t in quantizer.grid())
    view = [1] * len(kind.shape)
    if kind.axis is not None:
        view[kind.axis] = -1
    delta, zero_point = delta.reshape(view), zero_point.reshape(view)
    low, high = (quantizer.q_min - zero_point) * delta, (quantizer.q_max - zero_point) * delta
    return probe_inputs(np.random.default_rng(seed), kind.shape, delta, low, high)


def _triton(device: str) -> contextlib.AbstractContextManager[None]:
    return triton_kernels.force_interpreter() if device == "cpu" else triton_kernels.triton_mode("auto")


def _variables(quantizer, kind: Kind) -> list[torch.Tensor]:
    names = ["range_min", "range_max"] if kind.method is UNI else ["threshold"]
    return [quantizer.get_quantizer_variable(name) for name in names]


def _step(quantizer, kind, x_np, grad_np, dtype, memory_format, device):
    """(output, input gradient, parameter gradients) of one training step."""
    for variable in _variables(quantizer, kind):
        variable.grad = None
    x = torch.from_numpy(x_np).to(device, dtype).contiguous(memory_format=memory_format).requires_grad_()
    out = quantizer(x, training=True)
    out.backward(torch.from_numpy(grad_np).to(device, dtype).contiguous(memory_format=memory_format))
    grads = [v.grad.clone() if v.grad is not None else None for v in _variables(quantizer, kind)]
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("kind", KINDS, ids=[k.id for k in KINDS])
@pytest.mark.parametrize("training", [STE, LSQ], ids=["STE", "LSQ"])
def test_matches_torch_path(training, kind, dtype, memory_format, device):
    """Output and input gradient bit-identical, parameter gradients within the suite's tolerance."""
    quantizer, _ = _build(training, kind, device)
    case = f"{training.name}-{kind.id}-{dtype}-{memory_format}-{device}"
    x_np = _probe(quantizer, kind, seed=1)
    grad_np = np.random.default_rng(2).normal(size=kind.shape).astype(np.float32)
    # The reference is the torch path on the CPU, the written-out float32 operations of DESIGN.md §4. On CUDA
    # the torch path's fused kernels agree with it except for float16 inputs with a per-channel zero point,
    # which they compute wrongly (values far off the grid); the Triton kernels compute the float32 operations.
    reference, _ = _build(training, kind, "cpu")
    with triton_kernels.triton_mode("off"):
        expected = _step(reference, kind, x_np, grad_np, dtype, memory_format, "cpu")
    with _triton(device), mock.patch.object(triton_kernels, "_launch", wraps=triton_kernels._launch) as launch:
        actual = _step(quantizer, kind, x_np, grad_np, dtype, memory_format, device)
    layout = actual[0].stride(), actual[1].stride()
    actual = (actual[0].cpu(), actual[1].cpu(), [None if g is None else g.cpu() for g in actual[2]])
    # STE: the forward kernel (its backward is one select on the mask); LSQ: the forward kernel, the backward
    # pass over x and the parameter gradients' kernel.
    expected_launches = 1 if training is STE else 3
    assert launch.call_count == expected_launches, f"{case}: {launch.call_count} Triton launches"
    assert_same_bits(actual[0], expected[0], f"{case}: output")
    assert_same_bits(actual[1], expected[1], f"{case}: input gradient")
    assert layout[0] == layout[1], f"{case}: layout"
    for got, want in zip(actual[2], expected[2], strict=True):
        if training is STE:
            assert got is None, f"{case}: STE parameters must not be trained"
            assert want is None, f"{case}: STE parameters must not be trained"
            continue
        # Same terms, summed per block and then over the blocks: float32 rounding apart.
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"{case}: parameter gradient")


@pytest.mark.parametrize("kind", [k for k in KINDS if k.layout != "axis0" or k.method is SYM], ids=lambda k: k.id)
def test_lsq_parameter_gradients_match_float64_reference(kind):
    """Off the rounding ties (a tie flips a rounding error), the sums match numpy's float64 reference."""
    quantizer, params = _build(LSQ, kind, "cpu", n_bits=4)
    rng = np.random.default_rng(5)
    x_np = _probe(quantizer, kind, seed=3)
    x_np = np.where(np.abs(x_np) >= 1e6, x_np, x_np + rng.uniform(-1e-3, 1e-3, x_np.shape)).astype(np.float32)
    grad_np = rng.normal(size=kind.shape).astype(np.float32)
    with triton_kernels.force_interpreter():
        _, x_grad, grads = _step(quantizer, kind, x_np, grad_np, torch.float32, torch.contiguous_format, "cpu")
    n = nm.lsq_num_elements_weights(kind.shape, kind.axis) if kind.weights else nm.lsq_num_elements_activations(
        kind.shape)
    if kind.method is UNI:
        ref = nm.lsq_grads_uniform(x_np, grad_np, params["range_min"], params["range_max"], 4, num_elements=n,
                                   channel_axis=kind.axis)
        names = ["range_min", "range_max"]
    else:
        signed = kind.weights or kind.layout == "signed"
        ref = nm.lsq_grads_symmetric(x_np, grad_np, params["threshold"], 4, signed, num_elements=n,
                                     min_threshold=MIN_THRESHOLD, power_of_two=kind.method is POT,
                                     channel_axis=kind.axis)
        names = ["threshold"]
    np.testing.assert_array_equal(x_grad.numpy(), ref["input"], err_msg=f"{kind.id}: input gradient")
    learning = []
    for name, grad in zip(names, grads, strict=True):
        expected = np.asarray(ref[name], np.float64).reshape(-1)
        np.testing.assert_allclose(grad.numpy(), expected, rtol=1e-5, atol=1e-6, err_msg=f"{kind.id}: {name}")
        learning.append(bool(np.any(expected != 0)))
    # A range end clamped to 0 (range_min > 0) is the one parameter without a gradient.
    assert any(learning), f"{kind.id}: no parameter receives a gradient"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("zero_point", [0, 7])
def test_ties_round_half_to_even_and_far_values_clip(device, zero_point):
    """Every tie k + 1/2 in and beyond the range, huge values and ±Inf: as torch's fused kernel, bit for bit."""
    delta = torch.tensor([2.0**-5], device=device)
    z = torch.tensor([zero_point], dtype=torch.int32, device=device)
    steps = torch.arange(-140, 140, dtype=torch.float32, device=device) + 0.5
    x = torch.cat([steps * delta, torch.tensor([3e38, -3e38, float("inf"), -float("inf"), 0.0, -0.0], device=device)])
    with _triton(device):
        out, mask, _ = triton_kernels.fake_quantize(x, KernelGrid.given(delta, z), None, -128, 127, with_mask=True)
    assert_same_bits(out, torch.fake_quantize_per_tensor_affine(x, delta, z, -128, 127), "fused op")
    with triton_kernels.triton_mode("off"):
        assert_same_bits(out, fake_quantize(x, delta, z, None, (), -128, 127), "torch path")
    inside = (x >= (-128 - zero_point) * delta) & (x <= (127 - zero_point) * delta)
    assert torch.equal(mask, inside)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_stays_nan_and_passes_no_gradient(device):
    """NaN in, NaN out, input gradient 0 (the CPU path's promise; torch's fused kernels return the low end)."""
    delta, z = torch.tensor([0.1], device=device), torch.tensor([3], dtype=torch.int32, device=device)
    x = torch.tensor([float("nan"), 0.25, -0.3], device=device)
    with _triton(device):
        out, mask, _ = triton_kernels.fake_quantize(x, KernelGrid.given(delta, z), None, 0, 15, with_mask=True)
        grad_x, partials = triton_kernels.lsq_backward(x, torch.ones_like(x), KernelGrid.given(delta, z), None, 0,
                                                       15, sums=True)
        sums = partials.sum(dim=2)
    assert torch.isnan(out[0])
    assert not bool(torch.isnan(out[1:]).any())
    assert mask.tolist() == [False, True, True]
    assert grad_x.tolist() == [0.0, 1.0, 1.0]
    assert torch.isnan(sums[0]).all(), "a NaN input makes the rounding-error sum NaN, as on the torch path"


@pytest.mark.parametrize("shape", [(1,), (1023,), (1025,), (1031, 3), (3, 1, 5)], ids=str)
def test_odd_sizes_and_layouts(shape):
    """Sizes around the block, a per-channel axis of stride 1, a size-1 axis, a non-dense input, a broadcast grad."""
    axis = len(shape) - 1
    channels = shape[axis]
    rng = np.random.default_rng(len(shape))
    delta = torch.from_numpy(rng.uniform(0.01, 0.1, channels).astype(np.float32))
    z = torch.from_numpy(rng.integers(0, 40, channels).astype(np.int32))
    view = tuple(channels if i == axis else 1 for i in range(len(shape)))
    base = torch.from_numpy(rng.normal(size=(*shape, 2)).astype(np.float32) * 4)
    for x in (base[..., 0].contiguous(), base[..., 1]):  # dense, then every other element
        with triton_kernels.triton_mode("off"):
            expected = fake_quantize(x, delta, z, axis, view, 0, 63)
        with triton_kernels.force_interpreter():
            grid = KernelGrid.given(delta, z)
            out, mask, _ = triton_kernels.fake_quantize(x, grid, axis, 0, 63, with_mask=True)
            grad_x, partials = triton_kernels.lsq_backward(x, torch.ones(()).expand(shape), grid, axis, 0, 63, True)
            sums = partials.sum(dim=2)
        assert_same_bits(out, expected, f"{shape}: output")
        d, zp = delta.view(view), z.view(view)
        inside = (x >= -zp * d) & (x <= (63 - zp) * d)
        assert torch.equal(mask, inside), f"{shape}: mask"
        assert torch.equal(grad_x, inside.float()), f"{shape}: input gradient"
        dims = tuple(i for i in range(len(shape)) if i != axis)
        outside = (~inside).float()
        torch.testing.assert_close(sums[2], outside.sum(dim=dims) if dims else outside, rtol=0, atol=0)


def test_mode_switch_and_bad_value():
    x = torch.zeros(3)
    assert not triton_kernels.applies(x), "the CPU takes the torch path unless interpreting"
    with triton_kernels.force_interpreter():
        assert triton_kernels.applies(x)
        with triton_kernels.triton_mode("off"):
            assert not triton_kernels.applies(x)
        assert not triton_kernels.applies(x.double()), "float64 stays on the torch path"
    with pytest.raises(QuantizationConfigError, match="interp"):
        triton_kernels.triton_mode("interp").__enter__()
    with mock.patch.dict("os.environ", {triton_kernels.ENV: "yes"}), pytest.raises(QuantizationConfigError,
                                                                                    match="'yes'"):
        triton_kernels.applies(x)


def test_compiled_graph_keeps_torch_ops():
    """Under torch.compile(fullgraph=True) the quantizers trace the torch ops (inductor fuses them itself)."""
    kind = Kind(UNI, False, "straddling")
    quantizer, _ = _build(LSQ, kind, "cpu")
    x_np = _probe(quantizer, kind, seed=4)
    with triton_kernels.force_interpreter(), mock.patch.object(triton_kernels, "_launch") as launch:
        compiled = torch.compile(lambda x: quantizer(x, training=True), fullgraph=True)
        x = torch.from_numpy(x_np).requires_grad_()
        out = compiled(x)
        out.sum().backward()
    assert launch.call_count == 0
    with triton_kernels.triton_mode("off"):
        eager = quantizer(torch.from_numpy(x_np), training=True)
    assert torch.equal(out.detach(), eager.detach())
