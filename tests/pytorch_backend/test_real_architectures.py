"""quantize_model on real architectures: graphs that follow the mode, attention, weights read directly, activation
products and the coverage report."""

from __future__ import annotations

import io
import sys
import types
import warnings

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 - torch's own convention
from torch import nn

from trainable_infra import QATConfig
from trainable_infra.common.errors import QuantizationConfigError
from trainable_infra.pytorch_backend import (
    PytorchTrainableActivationQuantizationHolder,
    PytorchTrainableQuantizationWrapper,
    convert_to_inferable,
    quantization_coverage,
    quantize_model,
)
from trainable_infra.pytorch_backend.attention import QuantizableMultiheadAttention

X = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))


def quantize(model: nn.Module, config: QATConfig | None = None, data: torch.Tensor = X) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_model(model, config or QATConfig(), [data], progress=False)


def holders(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, PytorchTrainableActivationQuantizationHolder)]


def wrapped(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, PytorchTrainableQuantizationWrapper)]


# --- graphs that follow the mode ---------------------------------------------------------------------------


def _stochastic_depth(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if not training or p == 0.0:
        return x
    keep = torch.empty([x.shape[0]] + [1] * (x.ndim - 1), dtype=x.dtype).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


class StochasticDepth(nn.Module):
    """Branches on self.training: its two traces differ in structure, so it is kept whole."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _stochastic_depth(x, 0.5, self.training)


class Dropping(nn.Module):
    """Functional dropout on self.training in the model's own forward, and stochastic depth in a submodule."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 16)
        self.depth = StochasticDepth()
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x + self.depth(F.relu(self.fc1(x)))
        return self.fc2(F.dropout(y, 0.5, self.training))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_dropout_and_stochastic_depth_follow_the_mode_whatever_mode_the_model_was_quantized_in(mode):
    model = Dropping().train(mode == "train")
    qat = quantize(model)
    qat.eval()
    first = qat(X)
    assert torch.equal(first, qat(X))
    converted = convert_to_inferable(qat)
    assert torch.equal(converted(X), first)
    qat.train()
    torch.manual_seed(0)
    assert not torch.equal(qat(X), qat(X))
    assert model.training == (mode == "train")  # the float model's mode is left as it was


def test_a_mode_dependent_argument_reads_the_flag_of_its_own_module():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, x):
            return F.dropout(self.fc(x), 0.5, self.training)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()
            self.head = nn.Linear(16, 4)

        def forward(self, x):
            return self.head(self.block(x))

    qat = quantize(Model().train())
    qat.train()
    qat.block.eval()  # a submodule switched on its own keeps its dropout off
    assert torch.equal(qat(X), qat(X))
    qat.block.train()
    assert not torch.equal(qat(X), qat(X))


def test_a_model_whose_own_forward_branches_on_the_mode_is_quantized_module_by_module():
    class Branching(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 4)
            self.act = nn.ReLU()

        def forward(self, x):
            if self.training:
                x = x * 0.5
            return self.act(self.fc(x))

    with pytest.warns(UserWarning, match="branches on self.training"):
        qat = quantize_model(Branching(), QATConfig(), [X], progress=False)
    qat.eval()
    assert torch.equal(qat(X), qat(X))
    assert wrapped(qat) == ["fc"]


def test_a_submodule_that_cannot_be_traced_is_kept_whole_and_said_so_when_it_holds_layers():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -self.fc(x)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = DataDependent()
            self.head = nn.Linear(16, 4)

        def forward(self, x):
            return self.head(F.relu(self.inner(x)))

    with pytest.warns(UserWarning, match="inner of Model"):
        qat = quantize_model(Model(), QATConfig(), [X], progress=False)
    assert wrapped(qat) == ["head"]
    coverage = quantization_coverage(qat, X)
    assert coverage.float_layers == ("inner.fc",)
    assert [(row.layer, row.macs, row.quantized) for row in coverage.rows] == [("inner", 1024, False),
                                                                                ("head", 256, True)]


