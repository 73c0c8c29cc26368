"""Model-level QAT in PyTorch: quantize_model, calibrate, train, save/reload, convert, export, report."""

from __future__ import annotations

import copy
import re

import numpy as np
import onnxruntime as ort
import pytest
import torch
from mct_quantizers import get_ort_session_options
from torch import nn

from tests.pytorch_backend.models import digits, snapshot
from tests.pytorch_backend.zoo import TinyMobileNet, TinyResNet, Untraceable
from trainable_infra import QATConfig, QuantizationConfigError, QuantizationMethod, TrainingMethod
from trainable_infra.pytorch_backend import (
    PytorchTrainableActivationQuantizationHolder,
    PytorchTrainableQuantizationWrapper,
    calibrate,
    convert_to_inferable,
    export_onnx,
    freeze_bn_stats,
    freeze_quantizers,
    quantization_report,
    quantize_model,
    unfreeze_bn_stats,
    unfreeze_quantizers,
)

X, Y = digits(128)
DATA = [(X[:64], Y[:64]), (X[64:], Y[64:])]
EXPECTED_HOLDERS = {
    TinyResNet: {
        "x", "stem_0", "layer1_conv1", "layer1_conv2", "add", "layer2_conv1", "layer2_conv2", "layer2_shortcut_0",
        "add_1", "fc",
        "fc_input",  # after the average pooling: the classifier's input is quantized too (an integer kernel)
    },
    TinyMobileNet: {
        "x", "stem_0", "block_expand_0", "block_depthwise_0", "block_project_0", "add", "branch_a", "branch_b", "cat",
        "head", "head_input",
    },
}


def holders(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, PytorchTrainableActivationQuantizationHolder)}


def wrappers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, PytorchTrainableQuantizationWrapper)}


def train_steps(model, steps=4, lr=0.05):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    losses = []
    for step in range(steps):
        x, y = DATA[step % 2]
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("architecture", [TinyResNet, TinyMobileNet])
def test_quantize_places_wrappers_and_holders_on_layers_and_functional_ops(architecture):
    torch.manual_seed(0)
    float_model = architecture()
    qat = quantize_model(float_model, QATConfig(), DATA, progress=False)
    convolutions = [n for n, m in float_model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert sorted(wrappers(qat)) == sorted(convolutions)
    assert {name.removesuffix("_activation_quantizer") for name in holders(qat)} == EXPECTED_HOLDERS[architecture]


@pytest.mark.parametrize("method", list(TrainingMethod))
@pytest.mark.parametrize("architecture", [TinyResNet, TinyMobileNet])
def test_train_save_reload_convert_export(architecture, method, tmp_path):
    torch.manual_seed(0)
    float_model = architecture()
    config = QATConfig(weight_training_method=method, activation_training_method=method, weight_n_bits=4)
    qat = quantize_model(float_model, config, DATA, progress=False)
    losses = train_steps(qat)
    assert all(np.isfinite(losses))

    torch.save(qat.state_dict(), tmp_path / "qat.pt")
    with pytest.warns(UserWarning, match="no representative_data"):
        rebuilt = quantize_model(architecture(), config)
    rebuilt.load_state_dict(torch.load(tmp_path / "qat.pt", weights_only=True))
    qat.eval()
    rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(X), qat(X))

    converted = convert_to_inferable(qat)
    with torch.no_grad():
        assert torch.equal(converted(X), qat(X))
    path = export_onnx(converted, tmp_path / "model.onnx", X[:2])
    session = ort.InferenceSession(path, get_ort_session_options(), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {"input_0": X.numpy()})
    with torch.no_grad():
        torch_out = converted(X).numpy()
    # onnxruntime's convolutions sum in another order, which can tip a value at a rounding tie of a later
    # quantizer to the neighbouring level: allow rare differences of up to two output steps.
    output_quantizer = holders(qat)[list(holders(qat))[-1]].activation_holder_quantizer
    step = float(output_quantizer.grid()[0][0])
    diff = np.abs(onnx_out - torch_out)
    assert np.mean(diff > 1e-5) < 0.05
    assert diff.max() <= 2 * step + 1e-5
    assert np.mean(onnx_out.argmax(1) == torch_out.argmax(1)) >= 0.97


