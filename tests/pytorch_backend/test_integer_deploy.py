"""Integer deployment: BatchNorm folding, the int32 bias, the exact accumulator and the integer QCDQ file.

Oracles: `trainable_infra.common.integer` (folding and bias maths, numpy), an int64 numpy computation of the
integer kernel (acc = Σ x_int·w_int + b_int, then float32(acc)·s), and onnxruntime's default session.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from tests.pytorch_backend.models import digits
from tests.pytorch_backend.zoo import TinyMobileNet, TinyResNet
from trainable_infra import QATConfig, QuantizationMethod, TrainingMethod
from trainable_infra.common.integer import bias_scale, fold_batch_norm, quantize_bias
from trainable_infra.pytorch_backend import (
    PytorchTrainableActivationQuantizationHolder,
    PytorchTrainableQuantizationWrapper,
    convert_to_inferable,
    export_onnx,
    quantize_model,
)
from trainable_infra.pytorch_backend.demo import float_cnn
from trainable_infra.pytorch_backend.integer import IntegerGlobalAveragePool, IntegerMerge, IntegerQuantizationWrapper

X, Y = digits(256)


def with_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """`model` with BatchNorm statistics and affine parameters away from their initial values, in eval mode."""
    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.2, 2.0)
            if module.affine:
                module.weight.data.uniform_(0.5, 1.5)
                module.bias.data.uniform_(-0.3, 0.3)
    return model.eval()


def modules_of(model: nn.Module, kind: type) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, kind)}


def train_steps(model: nn.Module, steps: int = 4, lr: float = 0.01) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        batch = slice(step % 4 * 64, step % 4 * 64 + 64)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(X[batch]), Y[batch]).backward()
        optimizer.step()
    model.eval()


# --- BatchNorm folding ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "float_model",
    [
        lambda: nn.Sequential(nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(216, 10)),
        lambda: nn.Sequential(nn.Conv2d(1, 6, 3, bias=False), nn.BatchNorm2d(6, affine=False), nn.ReLU(),
                              nn.Flatten(), nn.Linear(216, 10)),
        lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 10)),
        lambda: nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, groups=4), nn.BatchNorm2d(4),
                              nn.ReLU(), nn.Flatten(), nn.Linear(144, 10)),
        lambda: nn.Sequential(nn.ConvTranspose2d(1, 3, 2, stride=2), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                              nn.Linear(768, 10)),
    ],
    ids=["conv-bias", "conv-no-bias-no-affine", "linear-bn1d", "depthwise", "conv-transpose"],
)
def test_batch_norm_is_folded_into_the_layer_before_it(float_model):
    model = with_statistics(float_model())
    before = copy.deepcopy(model.state_dict())
    config = QATConfig(weight_n_bits=16, activation_n_bits=16, integer_bias=False, quantize_activations=False)
    qat = quantize_model(model, config, progress=False).eval()
    assert not modules_of(qat, nn.modules.batchnorm._BatchNorm), "the BatchNorm is removed"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the float model is unchanged"
    # At 16 bits the quantization error is far below the float tolerance: the folded model computes the float one.
    with torch.no_grad():
        torch.testing.assert_close(qat(X[:32]), model(X[:32]), rtol=1e-4, atol=1e-4)

    (bn_name, bn), = modules_of(model, nn.modules.batchnorm._BatchNorm).items()
    layer_name = str(int(bn_name) - 1)
    layer = model.get_submodule(layer_name)
    axis = 1 if isinstance(layer, nn.ConvTranspose2d) else 0
    to_numpy = lambda t: None if t is None else t.detach().double().numpy()  # noqa: E731
    weight, bias = fold_batch_norm(to_numpy(layer.weight), to_numpy(layer.bias), to_numpy(bn.running_mean),
                                   to_numpy(bn.running_var), bn.eps, to_numpy(bn.weight), to_numpy(bn.bias), axis)
    wrapper = qat.get_submodule(layer_name)
    np.testing.assert_array_equal(wrapper.module.weight.detach().numpy(), weight)
    np.testing.assert_array_equal(wrapper.module.bias.detach().numpy(), bias)
    # The weight quantizer starts from the folded weight: max |w| per output channel.
    reduce = tuple(i for i in range(weight.ndim) if i != axis)
    np.testing.assert_allclose(wrapper.weight_threshold.detach().numpy(), np.abs(weight).max(axis=reduce), rtol=1e-6)


def test_folding_can_be_turned_off():
    model = with_statistics(float_cnn())
    qat = quantize_model(model, QATConfig(fold_batch_norm=False), [X[:64]], progress=False)
    assert len(modules_of(qat, nn.BatchNorm2d)) == 3
    assert len(modules_of(quantize_model(model, QATConfig(), [X[:64]], progress=False), nn.BatchNorm2d)) == 0


class SharedInput(nn.Module):
    """A convolution whose output feeds a BatchNorm and a second branch: the BatchNorm cannot be folded."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.fc((self.bn(y) + y).mean(dim=(2, 3)))


