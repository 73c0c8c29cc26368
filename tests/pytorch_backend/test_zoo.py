"""The model zoo, each model quantized while in train mode, through the whole QAT life cycle.

quantize -> two SGD steps -> eval deterministic (train mode stays random where the model has dropout or stochastic
depth) -> convert (bit-identical) -> state_dict reload into a fresh quantize_model (identical) -> ONNX export
(runs, deterministic, no random op) -> quantization coverage (every conv / linear / attention weight quantized).
"""

from __future__ import annotations

import copy
import functools
import warnings
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from tests.pytorch_backend import zoo
from trainable_infra import QATConfig
from trainable_infra.pytorch_backend import (
    PytorchTrainableQuantizationWrapper,
    convert_to_inferable,
    export_onnx,
    quantization_coverage,
    quantize_model,
)

W4A8 = QATConfig(weight_n_bits=4, activation_n_bits=8)
# ONNX ops that draw random numbers: none may be left in a file exported from an eval-mode model.
RANDOM_OPS = {"RandomUniform", "RandomUniformLike", "RandomNormal", "RandomNormalLike", "Bernoulli", "Multinomial"}


@dataclass(frozen=True)
class Case:
    build: type[nn.Module]
    input_shape: tuple[int, ...]
    random_in_training: bool  # dropout or stochastic depth: two train-mode calls differ
    transformer: bool
    config: QATConfig = W4A8


