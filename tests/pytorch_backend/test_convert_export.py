"""convert_to_inferable and export_onnx: what was trained is what is deployed."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from mct_quantizers import PytorchActivationQuantizationHolder, PytorchQuantizationWrapper, get_ort_session_options

from tests.pytorch_backend.models import digits, qat_cnn, snapshot, train
from trainable_infra import QuantizationConfigError, TrainingMethod
from trainable_infra.pytorch_backend import (
    PytorchTrainableActivationQuantizationHolder,
    PytorchTrainableQuantizationWrapper,
    convert_to_inferable,
    export_onnx,
)


@pytest.fixture(scope="module", params=list(TrainingMethod), ids=lambda m: m.name)
def trained(request):
    model = qat_cnn(request.param)
    train(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), steps=10)
    return model.eval()


def test_converted_model_holds_mct_modules_and_input_is_untouched(trained):
    before = snapshot(trained)
    converted = convert_to_inferable(trained)
    kinds = [type(m) for m in converted.modules()]
    assert kinds.count(PytorchQuantizationWrapper) == 3
    assert kinds.count(PytorchActivationQuantizationHolder) == 4
    assert PytorchTrainableQuantizationWrapper not in kinds
    assert PytorchTrainableActivationQuantizationHolder not in kinds
    assert not converted.training
    after = snapshot(trained)
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert any(isinstance(m, PytorchTrainableQuantizationWrapper) for m in trained.modules())


def test_converted_outputs_are_identical(trained):
    converted = convert_to_inferable(trained)
    x, _ = digits(64)
    with torch.no_grad():
        assert torch.equal(converted(x), trained(x))


def test_default_onnx_export_is_qcdq_and_identical(trained, tmp_path):
    converted = convert_to_inferable(trained)
    x, _ = digits(64)
    report = export_onnx(converted, tmp_path / "model.onnx", x, require_identical=1.0)
    assert (report.format, report.max_abs_diff, report.identical, report.argmax_identical) == ("qcdq", 0.0, 1.0, 1.0)
    assert {node.domain for node in onnx.load(report).graph.node} <= {"", "ai.onnx"}


def test_onnx_export_runs_in_onnxruntime_and_matches(trained, tmp_path):
    converted = convert_to_inferable(trained)
    x, _ = digits(64)
    report = export_onnx(converted, tmp_path / "model.onnx", x[:4], format="custom_ops")  # the batch axis stays free
    assert (report.path, report.format) == (str(tmp_path / "model.onnx"), "custom_ops")
    assert report.max_abs_diff <= 1e-6  # measured by the export itself, on x[:4]
    path = report.path
    graph = onnx.load(path)
    onnx.checker.check_model(graph)
    custom = {node.domain for node in graph.graph.node} - {"", "ai.onnx"}
    assert custom, "quantizers should export as mct-quantizers custom ops"
    session = ort.InferenceSession(path, get_ort_session_options(), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch_out = converted(x).numpy()
    np.testing.assert_allclose(onnx_out, torch_out, rtol=0, atol=1e-6)
    # Export leaves the converted model as it was: the torch path, not the custom-op one, runs afterwards.
    with torch.no_grad():
        assert torch.equal(converted(x), trained(x))


def test_export_of_a_model_without_inferable_quantizers_is_refused(tmp_path):
    with pytest.raises(QuantizationConfigError, match="pass the model returned by convert_to_inferable"):
        export_onnx(qat_cnn(), tmp_path / "m.onnx", torch.zeros(1, 1, 8, 8))


def test_export_rejects_non_tensor_inputs(trained, tmp_path):
    with pytest.raises(QuantizationConfigError, match="example_inputs must be a tensor"):
        export_onnx(convert_to_inferable(trained), tmp_path / "m.onnx", [1, 2])


def test_convert_rejects_non_module():
    with pytest.raises(QuantizationConfigError, match=r"model must be a torch\.nn\.Module, got dict"):
        convert_to_inferable({})


def test_convert_of_a_bare_wrapper():
    wrapper = copy.deepcopy(qat_cnn()[1])
    converted = convert_to_inferable(wrapper)
    assert isinstance(converted, PytorchQuantizationWrapper)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(converted(x), wrapper.eval()(x))