def test_a_batch_norm_whose_layer_has_other_consumers_is_kept():
    qat = quantize_model(with_statistics(SharedInput()), QATConfig(), [X[:64]], progress=False)
    assert list(modules_of(qat, nn.BatchNorm2d)) == ["bn"]


def test_skipped_layers_keep_their_batch_norm():
    config = QATConfig(overrides={"0": {"skip": True}})
    qat = quantize_model(with_statistics(float_cnn()), config, [X[:64]], progress=False)
    assert list(modules_of(qat, nn.BatchNorm2d)) == ["1"]


# --- the int32 bias and the exact accumulator ------------------------------------------------------------------


def small_model() -> nn.Module:
    """Conv(bias) -> ReLU -> Conv(bias) -> ReLU -> Linear(bias), the layout the acceptance check names."""
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(128, 10),
    ).eval()


def grids(wrapper: PytorchTrainableQuantizationWrapper) -> tuple[np.ndarray, np.ndarray]:
    """(Δ_in, Δ_w) of an integer layer, as float32 numpy arrays."""
    x_step, w_step, _ = (t.numpy() for t in wrapper._integer_grid())
    return x_step, w_step


def test_each_layer_fed_by_a_holder_is_linked_to_it():
    qat = quantize_model(small_model(), QATConfig(), [X[:64]], progress=False)
    links = {name: w.input_holder for name, w in modules_of(qat, PytorchTrainableQuantizationWrapper).items()}
    holders = {id(h): name for name, h in modules_of(qat, PytorchTrainableActivationQuantizationHolder).items()}
    assert {name: holders[id(h)] for name, h in links.items()} == {
        "0": "input_1_activation_quantizer", "2": "0_activation_quantizer", "5": "2_activation_quantizer",
    }
    assert all(w.input_holder is None for w in modules_of(
        quantize_model(small_model(), QATConfig(integer_bias=False), [X[:64]], progress=False),
        PytorchTrainableQuantizationWrapper).values())


@pytest.mark.parametrize("method", list(TrainingMethod), ids=lambda m: m.name)
def test_training_forward_uses_the_int32_bias_with_a_straight_through_gradient(method):
    config = QATConfig(weight_n_bits=4, weight_training_method=method, activation_training_method=method)
    qat = quantize_model(small_model(), config, [X[:64]], progress=False).train()
    wrapper, holder = qat.get_submodule("2"), qat.get_submodule("0_activation_quantizer")
    x_step, w_step = grids(wrapper)
    expected_bias = quantize_bias(wrapper.module.bias.detach().numpy(), bias_scale(x_step, w_step))
    assert not np.array_equal(expected_bias, wrapper.module.bias.detach().numpy()), "the bias moved onto its grid"
    x = holder(torch.relu(qat.get_submodule("0")(qat.get_submodule("input_1_activation_quantizer")(X[:16]))))
    x = x.detach()
    with torch.no_grad():  # not a training step: a DQA quantizer's schedule does not advance
        weight = wrapper.weights_quantizers["weight"](wrapper.module.weight, True)
    expected = nn.functional.conv2d(x, weight, torch.from_numpy(expected_bias), stride=2, padding=1)
    out = wrapper(x)
    assert torch.equal(out, expected)
    out.sum().backward()
    # Straight through: d(sum)/d(bias) is the number of output positions per channel.
    torch.testing.assert_close(wrapper.module.bias.grad, torch.full((8,), float(out[:, 0].numel())))


def integer_reference(wrapper, x: torch.Tensor) -> np.ndarray:
    """The layer as an integer kernel computes it, in int64: float32(Σ x_int·w_int + b_int)·s, or, for a layer
    whose output holder the kernel's requantization replaces, (clip(round(float32(acc)·(s/Δ_y)) + z_y) - z_y)·Δ_y
    with ties to even (onnxruntime's QLinearConv / QGemm)."""
    acc, scale = integer_accumulator(wrapper, x)
    view = (1, -1) + (1,) * (acc.ndim - 2)
    if wrapper.output_holder is None:
        return acc.astype(np.float32) * scale.reshape(view)
    quantizer = wrapper.output_holder.activation_holder_quantizer
    y_step, y_zero = (t.numpy().astype(np.float32) for t in quantizer.grid())
    multiplier = (scale / y_step).astype(np.float32).reshape(view)
    q = np.clip(np.rint(acc.astype(np.float32) * multiplier) + y_zero, quantizer.q_min, quantizer.q_max)
    return ((q - y_zero) * y_step).astype(np.float32)


