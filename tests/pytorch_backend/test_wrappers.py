"""Wrapper and holder modules: training, state dicts, checkpoints, device/dtype moves, copies, compile."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from tests.pytorch_backend.models import activation_holder, digits, qat_cnn, snapshot, train, wrap
from tests.pytorch_backend.test_quantizers import CASES, build
from trainable_infra import TrainingMethod, VariableGroup
from trainable_infra.pytorch_backend import (
    PytorchTrainableActivationQuantizationHolder,
    PytorchTrainableQuantizationWrapper,
)


def quantizers(model: nn.Module) -> list:
    found = []
    for module in model.modules():
        found.extend(getattr(module, "weights_quantizers", {}).values())
        if hasattr(module, "activation_holder_quantizer"):
            found.append(module.activation_holder_quantizer)
    return found


@pytest.mark.parametrize("method", list(TrainingMethod))
def test_cnn_trains_and_loss_falls(method):
    model = qat_cnn(method)
    losses = train(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), steps=80)
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses


@pytest.mark.parametrize("method", list(TrainingMethod))
def test_learnable_parameters_get_gradients_and_frozen_ones_do_not(method):
    model = qat_cnn(method, freeze_first=True)
    x, y = digits(32)
    nn.functional.cross_entropy(model(x), y).backward()
    frozen = model[1].weight_threshold
    assert frozen.grad is None
    assert not frozen.requires_grad
    learnable = [v for q in quantizers(model) for v in q.get_trainable_variables(VariableGroup.QPARAMS)]
    assert len(learnable) == (6 if method is TrainingMethod.LSQ else 0)
    for variable in learnable:
        assert variable.grad is not None
        assert torch.count_nonzero(variable.grad) > 0
    for name, parameter in model.named_parameters():
        if name.endswith(("weight", "bias")):
            assert torch.count_nonzero(parameter.grad) > 0, name


def test_state_dict_keys_are_stable_and_readable():
    keys = list(qat_cnn(TrainingMethod.LSQ).state_dict())
    assert keys[:5] == [
        "0.activation_threshold",
        "1.weight_threshold",
        "1.module.weight",
        "1.module.bias",
        "2.weight",
    ]
    assert "11.weight_threshold" in keys
    assert "12.activation_threshold" in keys


@pytest.mark.parametrize("method", list(TrainingMethod))
def test_checkpoint_loads_safely_and_resumes_bit_identically(method, tmp_path):
    # Uninterrupted: 6 steps.
    reference = qat_cnn(method)
    reference_opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    train(reference, reference_opt, steps=6)

    # Interrupted after 3 steps, saved, reloaded into freshly built objects, 3 more steps.
    model = qat_cnn(method)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train(model, optimizer, steps=3)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "ckpt.pt")
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed = qat_cnn(method, seed=123)  # different initial weights: everything must come from the file
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt = torch.optim.SGD(resumed.parameters(), lr=0.05, momentum=0.9)
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    x, _ = digits(16)
    model.eval()
    resumed.eval()
    assert torch.equal(model(x), resumed(x))
    train(resumed, resumed_opt, steps=3, start=3)

    expected, actual = snapshot(reference), snapshot(resumed)
    assert expected.keys() == actual.keys()
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)


def test_deepcopy_is_independent_and_identical():
    model = qat_cnn(TrainingMethod.LSQ).eval()
    clone = copy.deepcopy(model)
    x, _ = digits(8)
    assert torch.equal(model(x), clone(x))
    with torch.no_grad():
        clone[1].weight_threshold.mul_(0.5)
    assert clone[1].weights_quantizers["weight"].threshold is clone[1].weight_threshold
    assert not torch.equal(model(x), clone(x))


def test_double_and_to_move_quantizer_variables():
    model = qat_cnn(TrainingMethod.LSQ).double().to("cpu")
    assert model[1].weight_threshold.dtype == torch.float64
    assert model[1].weights_quantizers["weight"].threshold is model[1].weight_threshold
    x, y = digits(8)
    loss = nn.functional.cross_entropy(model(x.double()), y)
    loss.backward()
    assert model[1].weight_threshold.grad.dtype == torch.float64
    assert loss.dtype == torch.float64


def test_double_model_quantizes_like_float_model():
    model = qat_cnn(TrainingMethod.STE).eval()
    x, _ = digits(8)
    as_double = copy.deepcopy(model).double()(x.double())
    np.testing.assert_allclose(as_double.detach().numpy(), model(x).detach().numpy(), rtol=1e-4, atol=1e-4)


def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    model = nn.Sequential(activation_holder(4.0, True, TrainingMethod.LSQ), wrap(nn.Linear(8, 4), TrainingMethod.LSQ))
    compiled = torch.compile(copy.deepcopy(model), backend="aot_eager")
    x = torch.randn(16, 8) * 3
    eager_out, compiled_out = model(x), compiled(x)
    assert torch.equal(eager_out, compiled_out)
    eager_out.sum().backward()
    compiled_out.sum().backward()
    compiled_params = dict(compiled.named_parameters())
    for name, parameter in model.named_parameters():
        # Gradients are sums: a compiled reduction may add in another order.
        torch.testing.assert_close(compiled_params[f"_orig_mod.{name}"].grad, parameter.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "module",
    [nn.Conv1d(3, 4, 3), nn.Conv3d(3, 4, 3), nn.ConvTranspose2d(3, 4, 3), nn.Linear(5, 4)],
    ids=["conv1d", "conv3d", "conv-transpose2d", "linear"],
)
def test_wrapper_output_equals_module_run_on_quantized_weight(module):
    wrapped = wrap(module, TrainingMethod.STE, n_bits=4).eval()
    x = torch.randn({"Conv1d": (2, 3, 9), "Conv3d": (2, 3, 5, 5, 5), "ConvTranspose2d": (2, 3, 5, 5)}.get(
        type(module).__name__, (2, 5)))
    quantized = wrapped.weights_quantizers["weight"](module.weight, False)
    expected = torch.func.functional_call(module, {"weight": quantized}, (x,))
    assert torch.equal(wrapped(x), expected)
    assert not torch.equal(wrapped(x), module(x))


def test_wrapper_with_keyword_call_takes_the_generic_path():
    wrapped = wrap(nn.Linear(5, 4), TrainingMethod.STE).eval()
    x = torch.randn(3, 5)
    assert torch.equal(wrapped(input=x), wrapped(x))


def test_bias_can_be_quantized_too():
    module = nn.Linear(5, 4)
    from tests.pytorch_backend.models import weight_quantizer

    bias_quantizer = weight_quantizer(module, TrainingMethod.STE)
    bias_quantizer.quantization_config.weights_quantization_params["threshold"] = np.full(4, 0.5)
    wrapped = PytorchTrainableQuantizationWrapper(
        module, {"weight": weight_quantizer(module, TrainingMethod.STE), "bias": bias_quantizer}
    )
    assert {"weight_threshold", "bias_threshold"} <= set(wrapped.state_dict())
    wrapped(torch.randn(2, 5)).sum().backward()
    assert module.bias.grad is not None


FULLGRAPH_CASES = [c for c in CASES if c.n_bits == 4 and c.layout in ("per-channel-axis0", "per-tensor", "signed",
                                                                        "straddling")]


@pytest.mark.parametrize("case", FULLGRAPH_CASES, ids=[c.id for c in FULLGRAPH_CASES])
def test_every_quantizer_compiles_without_graph_breaks(case):
    torch._dynamo.reset()  # each case is a new model of the same classes: start from a clean cache
    quantizer, _, _ = build(case)
    fresh = type(quantizer)(quantizer.quantization_config)
    if case.target == "weights":
        module = nn.Conv2d(3, 6, (3, 4))
        module.weight = nn.Parameter(torch.randn(case.shape))
        model = PytorchTrainableQuantizationWrapper(module, {"weight": fresh})
        x = torch.randn(2, 3, 5, 6)
    else:
        model = PytorchTrainableActivationQuantizationHolder(fresh)
        x = torch.randn(case.shape)
    compiled = torch.compile(copy.deepcopy(model), fullgraph=True, backend="aot_eager")
    x = x.requires_grad_()
    compiled(x).sum().backward()
    eager_x = x.detach().clone().requires_grad_()
    model(eager_x).sum().backward()
    assert torch.equal(compiled(x), model(x))
    torch.testing.assert_close(x.grad, eager_x.grad)
