"""export_onnx(format="qcdq"): standard ONNX quantizers that match the converted model, written atomically.

Oracles: the converted PyTorch model (mct-quantizers' torch fake-quant ops) for the outputs, and
`trainable_infra.common.numerics` for the scale and zero point in the file.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from mct_quantizers import PytorchActivationQuantizationHolder, PytorchQuantizationWrapper
from onnx import numpy_helper
from torch import nn

from tests.pytorch_backend.models import digits, snapshot
from tests.pytorch_backend.zoo import TinyResNet
from trainable_infra import (
    ExportValidationError,
    QATConfig,
    QuantizationConfigError,
    QuantizationMethod,
    TrainableQuantizerActivationConfig,
    TrainableQuantizerWeightsConfig,
)
from trainable_infra.common import numerics
from trainable_infra.pytorch_backend import (
    PytorchTrainableActivationQuantizationHolder,
    PytorchTrainableQuantizationWrapper,
    STESymmetricActivationQuantizer,
    STESymmetricWeightQuantizer,
    STEUniformActivationQuantizer,
    STEUniformWeightQuantizer,
    convert_to_inferable,
    export_onnx,
    quantize_model,
)

METHODS = [QuantizationMethod.SYMMETRIC, QuantizationMethod.POWER_OF_TWO, QuantizationMethod.UNIFORM]
TARGETS = ["weights_per_channel", "weights_per_tensor", "activation_signed", "activation_unsigned"]
BITS = [2, 4, 8]
MIN_THRESHOLD = 2.0**-16
# Per-channel parameters: thresholds that are not powers of two, and ranges that straddle zero, lie above it
# (widened down to 0) and below it (widened up to 0), with zero points that mct-quantizers would truncate.
THRESHOLDS = np.array([0.7, 1.3, 2.9, 0.45])
RANGE_MIN = np.array([-0.37, -1.1, 0.2, -2.0])
RANGE_MAX = np.array([1.21, 0.4, 1.7, -0.3])
TIE_WINDOW = 1e-3  # |x/Δ + z - (k + 1/2)| below this (in steps) counts as a rounding tie


class WeightProbe(nn.Module):
    """Multiplies its input by its weight: with an input of ones the output is the (quantized) weight itself."""

    def __init__(self, weight: np.ndarray):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(weight, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


def grid_of(method, n_bits, signed, threshold=None, range_min=None, range_max=None):
    """(Δ, z, q_min, q_max) per channel from the numpy reference, in float32 as the backends compute them."""
    if method is QuantizationMethod.UNIFORM:
        low, high = np.asarray(range_min, np.float32), np.asarray(range_max, np.float32)
        delta, zero_point = numerics.uniform_grid(low, high, n_bits)
        return np.atleast_1d(delta), np.atleast_1d(zero_point), 0, 2**n_bits - 1
    t = numerics.effective_threshold(threshold, MIN_THRESHOLD, method is QuantizationMethod.POWER_OF_TWO)
    q_min, q_max = numerics.symmetric_int_range(n_bits, signed)
    delta = np.atleast_1d(t).astype(np.float32) / np.float32(2 ** (n_bits - int(signed)))
    return delta, np.zeros_like(delta), q_min, q_max


def probe_values(delta, zero_point, q_min, q_max, rng) -> np.ndarray:
    """Inputs on the grid of each channel: ties (k + 1/2), quarter steps, grid points and random values,
    from two steps below the range to two above it. Shape (channels, values), float32."""
    steps = np.arange(q_min - 2, q_max + 3, dtype=np.float64)
    u = np.concatenate([steps + 0.5, steps + 0.25, steps + 0.75, steps, rng.uniform(q_min - 3, q_max + 3, 256)])
    return ((u[None, :] - zero_point[:, None]) * delta[:, None]).astype(np.float32)


def at_tie(x: np.ndarray, delta: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
    u = x.astype(np.float64) / delta.astype(np.float64) + zero_point
    return np.abs(u - np.floor(u) - 0.5) < TIE_WINDOW


def case(method: QuantizationMethod, target: str, n_bits: int):
    """A converted model with one quantizer of the kind, its probe input, and the grid it should export."""
    rng = np.random.default_rng(n_bits)
    uniform = method is QuantizationMethod.UNIFORM
    if target.startswith("weights"):
        per_channel = target == "weights_per_channel"
        channels = slice(None) if per_channel else slice(0, 1)
        params = (
            {"range_min": RANGE_MIN[channels], "range_max": RANGE_MAX[channels]} if uniform
            else {"threshold": THRESHOLDS[channels]}
        )
        if not per_channel:
            params = {key: float(value[0]) for key, value in params.items()}
        delta, zero_point, q_min, q_max = grid_of(method, n_bits, True, params.get("threshold"),
                                                  params.get("range_min"), params.get("range_max"))
        values = probe_values(np.resize(delta, 4), np.resize(zero_point, 4), q_min, q_max, rng)
        config = TrainableQuantizerWeightsConfig(method, n_bits, params, True, 0, per_channel, MIN_THRESHOLD)
        quantizer = (STEUniformWeightQuantizer if uniform else STESymmetricWeightQuantizer)(config)
        model = convert_to_inferable(PytorchTrainableQuantizationWrapper(WeightProbe(values), {"weight": quantizer}))
        x = torch.ones(1, *values.shape)
        probed, axis = values, 0 if per_channel else None
    else:
        signed = target == "activation_signed"
        params = (
            {"range_min": -0.37 if signed else 0.15, "range_max": 1.21} if uniform
            else {"threshold": 1.3, "is_signed": signed}
        )
        delta, zero_point, q_min, q_max = grid_of(method, n_bits, signed, params.get("threshold"),
                                                  params.get("range_min"), params.get("range_max"))
        probed = probe_values(delta, zero_point, q_min, q_max, rng).reshape(4, -1)
        config = TrainableQuantizerActivationConfig(method, n_bits, params, True, MIN_THRESHOLD)
        quantizer = (STEUniformActivationQuantizer if uniform else STESymmetricActivationQuantizer)(config)
        model = convert_to_inferable(PytorchTrainableActivationQuantizationHolder(quantizer))
        x = torch.from_numpy(probed)
        delta, zero_point, axis = np.resize(delta, 4), np.resize(zero_point, 4), None
    return model, x, probed, (delta, zero_point, q_min, q_max, axis)


def constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    found = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            found[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return found


@pytest.mark.parametrize("n_bits", BITS)
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_qcdq_is_standard_onnx_and_matches_the_converted_model(method, target, n_bits, tmp_path):
    model, x, probed, (delta, zero_point, q_min, q_max, axis) = case(method, target, n_bits)
    report = export_onnx(model, tmp_path / "q.onnx", x, format="qcdq")

    graph = onnx.load(report).graph
    assert {node.domain for node in graph.node} <= {"", "ai.onnx"}
    ops = [node.op_type for node in graph.node if node.op_type != "Constant"]
    values = constants(graph)
    channels = 4 if axis is not None else 1
    session = ort.InferenceSession(report.path, providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {"input_0": x.numpy()})
    with torch.no_grad():
        torch_out = model(x).numpy()
    difference = np.abs(onnx_out.astype(np.float64) - torch_out).reshape(probed.shape)
    if target.startswith("weights"):
        # The weight's integers are stored (int8 for a signed grid, uint8 for a uniform one) behind a
        # DequantizeLinear: the file holds exactly the converted model's quantized weight.
        assert ops.count("QuantizeLinear") == 0
        assert ops.count("DequantizeLinear") == 1
        (dequantize,) = [node for node in graph.node if node.op_type == "DequantizeLinear"]
        integers, scale, zero = (values[name] for name in dequantize.input)
        assert integers.dtype == zero.dtype == (np.int8 if q_min < 0 else np.uint8)
        np.testing.assert_array_equal(scale.reshape(-1), delta[:channels])
        np.testing.assert_array_equal(zero.reshape(-1), zero_point[:channels])
        view = (-1, 1) if axis is not None else (1, 1)
        expected = np.round(torch_out.reshape(probed.shape) / delta[:channels].reshape(view)) + zero_point[
            :channels].reshape(view)
        np.testing.assert_array_equal(integers.astype(np.float64), expected)
        assert integers.min() >= q_min
        assert integers.max() <= q_max
        assert report.max_abs_diff == 0
        assert report.identical == 1.0
        return
    assert ops.count("QuantizeLinear") == ops.count("DequantizeLinear") == 1
    # The grid in the file is the library's: float32 Δ and the rounded zero point, stored as uint8 (a signed grid
    # with its zero point moved by 128: onnxruntime's integer kernels take uint8 activations).
    quantize = next(node for node in graph.node if node.op_type == "QuantizeLinear")
    scale, zero = values[quantize.input[1]], values[quantize.input[2]]
    offset = 128 if q_min < 0 else 0
    assert scale.dtype == np.float32
    assert zero.dtype == np.uint8
    np.testing.assert_array_equal(scale.reshape(-1), delta[:channels])
    np.testing.assert_array_equal(zero.reshape(-1), zero_point[:channels] + offset)
    assert [a.i for a in quantize.attribute if a.name == "axis"] == []
    clips = [node for node in graph.node if node.op_type == "Clip"]
    if n_bits == 8:
        assert not clips, "an 8-bit grid fills uint8: no Clip"
    else:
        (clip,) = clips
        assert (values[clip.input[1]], values[clip.input[2]]) == (q_min + offset, q_max + offset)
        assert values[clip.input[1]].dtype == np.uint8

    tie = at_tie(probed, delta[:, None], zero_point[:, None])
    assert tie.any()
    assert (~tie).any()
    assert report.max_abs_diff == difference.max()
    assert report.identical == np.mean(difference == 0)
    np.testing.assert_array_equal(difference[~tie], 0, err_msg="away from rounding ties the outputs are identical")
    # At a tie torch (x · 1/Δ) and ONNX (x / Δ) may round apart by one step; not for a power-of-two Δ.
    steps = np.broadcast_to(delta[:, None], difference.shape)[tie]
    assert np.all(difference[tie] <= steps * (1 + 1e-4))
    if method is QuantizationMethod.POWER_OF_TWO:
        assert report.max_abs_diff == 0


@pytest.fixture(scope="module")
def resnet():
    x, _ = digits(64)
    torch.manual_seed(0)
    config = QATConfig(weight_n_bits=4, activation_n_bits=4, activation_quantization_method=QuantizationMethod.UNIFORM)
    qat = quantize_model(TinyResNet(), config, [x[:32], x[32:]], progress=False)
    return convert_to_inferable(qat), x


def quantizers_of(model: nn.Module) -> list[tuple[str, object]]:
    """Every inferable quantizer object the converted model calls, where it is held."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, PytorchActivationQuantizationHolder):
            found.append((name, module.activation_holder_quantizer))
        if isinstance(module, PytorchQuantizationWrapper):
            found += [(f"{name}.{key}", q) for key, q in module.weights_quantizers.items()]
            found += [(f"{name}.{key} (forward)", q) for key, _, q in module.get_weights_vars()]
    return found


