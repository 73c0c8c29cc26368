"""The grid (Δ, zero point) an STE or frozen quantizer keeps between calls: it follows every write that changes its
parameters, and is computed on every call where the parameters are trained."""

import torch
from torch import nn

from tests.pytorch_backend.test_quantizers import SYM, UNI, Case, build
from trainable_infra import QATConfig, TrainingMethod
from trainable_infra.pytorch_backend import (
    PytorchTrainableActivationQuantizationHolder,
    calibrate,
    freeze_quantizers,
    quantize_model,
)

STE_WEIGHTS = Case(TrainingMethod.STE, SYM, "weights", 8, "per-channel-axis0")
STE_UNIFORM = Case(TrainingMethod.STE, UNI, "activation", 8, "straddling")
LSQ_WEIGHTS = Case(TrainingMethod.LSQ, SYM, "weights", 8, "per-channel-axis0")


def _fresh_grid(quantizer) -> tuple[torch.Tensor, torch.Tensor]:
    return quantizer._compute_grid()


def _assert_current(quantizer) -> None:
    delta, zero_point = quantizer.grid()
    fresh_delta, fresh_zero_point = _fresh_grid(quantizer)
    assert torch.equal(delta, fresh_delta)
    assert torch.equal(zero_point, fresh_zero_point)


def test_ste_grid_is_kept_until_a_parameter_is_written():
    quantizer, _, _ = build(STE_WEIGHTS)
    first = quantizer.grid()
    assert quantizer.grid()[0] is first[0]  # kept: no kernel runs for it again
    threshold = quantizer.get_quantizer_variable("threshold")
    with torch.no_grad():
        threshold.mul_(2.0)  # an in-place write bumps the version
    assert quantizer.grid()[0] is not first[0]
    _assert_current(quantizer)


def test_uniform_grid_follows_fill_load_state_dict_and_replacement():
    quantizer, layer, _ = build(STE_UNIFORM)
    kept = quantizer.grid()[0]
    with torch.no_grad():
        quantizer.get_quantizer_variable("range_max").fill_(3.0)
    assert quantizer.grid()[0] is not kept
    _assert_current(quantizer)
    state = {name: value * 0.5 for name, value in layer.state_dict().items()}
    layer.load_state_dict(state)
    _assert_current(quantizer)
    name = next(name for name, _ in layer.named_parameters() if name.endswith("range_min"))
    setattr(layer, name, nn.Parameter(torch.full_like(getattr(layer, name), -4.0), requires_grad=False))
    _assert_current(quantizer)


def test_write_through_data_needs_forget_grid():
    quantizer, _, _ = build(STE_WEIGHTS)
    quantizer.grid()
    quantizer.get_quantizer_variable("threshold").data.fill_(0.25)  # bypasses the version counter
    quantizer.forget_grid()
    _assert_current(quantizer)


def test_trained_parameters_get_a_fresh_grid_on_every_call():
    quantizer, _, _ = build(LSQ_WEIGHTS)
    assert quantizer.get_quantizer_variable("threshold").requires_grad
    assert quantizer.grid()[0] is not quantizer.grid()[0]


def test_holders_forget_their_grids_on_load_and_calibration():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))
    data = [torch.randn(8, 1, 8, 8)]
    qat = quantize_model(model, QATConfig(), data, progress=False)
    holders = [m for m in qat.modules() if isinstance(m, PytorchTrainableActivationQuantizationHolder)]
    for holder in holders:
        holder.activation_holder_quantizer.grid()
    calibrate(qat, [data[0] * 3.0], progress=False)
    for holder in holders:
        _assert_current(holder.activation_holder_quantizer)
    qat.load_state_dict(qat.state_dict())
    for holder in holders:
        assert "_grid_cache" not in vars(holder.activation_holder_quantizer)


def test_frozen_lsq_keeps_its_grid_and_unfrozen_does_not():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))
    config = QATConfig(weight_training_method=TrainingMethod.LSQ, activation_training_method=TrainingMethod.LSQ)
    qat = quantize_model(model, config, [torch.randn(8, 1, 8, 8)], progress=False)
    quantizer = qat.get_submodule("0").weights_quantizers["weight"]
    assert quantizer.grid()[0] is not quantizer.grid()[0]
    freeze_quantizers(qat)
    assert quantizer.grid()[0] is quantizer.grid()[0]