def integer_accumulator(wrapper, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(Σ x_int·w_int + b_int in int64, s = Δ_in·Δ_w) of an integer layer on its input `x`."""
    x_step, w_step = grids(wrapper)
    scale = bias_scale(x_step, w_step)
    x_int = np.rint(x.numpy() / x_step).astype(np.int64)
    weight = wrapper.weights_quantizers["weight"](wrapper.module.weight, False).detach().numpy()
    w_int = np.rint(weight / w_step.reshape((-1,) + (1,) * (weight.ndim - 1))).astype(np.int64)
    b_int = np.rint(wrapper.module.bias.detach().numpy() / scale).astype(np.int64)
    module = wrapper.module
    if isinstance(module, nn.Linear):
        return x_int @ w_int.T + b_int, scale
    # Convolution as a sum over the window of shifted int64 products (exact, any order).
    padded = np.pad(x_int, ((0, 0), (0, 0), *[(p, p) for p in module.padding]))
    (sh, sw), (kh, kw) = module.stride, module.kernel_size
    out_h = (padded.shape[2] - kh) // sh + 1
    out_w = (padded.shape[3] - kw) // sw + 1
    acc = np.zeros((x_int.shape[0], w_int.shape[0], out_h, out_w), dtype=np.int64)
    for i in range(kh):
        for j in range(kw):
            window = padded[:, :, i:i + sh * out_h:sh, j:j + sw * out_w:sw]
            acc += np.einsum("nchw,oc->nohw", window, w_int[:, :, i, j])
    acc += b_int[None, :, None, None]
    return acc, scale


@pytest.mark.parametrize(("w_bits", "a_bits"), [(8, 8), (4, 8), (2, 4)])
def test_eval_accumulates_exactly_as_the_integer_kernel(w_bits, a_bits):
    qat = quantize_model(small_model(), QATConfig(weight_n_bits=w_bits, activation_n_bits=a_bits), [X[:64]],
                         progress=False)
    train_steps(qat, steps=2)
    inputs = {}
    for name in ("0", "2", "5"):
        qat.get_submodule(name).register_forward_hook(
            lambda module, args, out, name=name: inputs.__setitem__(name, (args[0].detach(), out.detach())))
    with torch.no_grad():
        qat(X[:32])
    for name, (x, out) in inputs.items():
        np.testing.assert_array_equal(out.numpy(), integer_reference(qat.get_submodule(name), x), err_msg=name)


def test_accumulator_beyond_float32_is_exact():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 4096), nn.ReLU(), nn.Linear(4096, 10)).eval()
    qat = quantize_model(model, QATConfig(), [X[:64]], progress=False).eval()
    wrapper = qat.get_submodule("3")
    assert wrapper._acc_dtype == torch.float64  # 4096 · 255 · 128 > 2^24
    assert qat.get_submodule("1")._acc_dtype == torch.float32
    x = qat.get_submodule("1_activation_quantizer")(torch.relu(qat.get_submodule("1")(
        qat.get_submodule("input_1_activation_quantizer")(X[:8].flatten(1))))).detach()
    with torch.no_grad():
        np.testing.assert_array_equal(wrapper(x).numpy(), integer_reference(wrapper, x))


@pytest.mark.parametrize("architecture", [small_model, float_cnn, TinyResNet, TinyMobileNet])
def test_converted_model_is_bit_identical_and_saves(architecture, tmp_path):
    torch.manual_seed(0)
    qat = quantize_model(with_statistics(architecture()), QATConfig(weight_n_bits=4), [X[:64]], progress=False)
    train_steps(qat, steps=2)
    converted = convert_to_inferable(qat)
    assert modules_of(converted, IntegerQuantizationWrapper)
    with torch.no_grad():
        assert torch.equal(converted(X), qat(X))
    # A rebuilt QAT model takes the trained state_dict and computes the same.
    torch.save(qat.state_dict(), tmp_path / "qat.pt")
    with pytest.warns(UserWarning, match="no representative_data"):
        rebuilt = quantize_model(with_statistics(architecture()), QATConfig(weight_n_bits=4), progress=False)
    rebuilt.load_state_dict(torch.load(tmp_path / "qat.pt", weights_only=True))
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(X), qat(X))


# --- the integer QCDQ file ------------------------------------------------------------------------------------


def optimized_ops(path: str, tmp_path) -> list[str]:
    """The op types of onnxruntime's optimized graph for a default session."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]


def test_demo_model_runs_on_integer_kernels_and_stores_integers(tmp_path):
    qat = quantize_model(with_statistics(float_cnn()), QATConfig(weight_n_bits=4), [X[:64]], progress=False)
    train_steps(qat, steps=2)
    converted = convert_to_inferable(qat)
    report = export_onnx(converted, tmp_path / "demo.onnx", X, require_identical=0.999)
    ops = optimized_ops(report.path, tmp_path)
    assert ops.count("QLinearConv") == 3
    assert ops.count("QGemm") == 1
    assert "Conv" not in ops
    assert "Gemm" not in ops
    graph = onnx.load(report).graph
    initializers = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            initializers[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    producers = {out: node for node in graph.node for out in node.output}
    for node in graph.node:
        if node.op_type in ("Conv", "Gemm"):
            weight, bias = (producers[name] for name in node.input[1:3])
            assert weight.op_type == bias.op_type == "DequantizeLinear"
            assert initializers[weight.input[0]].dtype == np.int8
            assert initializers[bias.input[0]].dtype == np.int32
            assert not any(value.dtype == np.float32 and value.size > 64 for value in initializers.values())
    assert report.argmax_identical == 1.0


@pytest.mark.parametrize("w_bits", [2, 4, 8])
@pytest.mark.parametrize("a_bits", [4, 8])
def test_default_session_matches_the_converted_model(w_bits, a_bits, tmp_path):
    qat = quantize_model(small_model(), QATConfig(weight_n_bits=w_bits, activation_n_bits=a_bits), [X[:64]],
                         progress=False)
    train_steps(qat, steps=2)
    converted = convert_to_inferable(qat)
    report = export_onnx(converted, tmp_path / "m.onnx", X[:4])
    session = ort.InferenceSession(report.path, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input_0": X.numpy()})
    with torch.no_grad():
        want = converted(X).numpy()
    output_range = float(want.max() - want.min())
    assert np.abs(got - want).max() <= 1e-4 * output_range
    assert np.mean(got == want) >= 0.999
    ops = optimized_ops(report.path, tmp_path)
    assert (ops.count("QLinearConv"), ops.count("QGemm")) == (2, 1)


@pytest.mark.parametrize("architecture", [TinyResNet, TinyMobileNet])
@pytest.mark.parametrize(("w_bits", "a_bits"), [(8, 8), (4, 8), (4, 4)])
def test_zoo_models_are_reproduced_by_onnxruntime(architecture, w_bits, a_bits, tmp_path):
    torch.manual_seed(0)
    qat = quantize_model(with_statistics(architecture()), QATConfig(weight_n_bits=w_bits, activation_n_bits=a_bits),
                         [X[:64]], progress=False)
    train_steps(qat, steps=2)
    report = export_onnx(convert_to_inferable(qat), tmp_path / "m.onnx", X, require_identical=0.999)
    assert report.argmax_identical == 1.0
    ops = optimized_ops(report.path, tmp_path)
    assert "Conv" not in ops
    assert "Gemm" not in ops


def test_uniform_and_power_of_two_grids_export_exactly(tmp_path):
    config = QATConfig(weight_n_bits=4, weight_quantization_method=QuantizationMethod.POWER_OF_TWO,
                       activation_quantization_method=QuantizationMethod.UNIFORM)
    qat = quantize_model(small_model(), config, [X[:64]], progress=False)
    train_steps(qat, steps=2)
    # The one place left to differ is the requantization: onnxruntime scales acc by Δ_in·Δ_w/Δ_out and rounds
    # once, the model scales by Δ_in·Δ_w and then by 1/Δ_out; within float rounding of a rounding tie the two
    # land a step apart (here 3 of 2560 logits, the argmax always the same).
    report = export_onnx(convert_to_inferable(qat), tmp_path / "m.onnx", X, require_identical=0.995)
    assert report.argmax_identical == 1.0


class PooledHead(nn.Module):
    """conv -> relu -> global average pooling (4x4 = 16 positions) -> linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 1), 1))


def test_global_average_pooling_rounds_as_the_integer_kernel(tmp_path):
    torch.manual_seed(0)
    qat = quantize_model(PooledHead().eval(), QATConfig(activation_n_bits=4), [X[:64]], progress=False).eval()
    pool = qat.get_submodule("adaptive_avg_pool2d")
    assert isinstance(pool, IntegerGlobalAveragePool)
    before, after = qat.get_submodule("conv_activation_quantizer"), qat.get_submodule("fc_input_activation_quantizer")
    # The pooled values' quantizer gets the input's grid: every sum / 16 that ends in .5 is an exact tie.
    with torch.no_grad():
        after.activation_threshold.copy_(before.activation_threshold)
        x = before(torch.relu(qat.get_submodule("conv")(qat.get_submodule("x_activation_quantizer")(X))))
        pooled = pool(x)
    step = float(before.activation_holder_quantizer.grid()[0])
    sums = np.rint(x.numpy() / step).sum(axis=(2, 3), keepdims=True)
    assert np.any(sums % 16 == 8), "the data has exact ties"
    expected = np.clip(np.rint(sums / 16), 0, 15) * np.float32(step)  # np.rint: ties to even
    np.testing.assert_array_equal(pooled.numpy(), expected.astype(np.float32))
    with torch.no_grad():
        assert torch.equal(after(pooled), pooled), "the pooled values lie on the next quantizer's grid"
    report = export_onnx(convert_to_inferable(qat), tmp_path / "m.onnx", X, require_identical=0.999)
    assert "QLinearGlobalAveragePool" in optimized_ops(report.path, tmp_path)


def test_calibration_sees_float_activations():
    """Calibration runs the holders as identities: the integer layers must not round what reaches them."""
    torch.manual_seed(0)
    model = with_statistics(TinyResNet())
    thresholds = {}
    for integer in (True, False):
        qat = quantize_model(model, QATConfig(integer_bias=integer), [X[:128]], progress=False)
        thresholds[integer] = {name: float(h.activation_threshold) for name, h in
                               modules_of(qat, PytorchTrainableActivationQuantizationHolder).items()}
    shared = thresholds[True].keys() & thresholds[False].keys()
    assert len(shared) >= 8
    # Equal up to the effect of the int32 biases on the float activations.
    for name in shared:
        assert thresholds[True][name] == pytest.approx(thresholds[False][name], rel=0.02), name


def test_merges_and_pools_compute_as_the_integer_kernels():
    torch.manual_seed(0)
    qat = quantize_model(with_statistics(TinyResNet()), QATConfig(), [X[:64]], progress=False)
    merges = modules_of(qat, IntegerMerge)
    assert sorted(m.kind for m in merges.values()) == ["add", "add"]
    assert len(modules_of(qat, IntegerGlobalAveragePool)) == 1
    converted = convert_to_inferable(qat)
    assert all(m.grids is not None for m in modules_of(converted, IntegerMerge).values())
    with torch.no_grad():
        assert torch.equal(converted(X), qat.eval()(X))
        qat.train()
        qat(X[:8])  # the float operations in training
    mobile = quantize_model(with_statistics(TinyMobileNet()), QATConfig(), [X[:64]], progress=False)
    assert sorted(m.kind for m in modules_of(mobile, IntegerMerge).values()) == ["add", "cat"]


@pytest.mark.parametrize("method", list(TrainingMethod), ids=lambda m: m.name)
def test_integer_model_compiles_without_graph_breaks(method):
    torch._dynamo.reset()
    config = QATConfig(weight_training_method=method, activation_training_method=method)
    qat = quantize_model(with_statistics(TinyResNet()), config, [X[:64]], progress=False)
    compiled = torch.compile(copy.deepcopy(qat), fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled.train()(X[:16]), qat.train()(X[:16]))
    with torch.no_grad():
        assert torch.equal(compiled.eval()(X[:16]), qat.eval()(X[:16]))


def test_grids_wider_than_8_bits_keep_the_float_bias():
    qat = quantize_model(small_model(), QATConfig(weight_n_bits=16, activation_n_bits=16), [X[:64]], progress=False)
    assert all(w.input_holder is None for w in modules_of(qat, PytorchTrainableQuantizationWrapper).values())
    mixed = quantize_model(small_model(), QATConfig(overrides={"2": {"weight_n_bits": 12}}), [X[:64]], progress=False)
    wrapped = modules_of(mixed, PytorchTrainableQuantizationWrapper)
    links = {name: w.input_holder is not None for name, w in wrapped.items()}
    assert links == {"0": True, "2": False, "5": True}


class ShuffleBlock(nn.Module):
    """ShuffleNetV2- and MobileNetV2-style pieces: chunk, ReLU6, concatenation, channel shuffle, dropout."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6())
        self.branch = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU6(),
                                    nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.BatchNorm2d(4))
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(8, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        left, right = x.chunk(2, dim=1)
        x = torch.cat([left, self.branch(right)], dim=1)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)  # channel shuffle, as torchvision writes it
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def test_chunks_relu6_shuffles_and_dropout_keep_the_integer_kernels(tmp_path):
    torch.manual_seed(0)
    qat = quantize_model(with_statistics(ShuffleBlock()), QATConfig(weight_n_bits=4), [X[:64]], progress=False)
    train_steps(qat, steps=2)
    # The stem's ReLU6 folds into its requantization while the quantizer's range lies within [0, 6].
    stem = qat.get_submodule("stem.0")
    assert stem.output_holder is not None
    assert stem._output_clip == 6.0
    assert all(w.input_holder is not None for w in modules_of(qat, PytorchTrainableQuantizationWrapper).values())
    report = export_onnx(convert_to_inferable(qat), tmp_path / "m.onnx", X, require_identical=0.999)
    ops = optimized_ops(report.path, tmp_path)
    assert "Conv" not in ops
    assert "Gemm" not in ops
    assert report.argmax_identical == 1.0


class SharedLayer(nn.Module):
    """One convolution called on the outputs of two different activation quantizers."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(1, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.shared(torch.relu(self.a(x))), self.shared(self.b(x) * 5.0)


def test_a_shared_layer_keeps_the_float_computation(tmp_path):
    qat = quantize_model(SharedLayer().eval(), QATConfig(), [X[:64]], progress=False).eval()
    assert qat.get_submodule("shared").input_holder is None
    assert qat.get_submodule("a").input_holder is not None
    converted = convert_to_inferable(qat)
    with torch.no_grad():
        assert all(torch.equal(c, q) for c, q in zip(converted(X), qat(X), strict=True))


def test_folding_keeps_frozen_layers_frozen():
    model = with_statistics(float_cnn())
    model[0].requires_grad_(False)
    qat = quantize_model(model, QATConfig(), [X[:64]], progress=False)
    trainable = {name: p.requires_grad for name, p in qat.named_parameters() if ".module." in name}
    assert trainable["0.module.weight"] is False
    assert trainable["0.module.bias"] is False
    assert trainable["3.module.weight"] is True


def test_half_precision_models_still_quantize_and_train():
    model = with_statistics(float_cnn()).half()
    qat = quantize_model(model, QATConfig(), [X[:64].half()], progress=False).train()
    out = qat(X[:8].half())
    assert out.dtype == torch.float16
    out.float().sum().backward()
    assert qat.get_submodule("0").module.bias.grad is not None


def test_the_int32_bias_passes_no_gradient_to_the_steps():
    from trainable_infra.pytorch_backend.integer import quantize_bias as torch_quantize_bias

    bias = torch.tensor([0.5, -0.25], requires_grad=True)
    x_step = torch.tensor([0.01], requires_grad=True)
    w_step = torch.tensor([0.1, 0.3], requires_grad=True)
    torch_quantize_bias(bias, x_step, w_step).sum().backward()
    assert x_step.grad is None
    assert w_step.grad is None
    assert torch.equal(bias.grad, torch.ones(2))


def test_a_saturated_int32_bias_keeps_its_sign_in_the_onnx_file(tmp_path):
    """A ReLU that never fires leaves the next holder at the minimum threshold: bias / (Δ_in·Δ_w) passes 2^31 and
    the bias saturates at the int32 limits, in the converted model and in the file alike."""

    class Dead(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
            self.conv2 = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.conv2(torch.relu(self.conv1(x)))

    torch.manual_seed(0)
    model = Dead()
    with torch.no_grad():
        model.conv1.bias.fill_(-10.0)
        model.conv2.bias.copy_(torch.tensor([0.1, 0.2, -0.3, 0.4]))
    x = torch.rand(8, 3, 8, 8)
    converted = convert_to_inferable(quantize_model(model, QATConfig(), [x], progress=False)).eval()
    saturated = converted.conv2.integer_bias
    assert saturated.max() == 2**31 - 1
    assert saturated.min() == -(2**31)
    report = export_onnx(converted, tmp_path / "dead.onnx", x)
    assert report.identical == 1.0