@pytest.mark.parametrize("export_format", ["custom_ops", "qcdq"])
def test_resnet_exports_in_both_formats_and_matches(resnet, export_format, tmp_path):
    model, x = resnet
    report = export_onnx(model, tmp_path / "resnet.onnx", x[:2], format=export_format)
    assert (report.format, report.path) == (export_format, str(tmp_path / "resnet.onnx"))
    domains = {node.domain for node in onnx.load(report).graph.node}
    assert (domains <= {"", "ai.onnx"}) == (export_format == "qcdq")
    options = None
    if export_format == "custom_ops":
        from mct_quantizers import get_ort_session_options

        options = get_ort_session_options()
    session = ort.InferenceSession(report.path, options, providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {"input_0": x.numpy()})  # the batch axis stays free
    with torch.no_grad():
        torch_out = model(x).numpy()
    difference = np.abs(onnx_out.astype(np.float64) - torch_out)
    # A value at a rounding tie of a quantizer can move one step (onnxruntime sums convolutions in another
    # order; mct-quantizers' custom ops compute the uniform grid from the range), and the logits quantizer
    # keeps such a move to one of its steps; the custom ops also round the grid values differently (~1e-8).
    # Measured on 64 digits: qcdq 0, custom_ops one logit step on 2.8% of the logits.
    logits_step = model.fc_activation_quantizer.activation_holder_quantizer.scale
    assert difference.max() <= logits_step * (1 + 1e-4)
    assert np.mean(difference > 1e-6) < 0.05
    assert np.array_equal(onnx_out.argmax(1), torch_out.argmax(1))


