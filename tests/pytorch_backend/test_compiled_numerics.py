"""Quantizers, grids and integer biases under torch.compile: bit-identical to eager and to IEEE float32.

Compiled, the quantizers run written-out operations that inductor fuses with their neighbours, on CUDA too
(eagerly CUDA runs the fused or the Triton kernels). Inductor's Triton code divides float32 approximately
(`div.full`, up to 2 ulp) unless TORCHINDUCTOR_EMULATE_DIVISION_ROUNDING=1, and a grid step or 1/Δ one ulp off
moves outputs at rounding boundaries away from the inferable quantizer's: `fake_quant.divide` takes the compiled
quotients in float64 and rounds them to float32, which is the IEEE float32 quotient. The CPU runs inductor's C++
code, which checks the float64 route and the fused forward against eager; CUDA, where present, checks what it is
for.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tests.pytorch_backend.exact import assert_same_bits
from tests.pytorch_backend.test_quantizers import DEVICES, MIN_THRESHOLD, POT, SYM, UNI, Case, build, reference
from trainable_infra import QuantizationMethod, TrainableQuantizerWeightsConfig, TrainingMethod
from trainable_infra.pytorch_backend import LSQSymmetricWeightQuantizer, LSQUniformWeightQuantizer
from trainable_infra.pytorch_backend.integer import quantize_bias
from trainable_infra.pytorch_backend.quantizers import triton_kernels
from trainable_infra.pytorch_backend.quantizers.fake_quant import divide, reciprocal, ste_input_grad

F32 = np.float32
CHANNELS = 1 << 16


def _compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, dynamic=False)


def _operands(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random float32 pairs over the whole exponent range, and every pairing of the special values."""
    magnitudes = lambda n: np.exp2(rng.uniform(-140, 127, n)) * rng.choice([-1.0, 1.0], n)  # noqa: E731
    a, b = magnitudes(CHANNELS).astype(F32), magnitudes(CHANNELS).astype(F32)
    # Quotients near 1 and of small integers: the grids' (b - a)/K and -a/Δ.
    a[:4096] = rng.uniform(0, 100, 4096).astype(F32)
    b[:4096] = rng.integers(1, 65536, 4096).astype(F32)
    special = np.array([0.0, -0.0, 1.0, 3.0, 2.0**-149, 2.0**-126, np.finfo(F32).max, np.inf, -np.inf, np.nan], F32)
    pairs_a, pairs_b = np.meshgrid(special, special)
    return np.concatenate([a, pairs_a.ravel()]), np.concatenate([b, pairs_b.ravel()])


@pytest.mark.parametrize("device", DEVICES)
def test_divide_is_the_ieee_float32_quotient_eager_and_compiled(device):
    a, b = _operands(np.random.default_rng(0))
    with np.errstate(all="ignore"):
        expected = torch.from_numpy(a / b)
    ta, tb = torch.from_numpy(a).to(device), torch.from_numpy(b).to(device)
    assert_same_bits(divide(ta, tb).cpu(), expected, "eager")
    assert_same_bits(_compiled(divide)(ta, tb).cpu(), expected, "compiled")
    with np.errstate(all="ignore"):
        assert_same_bits(_compiled(reciprocal)(tb).cpu(), torch.from_numpy(F32(1) / b), "compiled 1/b")
    # By a Python number: a tensor divisor (a CUDA tensor divided by a number is a product with its reciprocal).
    with np.errstate(all="ignore"):
        assert_same_bits(divide(ta, 255.0).cpu(), torch.from_numpy(a / F32(255)), "by a number")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_divide_keeps_torchs_result_dtype_and_rounding(device, dtype):
    """Half-precision operands: torch's result dtype, its value the operands' exact quotient rounded once, and a
    Python divisor not rounded to the operand's dtype first (65535 is Inf in float16, 511 is 512 in bfloat16)."""
    a = torch.from_numpy(np.random.default_rng(5).uniform(-1e4, 1e4, 4096).astype(F32)).to(dtype).to(device)
    for b in (65535.0, 511.0, 3.0):
        expected = (a.double() / b).to(dtype)
        for fn in (divide, _compiled(divide)):
            found = fn(a, b)
            assert_same_bits(found.cpu(), expected.cpu(), f"a / {b}")
    # A 0-dim float32 divisor does not promote a half tensor (torch's rule), compiled or not.
    b = torch.tensor(7.0, device=device)
    for fn in (divide, _compiled(divide)):
        assert_same_bits(fn(a, b).cpu(), (a.double() / 7.0).to(dtype).cpu(), "by a 0-dim float32 tensor")