# --- attention ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("dims", [(None, None), (6, 5)], ids=["packed", "separate"])
@pytest.mark.parametrize("call", ["plain", "bool_mask", "float_mask", "padding", "no_weights", "per_head"])
def test_quantizable_multihead_attention_computes_what_nn_multihead_attention_computes(batch_first, dims, call):
    torch.manual_seed(0)
    kdim, vdim = dims
    reference = nn.MultiheadAttention(8, 2, batch_first=batch_first, kdim=kdim, vdim=vdim).eval()
    attention = QuantizableMultiheadAttention.from_float(reference)
    n, target, source = 3, 4, 5

    def tensor(length, dim):
        return torch.randn(n, length, dim) if batch_first else torch.randn(length, n, dim)

    query, key, value = tensor(target, 8), tensor(source, kdim or 8), tensor(source, vdim or 8)
    mask = torch.rand(target, source) > 0.7
    mask[:, 0] = False
    padding = torch.zeros(n, source, dtype=torch.bool)
    padding[0, -1] = True
    kwargs = {
        "plain": {}, "bool_mask": {"attn_mask": mask}, "float_mask": {"attn_mask": mask.float() * -1e4},
        "padding": {"key_padding_mask": padding}, "no_weights": {"need_weights": False},
        "per_head": {"average_attn_weights": False},
    }[call]
    expected, expected_weights = reference(query, key, value, **kwargs)
    output, weights = attention(query, key, value, **kwargs)
    torch.testing.assert_close(output, expected, rtol=0, atol=1e-6)
    if expected_weights is None:
        assert weights is None
    else:
        torch.testing.assert_close(weights, expected_weights, rtol=0, atol=1e-6)


class AttentionBlock(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.attention = nn.MultiheadAttention(16, 2, dropout=0.1, batch_first=True, **kwargs)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        y = self.norm(x)
        y, _ = self.attention(y, y, y, need_weights=False)
        return self.head(x + y)


TOKENS = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))