CASES = {
    "resnet": Case(zoo.TinyResNet, (1, 8, 8), False, False, QATConfig()),
    "mobilenet_v2": Case(zoo.TinyMobileNet, (1, 8, 8), False, False),
    "mobilenet_v3": Case(zoo.TinyMobileNetV3, (3, 16, 16), True, False),
    "shufflenet": Case(zoo.TinyShuffleNet, (3, 16, 16), False, False),
    "densenet": Case(zoo.TinyDenseNet, (3, 16, 16), True, False),
    "inception": Case(zoo.TinyInception, (3, 16, 16), True, False, QATConfig()),
    "convnext": Case(zoo.TinyConvNeXt, (3, 16, 16), True, False),
    "efficientnet": Case(zoo.TinyEfficientNet, (3, 16, 16), True, False),
    "vit": Case(zoo.TinyViT, (3, 16, 16), True, True),
    "cross_attention": Case(zoo.TinyCrossAttention, (3, 16, 16), False, True),
    "swin": Case(zoo.TinySwin, (3, 16, 16), True, True),
    "sdpa": Case(zoo.TinySDPATransformer, (3, 16, 16), True, True),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on tensors this small, splitting work across threads costs more than it saves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class Trained:
    case: Case
    float_model: nn.Module
    qat: nn.Module
    data: list[tuple[torch.Tensor, torch.Tensor]]
    x: torch.Tensor
    eval_output: torch.Tensor
    warnings: list[str]


def with_statistics(model: nn.Module) -> nn.Module:
    """BatchNorm statistics and affine parameters away from their initial values (folding then changes weights)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.2, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.3, 0.3)
    return model


def train_steps(model: nn.Module, data: list, steps: int = 2) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    for step in range(steps):
        x, y = data[step % len(data)]
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


@torch.no_grad()
def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


# Library gaps: {case: (why, the tests that fail because of it)}.
KNOWN_GAPS: dict[str, tuple[str, set[str]]] = {}


@pytest.fixture(autouse=True)
def known_gap(request):
    """Mark the tests of a case that a known library gap makes fail (strict: they must fail)."""
    callspec = getattr(request.node, "callspec", None)
    reason, tests = KNOWN_GAPS.get(callspec.params.get("trained") if callspec else None, ("", set()))
    if request.node.originalname in tests:
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))


@pytest.fixture(scope="module", params=list(CASES))
def trained(request) -> Trained:
    """The case's float model (in train mode, as built), quantized, trained two steps, and its eval output."""
    case = CASES[request.param]
    torch.manual_seed(0)
    float_model = with_statistics(case.build())
    assert float_model.training
    data = [(torch.rand(16, *case.input_shape), torch.randint(0, 10, (16,))) for _ in range(2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qat = quantize_model(float_model, case.config, data, progress=False)
    train_steps(qat, data)
    x = torch.rand(8, *case.input_shape)
    return Trained(case, float_model, qat, data, x, run(qat.eval(), x), [str(w.message) for w in caught])


@pytest.fixture(scope="module")
def converted(trained: Trained) -> nn.Module:
    return convert_to_inferable(trained.qat).eval()


def test_the_whole_model_is_traced(trained):
    """No module kept whole, no module-by-module fallback: quantize_model says nothing."""
    assert trained.warnings == []


def test_eval_is_deterministic(trained):
    assert torch.isfinite(trained.eval_output).all()
    assert torch.equal(run(trained.qat.eval(), trained.x), trained.eval_output)


def test_train_mode_follows_train(trained):
    """Back in train mode dropout and stochastic depth draw again (and nothing else is random); eval is eval again."""
    model = copy.deepcopy(trained.qat).train()
    # 64 samples: stochastic depth drops whole samples, and two draws over 8 could agree by chance.
    torch.manual_seed(1)
    x = trained.x.repeat(8, 1, 1, 1)
    first, second = run(model, x), run(model, x)
    assert torch.equal(first, second) is not trained.case.random_in_training
    # Train-mode calls move the statistics of BatchNorms that are not folded (DenseNet's pre-activation ones).
    model.load_state_dict(trained.qat.state_dict())
    assert torch.equal(run(model.eval(), trained.x), trained.eval_output)


def test_converted_model_is_bit_identical(trained, converted):
    assert torch.equal(run(converted, trained.x), trained.eval_output)
    assert torch.equal(run(converted, trained.x), trained.eval_output)


def test_state_dict_reloads_into_a_fresh_model(trained, tmp_path):
    path = tmp_path / "qat.pt"
    torch.save(trained.qat.state_dict(), path)
    fresh = quantize_model(trained.float_model, trained.case.config, trained.data, progress=False)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    assert torch.equal(run(fresh.eval(), trained.x), trained.eval_output)


@pytest.fixture(scope="module")
def exported(trained, converted, tmp_path_factory):
    """export_onnx's report on the converted model (QCDQ), its file run by onnxruntime on the eval batch."""
    return export_onnx(converted, tmp_path_factory.mktemp("onnx") / "m.onnx", trained.x)


def test_onnx_export_runs_deterministically_without_random_ops(trained, exported):
    graph = onnx.load(exported.path).graph
    ops = {node.op_type for node in graph.node}
    assert not ops & RANDOM_OPS
    # Dropout's optional third input switches it to training; an eval export leaves it out.
    assert all(len(node.input) < 3 or not node.input[2] for node in graph.node if node.op_type == "Dropout")
    session = ort.InferenceSession(exported.path, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: trained.x.numpy()}
    first, second = session.run(None, feed)[0], session.run(None, feed)[0]
    np.testing.assert_array_equal(first, second)
    assert np.isfinite(first).all()


def test_onnx_reproduces_the_converted_model(trained, exported):
    """onnxruntime's integer kernels compute what the converted model computes."""
    assert exported.argmax_identical == 1.0
    # Between the quantizers of an attention block run float softmax, LayerNorm and GELU: a value within float
    # rounding of a rounding tie may land one step apart, and attention spreads it over the tokens.
    if not trained.case.transformer:
        assert exported.identical == 1.0


def weight_numel(model: nn.Module) -> int:
    """Elements of the weights a QAT model quantizes: convolution, linear and attention projection weights."""
    total = 0
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            total += module.weight.numel()
        elif isinstance(module, nn.MultiheadAttention):
            projections = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
            total += sum(getattr(module, name).numel() for name in projections if getattr(module, name) is not None)
    return total


def quantized_weight_numel(qat: nn.Module) -> int:
    """Elements of the weights that have a weight quantizer in a QAT model."""
    total = 0
    for module in qat.modules():
        if isinstance(module, PytorchTrainableQuantizationWrapper):
            for attribute in module.weights_quantizers:
                total += functools.reduce(getattr, attribute.split("."), module.module).numel()
    return total


def test_every_weight_of_the_arithmetic_is_quantized(trained):
    assert quantized_weight_numel(trained.qat) == weight_numel(trained.float_model)


def test_no_convolution_or_linear_map_stays_float(trained):
    coverage = quantization_coverage(trained.qat, trained.x)
    assert coverage.rows
    assert all(row.weights_quantized is not False for row in coverage.rows)
    layers = dict(trained.qat.named_modules())
    float_arithmetic = [name for name in coverage.float_layers
                        if isinstance(layers.get(name), (nn.Conv2d, nn.Linear, nn.MultiheadAttention))]
    assert not float_arithmetic


def test_quantized_mac_share(trained):
    share = quantization_coverage(trained.qat, trained.x).quantized_share
    # Transformers: every linear map and both operands of each attention product; LayerNorm, softmax and GELU are
    # no multiply-accumulates. The CNN blocks have no product of two activations: all of their MACs are quantized.
    assert share >= 0.99 if trained.case.transformer else share == 1.0