def test_export_leaves_the_model_unchanged(resnet, tmp_path):
    model, x = resnet
    before, quantizers = snapshot(model), quantizers_of(model)
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    with torch.no_grad():
        outputs = model(x)
    for export_format in ("custom_ops", "qcdq"):
        model.train()
        export_onnx(model, tmp_path / f"{export_format}.onnx", x[:2], format=export_format)
        assert model.training
    model.eval()
    after = snapshot(model)
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == requires_grad
    assert [(name, id(q)) for name, q in quantizers_of(model)] == [(name, id(q)) for name, q in quantizers]
    assert not any(q._use_custom_impl for _, q in quantizers)
    with torch.no_grad():
        assert torch.equal(model(x), outputs)


def test_failed_validation_leaves_no_file(resnet, tmp_path, monkeypatch):
    model, x = resnet

    def reject(*args, **kwargs):
        raise onnx.checker.ValidationError("rejected")

    monkeypatch.setattr(onnx.checker, "check_model", reject)
    with pytest.raises(ExportValidationError, match="failed its check: rejected"):
        export_onnx(model, tmp_path / "m.onnx", x[:2], format="qcdq")
    assert os.listdir(tmp_path) == []


def test_failed_comparison_leaves_the_old_file(resnet, tmp_path, monkeypatch):
    model, x = resnet
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous model")
    run = ort.InferenceSession.run
    monkeypatch.setattr(ort.InferenceSession, "run", lambda self, *a, **k: [out + 1 for out in run(self, *a, **k)])
    with pytest.raises(ExportValidationError, match=r"differ from the model's by up to 1, more than atol=0\.5"):
        export_onnx(model, path, x[:2], format="qcdq", atol=0.5)
    assert path.read_bytes() == b"previous model"
    assert os.listdir(tmp_path) == ["m.onnx"]