def test_input_model_is_not_mutated():
    float_model = TinyResNet()
    before = snapshot(float_model)
    types_before = [type(m) for m in float_model.modules()]
    quantize_model(float_model, QATConfig(), DATA, progress=False)
    assert [type(m) for m in float_model.modules()] == types_before
    after = snapshot(float_model)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_overrides_and_skips_apply():
    config = QATConfig(
        weight_n_bits=4,
        overrides={"fc": {"weight_n_bits": 8, "activation_n_bits": 6}, "layer2.*": {"skip": True}},
    )
    qat = quantize_model(TinyResNet(), config, DATA, progress=False)
    wrapped = wrappers(qat)
    assert not any(name.startswith("layer2.") for name in wrapped)
    assert wrapped["fc"].weights_quantizers["weight"].quantization_config.weights_n_bits == 8
    assert wrapped["layer1.conv1"].weights_quantizers["weight"].quantization_config.weights_n_bits == 4
    found = holders(qat)
    assert found["fc_activation_quantizer"].activation_holder_quantizer.quantization_config.activation_n_bits == 6
    assert not any(name.startswith("layer2_") for name in found)


def test_module_fallback_warns_and_quantizes_what_it_can():
    with pytest.warns(UserWarning, match=r"could not be traced by torch\.fx.*Not quantized: the model inputs"):
        qat = quantize_model(Untraceable(), QATConfig(), DATA, progress=False)
    assert sorted(wrappers(qat)) == ["conv", "fc"]
    assert list(holders(qat)) == ["act.1"]
    assert all(np.isfinite(train_steps(qat, steps=2)))


def test_calibration_sets_thresholds_from_data():
    qat = quantize_model(TinyResNet(), QATConfig(), DATA, progress=False)
    input_quantizer = holders(qat)["x_activation_quantizer"].activation_holder_quantizer
    assert input_quantizer.threshold.item() == pytest.approx(float(X.abs().max()))
    new = calibrate(qat, [X[:16] * 2], progress=False)
    assert new["x_activation_quantizer"]["threshold"] == pytest.approx(float(X[:16].abs().max() * 2))
    assert input_quantizer.threshold.item() == pytest.approx(float(X[:16].abs().max() * 2))


def test_uniform_activations_and_mse_init():
    config = QATConfig(
        activation_quantization_method=QuantizationMethod.UNIFORM, weight_init="mse", activation_calibration="mse"
    )
    qat = quantize_model(TinyMobileNet(), config, DATA, progress=False)
    quantizer = holders(qat)["x_activation_quantizer"].activation_holder_quantizer
    assert quantizer.range_min.item() <= 0 < quantizer.range_max.item() <= float(X.max())
    assert all(np.isfinite(train_steps(qat, steps=2)))


def test_freeze_and_unfreeze_quantizers():
    qat = quantize_model(TinyResNet(), QATConfig(weight_training_method=TrainingMethod.LSQ,
                                                 activation_training_method=TrainingMethod.LSQ), DATA, progress=False)
    thresholds = [p for n, p in qat.named_parameters() if n.endswith("_threshold")]
    assert thresholds
    assert all(p.requires_grad for p in thresholds)
    assert freeze_quantizers(qat) == len(thresholds)
    before = [p.detach().clone() for p in thresholds]
    train_steps(qat, steps=2)
    assert all(torch.equal(b, p) for b, p in zip(before, thresholds, strict=True))
    unfreeze_quantizers(qat)
    train_steps(qat, steps=2)
    assert any(not torch.equal(b, p) for b, p in zip(before, thresholds, strict=True))