def _weights_quantizer(method: QuantizationMethod, device: str, **params: np.ndarray):
    cls = LSQUniformWeightQuantizer if method is QuantizationMethod.UNIFORM else LSQSymmetricWeightQuantizer
    shape = (next(iter(params.values())).size, 3)
    quantizer = cls(TrainableQuantizerWeightsConfig(method, 8, params, True, 0, True, MIN_THRESHOLD))
    quantizer.initialize_quantization(shape, "w", nn.Linear(1, 1).to(device))
    return quantizer


def _threshold_and_range(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random thresholds and (range_min, range_max) pairs over many magnitudes, some beyond min_threshold."""
    scale = np.exp2(rng.uniform(-20, 20, CHANNELS))
    threshold = (rng.uniform(0.01, 1.0, CHANNELS) * scale).astype(F32)
    range_min = (-rng.uniform(0.0, 1.0, CHANNELS) * scale).astype(F32)
    range_max = (rng.uniform(0.0, 1.0, CHANNELS) * scale).astype(F32)
    return threshold, range_min, range_max


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", [QuantizationMethod.SYMMETRIC, QuantizationMethod.POWER_OF_TWO,
                                    QuantizationMethod.UNIFORM], ids=lambda m: m.name)
def test_compiled_grid_is_the_eager_grid(device, method):
    threshold, range_min, range_max = _threshold_and_range(np.random.default_rng(1))
    if method is QuantizationMethod.UNIFORM:
        quantizer = _weights_quantizer(method, device, range_min=range_min, range_max=range_max)
    else:
        quantizer = _weights_quantizer(method, device, threshold=threshold)
    delta, zero_point = quantizer._compute_grid()
    compiled_delta, compiled_zero_point = _compiled(quantizer._compute_grid)()
    assert_same_bits(compiled_delta.cpu(), delta.cpu(), "step")
    assert torch.equal(compiled_zero_point.cpu(), zero_point.cpu())
    if method is QuantizationMethod.UNIFORM:
        # Zero points across the integer range (round(-a/Δ), which a one-ulp Δ moves where -a/Δ is near a tie).
        assert torch.unique(zero_point).numel() > 200


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_integer_bias_is_the_eager_one(device):
    rng = np.random.default_rng(2)
    x_step = torch.tensor(F32(0.0123), device=device)
    w_step = torch.from_numpy(np.exp2(rng.uniform(-12, -4, 512)).astype(F32)).to(device)
    # Biases on and near ties of their grid, and far beyond the int32 range.
    scale = (x_step * w_step).cpu().numpy()
    bias = (rng.integers(-1000, 1000, 512) + rng.choice([0.5, 0.49999, 0.2, 0.0], 512)) * scale
    bias[:8] = [1e30, -1e30, 0.0, -0.0, np.inf, -np.inf, np.nan, 3.0]
    bias = torch.from_numpy(bias.astype(F32)).to(device)
    with triton_kernels.triton_mode("off"):
        eager = quantize_bias(bias, x_step, w_step)
        compiled = _compiled(quantize_bias)(bias, x_step, w_step)
    assert_same_bits(compiled.cpu(), eager.cpu(), "bias")


# One weights (per-channel) and one activation case per training method and grid kind, 8 bits.
QUANTIZER_CASES = [
    Case(training, method, target, 8, layout)
    for training in (TrainingMethod.STE, TrainingMethod.LSQ)
    for method in (SYM, POT, UNI)
    for target, layout in (("weights", "per-channel-axis0"),
                           ("activation", "straddling" if method is UNI else "signed"))
]


def _grid_inputs(case: Case, params: dict, rng: np.random.Generator) -> np.ndarray:
    """x on grid points, on rounding ties, one ulp either side of a tie, at and beyond the range ends."""
    delta = np.broadcast_to(reference(case, params, np.zeros(case.shape, F32))["delta"], case.shape)
    k = rng.integers(-300, 300, case.shape).astype(F32)
    offset = rng.choice(np.array([0.0, 0.5, -0.5, 0.25], F32), case.shape)
    x = ((k + offset) * delta).astype(F32)
    nudge = rng.choice([-1, 0, 1], case.shape)
    return np.where(nudge == 0, x, np.nextafter(x, np.where(nudge > 0, np.inf, -np.inf).astype(F32))).astype(F32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", QUANTIZER_CASES, ids=[case.id for case in QUANTIZER_CASES])
def test_compiled_quantizer_is_the_eager_quantizer(device, case):
    """Forward and input gradient bit-identical to eager (on CUDA: the fused kernels or the Triton kernels), the
    parameter gradients equal up to float32 summation order."""
    _check_compiled_against_eager(case, device, torch.float32, torch.contiguous_format)


ACTIVATION_CASES = [case for case in QUANTIZER_CASES if case.target == "activation"]
VARIANTS = [(torch.bfloat16, torch.contiguous_format), (torch.float16, torch.contiguous_format),
            (torch.float32, torch.channels_last)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("dtype", "memory_format"), VARIANTS, ids=["bfloat16", "float16", "channels-last"])
@pytest.mark.parametrize("case", ACTIVATION_CASES, ids=[case.id for case in ACTIVATION_CASES])
def test_compiled_activation_quantizer_in_other_dtypes_and_layouts(device, dtype, memory_format, case):
    _check_compiled_against_eager(case, device, dtype, memory_format)


def _check_compiled_against_eager(case: Case, device: str, dtype: torch.dtype, memory_format: torch.memory_format
                                  ) -> None:
    quantizer, _, params = build(case, device=device)
    rng = np.random.default_rng(3)
    x_np = _grid_inputs(case, params, rng)
    grad_np = rng.normal(size=case.shape).astype(F32)
    variables = [quantizer.get_quantizer_variable(name) for name in quantizer.registered_variables()]
    trained = [v for v in variables if v.requires_grad]

    def tensor(values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(values).to(device=device, dtype=dtype).contiguous(memory_format=memory_format)

    def run(fn):
        for variable in trained:
            variable.grad = None
        x = tensor(x_np).requires_grad_()
        out = fn(x)
        out.backward(tensor(grad_np))
        return out.detach(), x.grad, [variable.grad.clone() for variable in trained]

    eager_out, eager_grad, eager_params = run(lambda x: quantizer(x, training=True))
    compiled = _compiled(lambda x: quantizer(x, training=True))
    out, grad, param_grads = run(compiled)
    assert out.dtype == dtype
    assert_same_bits(out.cpu(), eager_out.cpu(), "output")
    assert_same_bits(grad.cpu(), eager_grad.cpu(), "input gradient")
    for found, expected in zip(param_grads, eager_params, strict=True):
        torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["contiguous", "channels-last-x", "channels-last-both"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opaque_straight_through_gradient_passes_opcheck(layout, dtype):
    """The compiled CPU STE backward's op (opaque to inductor, so that x and not two bool masks is saved): its fake
    result has the real one's layout, and it is the eager gradient."""
    rng = np.random.default_rng(4)
    x = torch.from_numpy(rng.uniform(-3, 3, (2, 4, 5, 5)).astype(F32)).to(dtype)
    grad = torch.from_numpy(rng.normal(size=(2, 4, 5, 5)).astype(F32)).to(dtype)
    if layout != "contiguous":
        x = x.contiguous(memory_format=torch.channels_last)
    if layout == "channels-last-both":
        grad = grad.contiguous(memory_format=torch.channels_last)
    for low, high in ((torch.tensor(-1.5), torch.tensor(2.0)),
                      (torch.full((1, 4, 1, 1), -1.0), torch.linspace(0.5, 2.0, 4).reshape(1, 4, 1, 1))):
        torch.library.opcheck(torch.ops.trainable_infra.ste_input_grad.default, (grad, x, low, high))
        found = torch.ops.trainable_infra.ste_input_grad(grad, x, low, high)
        assert found.stride() == grad.stride()
        assert torch.equal(found, ste_input_grad(grad, x, low, high, eager=False))


def test_compiled_straight_through_gradient_without_the_opaque_op(monkeypatch):
    """torch < 2.4 has no torch.library.custom_op: the compiled CPU backward is then the written-out select."""
    from trainable_infra.pytorch_backend.quantizers import fake_quant

    monkeypatch.setattr(fake_quant, "_opaque_ste_input_grad", None)
    test_compiled_quantizer_is_the_eager_quantizer("cpu", QUANTIZER_CASES[1])