def test_a_successful_export_replaces_the_old_file(resnet, tmp_path):
    model, x = resnet
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous model")
    os.chmod(path, 0o640)
    report = export_onnx(model, path, x[:2], format="qcdq", atol=0.0)
    assert report.max_abs_diff == 0.0
    onnx.checker.check_model(onnx.load(path))
    assert os.listdir(tmp_path) == ["m.onnx"]
    assert os.stat(path).st_mode & 0o777 == 0o640


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"format": "tflite"}, r"format must be one of \('qcdq', 'custom_ops'\), got 'tflite'"),
        ({"require_identical": 1.5}, r"require_identical must be None or a fraction .* in \[0, 1\], got 1\.5"),
        ({"format": "qcdq", "opset_version": 11}, r"opset_version must be an int in 13\.\.20 for format='qcdq', got 1"),
        ({"atol": -1.0}, r"atol must be None or a number >= 0, got -1\.0"),
    ],
)
def test_bad_arguments_are_refused_before_writing(resnet, tmp_path, kwargs, message):
    model, x = resnet
    with pytest.raises(QuantizationConfigError, match=message):
        export_onnx(model, tmp_path / "m.onnx", x[:2], **kwargs)
    assert os.listdir(tmp_path) == []


def test_missing_directory_is_refused(resnet, tmp_path):
    model, x = resnet
    with pytest.raises(QuantizationConfigError, match="which is not a directory"):
        export_onnx(model, tmp_path / "missing" / "m.onnx", x[:2])


def test_quantizers_wider_than_8_bits_need_custom_ops(tmp_path):
    config = TrainableQuantizerActivationConfig(
        QuantizationMethod.SYMMETRIC, 12, {"threshold": 1.0, "is_signed": True}, True, MIN_THRESHOLD
    )
    model = nn.Sequential(convert_to_inferable(PytorchTrainableActivationQuantizationHolder(
        STESymmetricActivationQuantizer(config))))
    message = r"the activation quantizer of '0' has 12 bits .* export this model with format='custom_ops'"
    with pytest.raises(QuantizationConfigError, match=message):
        export_onnx(model, tmp_path / "m.onnx", torch.zeros(1, 3), format="qcdq")
    assert os.listdir(tmp_path) == []
    report = export_onnx(model, tmp_path / "m.onnx", torch.linspace(-2, 2, 9)[None], format="custom_ops")
    assert report.max_abs_diff < 1e-6