def test_freeze_bn_stats_survives_train_mode():
    qat = quantize_model(TinyResNet(), QATConfig(fold_batch_norm=False), DATA, progress=False)
    batch_norm = qat.get_submodule("layer1.bn1")
    assert freeze_bn_stats(qat) == 6
    mean = batch_norm.running_mean.clone()
    train_steps(qat, steps=2)
    qat.train()
    assert torch.equal(batch_norm.running_mean, mean)
    assert unfreeze_bn_stats(qat) == 6
    train_steps(qat, steps=1)
    assert not torch.equal(batch_norm.running_mean, mean)


def test_quantization_report_rows_and_table(capsys):
    qat = quantize_model(TinyMobileNet(), QATConfig(weight_n_bits=4), DATA, progress=False)
    rows = quantization_report(qat, DATA)
    table = capsys.readouterr().out
    assert len(rows) == len(wrappers(qat)) + len(holders(qat))
    weights = [r for r in rows if r["kind"] == "weights"]
    assert all(r["bits"] == 4 for r in weights)
    assert all(np.isfinite(r["sqnr_db"]) and r["sqnr_db"] > 5 for r in rows)
    assert "SQNR dB" in table
    assert "cat_activation_quantizer" in table
    without_data = quantization_report(qat, print_table=False)
    assert all(r["sqnr_db"] is None for r in without_data if r["kind"] == "activation")


BAD = [
    ("no quantizable layer", lambda: quantize_model(nn.Sequential(nn.ReLU()), QATConfig()),
     "has no layer to quantize"),
    ("override naming no layer",
     lambda: quantize_model(TinyResNet(), QATConfig(overrides={"classifier": {"skip": True}})),
     "override pattern 'classifier' matches no layer of the model"),
    ("data of the wrong shape", lambda: quantize_model(TinyResNet(), QATConfig(), [torch.zeros(2, 3, 8, 8)],
                                                       progress=False),
     "representative data batch 0 (input shapes [(2, 3, 8, 8)]) does not run through the model"),
    ("data of the wrong kind", lambda: quantize_model(TinyResNet(), QATConfig(), [np.zeros((2, 1, 8, 8))],
                                                      progress=False),
     "each batch of representative data must be a tensor or an (inputs, targets) pair, got ndarray"),
    ("empty data", lambda: quantize_model(TinyResNet(), QATConfig(), [], progress=False),
     "representative data is empty"),
    ("convert an unquantized model", lambda: convert_to_inferable(TinyResNet()),
     "has no trainable quantization wrapper or holder"),
    ("config of the wrong type", lambda: quantize_model(TinyResNet(), {"weight_n_bits": 4}),
     "qat_config must be a QATConfig"),
    ("unsupported layer type", lambda: quantize_model(TinyResNet(), QATConfig(layer_types=["BatchNorm2d"])),
     "layer_types names ['BatchNorm2d'], which the PyTorch backend cannot quantize"),
    ("bad batch count", lambda: quantize_model(TinyResNet(), QATConfig(), DATA, num_calibration_batches=0),
     "num_calibration_batches must be a positive int or None"),
    ("quantize a quantized model",
     lambda: quantize_model(quantize_model(TinyResNet(), QATConfig(), DATA, progress=False), QATConfig()),
     "is already quantized"),
    ("calibrate an unquantized model", lambda: calibrate(TinyResNet(), DATA),
     "model has no trainable activation quantizers"),
    ("report of an unquantized model", lambda: quantization_report(TinyResNet()),
     "model has no trainable quantizers"),
]


@pytest.mark.parametrize(("case", "build", "message"), BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_refused_clearly(case, build, message):
    with pytest.raises(QuantizationConfigError, match=re.escape(message)):
        build()


def test_unsigned_holder_warns_when_calibrated_on_negative_values():
    qat = quantize_model(TinyResNet(), QATConfig(), DATA, progress=False)
    broken = copy.deepcopy(qat)
    # The stem holder sits after a ReLU: without the ReLU, negated inputs reach it as negative values.
    setattr(broken.stem, "2", nn.Identity())
    with pytest.warns(UserWarning, match="quantizes unsigned but saw values down to"):
        calibrate(broken, [-X], progress=False)