def test_multihead_attention_projections_and_products_are_quantized_and_convert_exactly():
    qat = quantize(AttentionBlock().train(), data=TOKENS)
    assert wrapped(qat) == ["attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.out_proj", "head"]
    # the scaled query and the attention probabilities get their own holders (k and v come from the projections')
    assert {"matmul_input0_activation_quantizer", "matmul_1_input0_activation_quantizer"} <= set(holders(qat))
    qat.eval()
    expected = qat(TOKENS)
    assert torch.equal(expected, qat(TOKENS))
    assert torch.equal(convert_to_inferable(qat)(TOKENS), expected)
    coverage = quantization_coverage(qat, TOKENS)
    assert coverage.quantized_share == 1.0
    assert coverage.float_layers == ("norm",)
    fresh = quantize(AttentionBlock(), data=TOKENS)
    buffer = io.BytesIO()
    torch.save(qat.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    fresh.eval()
    assert torch.equal(fresh(TOKENS), expected)


def test_multihead_attention_with_bias_kv_stays_float_with_a_warning():
    with pytest.warns(UserWarning, match="add_bias_kv or add_zero_attn"):
        qat = quantize_model(AttentionBlock(add_bias_kv=True), QATConfig(), [TOKENS], progress=False)
    assert wrapped(qat) == ["head"]
    coverage = quantization_coverage(qat, TOKENS)
    assert "attention" in coverage.float_layers
    assert 0 < coverage.quantized_share < 1


class Functional(nn.Module):
    """Weights read directly (as torchvision's Swin does) and products of activations."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.proj = nn.Linear(16, 16)

    def forward(self, x):
        q, k, v = F.linear(x, self.qkv.weight, self.qkv.bias).chunk(3, dim=-1)
        attention = torch.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-1)
        return F.linear(torch.bmm(attention, v), self.proj.weight, self.proj.bias)


def test_weights_read_directly_are_quantized_and_products_get_quantized_inputs():
    qat = quantize(Functional(), data=TOKENS)
    assert wrapped(qat) == ["qkv", "proj"]
    assert set(holders(qat)) == {
        "x_activation_quantizer", "linear_activation_quantizer", "bmm_input0_activation_quantizer",
        "linear_1_input_activation_quantizer", "linear_1_activation_quantizer",
    }
    # the probabilities' holder is unsigned (softmax is never negative)
    assert qat.bmm_input0_activation_quantizer.activation_holder_quantizer.quantization_config \
        .activation_quantization_params["is_signed"] is False
    qat.eval()
    expected = qat(TOKENS)
    quantized = qat.qkv.get_quantized_weights()["weight"]
    assert not torch.equal(quantized, qat.qkv.module.weight)
    assert torch.equal(convert_to_inferable(qat)(TOKENS), expected)
    coverage = quantization_coverage(qat, TOKENS)
    # 2x5 tokens: qkv 10*16*48, q @ k^T 2*5*5*16, attention @ v 2*5*5*16, proj 10*16*16
    assert [(row.op, row.macs, row.quantized) for row in coverage.rows] == [
        ("linear", 7680, True), ("matmul", 800, True), ("bmm", 800, True), ("linear", 2560, True)]
    assert coverage.float_layers == ()


def test_products_can_be_left_float():
    qat = quantize(Functional(), QATConfig(quantize_matmul_inputs=False), data=TOKENS)
    assert "bmm_input0_activation_quantizer" not in holders(qat)
    coverage = quantization_coverage(qat, TOKENS)
    assert [row.quantized for row in coverage.rows] == [True, True, False, True]
    assert coverage.quantized_share == pytest.approx((7680 + 800 + 2560) / 11840)
    skipped = quantize(Functional(), QATConfig(overrides={"bmm": {"skip": True}}), data=TOKENS)
    assert "bmm_input0_activation_quantizer" not in holders(skipped)


class Attention(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.kwargs = kwargs

    def forward(self, x, mask=None):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
        dropout = 0.2 if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, **self.kwargs)
        return y.transpose(1, 2).flatten(2)


@pytest.mark.parametrize("kwargs", [{}, {"is_causal": True}, {"scale": 0.3}])
def test_scaled_dot_product_attention_is_computed_as_its_products_with_the_probabilities_quantized(kwargs):
    qat = quantize(Attention(**kwargs).train(), data=TOKENS)
    assert "matmul_1_input0_activation_quantizer" in holders(qat)
    qat.eval()
    expected = qat(TOKENS)
    assert torch.equal(expected, qat(TOKENS))
    assert torch.equal(convert_to_inferable(qat)(TOKENS), expected)
    assert quantization_coverage(qat, TOKENS).quantized_share == 1.0
    qat.train()
    assert not torch.equal(qat(TOKENS), qat(TOKENS))  # the dropout of the probabilities


def test_scaled_dot_product_attention_with_a_mask_argument():
    model = Attention().eval()
    mask = torch.rand(5, 5, generator=torch.Generator().manual_seed(2)) > 0.3
    mask[:, 0] = True
    qat = quantize(model, data=TOKENS)
    assert "mask_activation_quantizer" not in holders(qat)  # an input with a default value is not data
    qat_float = quantize(model, QATConfig(quantize_matmul_inputs=False), data=TOKENS)
    qat.eval()
    qat_float.eval()
    torch.testing.assert_close(qat(TOKENS, mask), qat_float(TOKENS, mask), rtol=0, atol=0.1)


def test_coverage_rejects_bad_data_and_measures_a_model_quantized_module_by_module():
    qat = quantize(Functional(), data=TOKENS)
    with pytest.raises(QuantizationConfigError, match="data"):
        quantization_coverage(qat, [])
    with pytest.raises(QuantizationConfigError, match="Module"):
        quantization_coverage("model", TOKENS)

    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 8)
            self.act = nn.ReLU()
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            if x.sum() > 0:
                x = x * 2
            return self.head(self.act(self.fc(x)))

    fallback = quantize(Untraceable())
    coverage = quantization_coverage(fallback, X)
    assert [(row.layer, row.macs, row.weights_quantized, row.inputs_quantized) for row in coverage.rows] == [
        ("fc", 4 * 16 * 8, True, False), ("head", 4 * 8 * 4, True, True)]


# --- torchvision (real-size models, run with --runslow) -----------------------------------------------------


def _torchvision():
    for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
        sys.modules.setdefault(name, types.ModuleType(name))  # the offline wheel is a CUDA build
    return pytest.importorskip("torchvision")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["efficientnet_b0", "swin_t", "vit_b_16"])
def test_torchvision_models_quantized_in_train_mode(name, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from trainable_infra.pytorch_backend import export_onnx

    torchvision = _torchvision()
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).train()
    x = torch.randn(1, 3, 224, 224)
    qat = quantize(model, QATConfig(weight_n_bits=4), data=x)
    qat.eval()
    expected = qat(x)
    assert torch.equal(expected, qat(x))
    converted = convert_to_inferable(qat)
    assert torch.equal(converted(x), expected)
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    attentions = sum(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    wrapped_linears = [n for n, m in qat.named_modules()
                       if isinstance(m, PytorchTrainableQuantizationWrapper) and isinstance(m.module, nn.Linear)]
    # nn.MultiheadAttention's out_proj is an nn.Linear; its packed in-projection becomes three
    assert len(wrapped_linears) == linears + 3 * attentions
    assert quantization_coverage(qat, x).quantized_share >= 0.99
    path = tmp_path / f"{name}.onnx"
    export_onnx(converted, path, x)
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert not ops & {"RandomUniformLike", "RandomNormalLike", "RandomUniform", "RandomNormal", "Bernoulli", "Dropout"}
    session = onnxruntime.InferenceSession(str(path))
    feed = {session.get_inputs()[0].name: x.numpy()}
    first, second = session.run(None, feed)[0], session.run(None, feed)[0]
    assert (first == second).all()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["swin_t", "swin_v2_t"])
def test_swin_attention_traced_computes_what_torchvision_computes(name):
    from trainable_infra.pytorch_backend.traceable import traceable_forwards

    torchvision = _torchvision()
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    x = torch.randn(1, 3, 96, 112)  # not a multiple of the windows: padding and unshifted last stage
    expected = model(x)
    with traceable_forwards(model):
        assert torch.equal(model(x), expected)
