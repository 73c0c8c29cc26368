"""DQA in PyTorch: resolution, the temperature schedule, variables and their groups, state_dict, config, errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

from trainable_infra import (
    LinearAnnealing,
    QATConfig,
    QuantizationConfigError,
    QuantizationMethod,
    QuantizationTarget,
    TrainableQuantizerWeightsConfig,
    TrainingMethod,
    VariableGroup,
    get_trainable_quantizer_class,
)
from trainable_infra.common import numerics
from trainable_infra.pytorch_backend import (
    BasePytorchTrainableQuantizer,
    DQASymmetricActivationQuantizer,
    DQASymmetricWeightQuantizer,
    DQAUniformActivationQuantizer,
    DQAUniformWeightQuantizer,
    PytorchTrainableQuantizationWrapper,
    convert_to_inferable,
    quantize_model,
    set_dqa_temperature_schedule,
)
from trainable_infra.pytorch_backend.training import quantizers_of

DQA_CONFIG = QATConfig(weight_training_method=TrainingMethod.DQA, activation_training_method=TrainingMethod.DQA,
                       weight_n_bits=4)
SCHEDULE = LinearAnnealing(t_start=1, t_end=4, initial_value=2.0, target_value=0.0)


def _data() -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).normal(size=(8, 1, 8, 8)).astype(np.float32))


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    float_model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    model = quantize_model(float_model, DQA_CONFIG, [_data()], progress=False)
    set_dqa_temperature_schedule(model, SCHEDULE)
    return model


def _first_wrapper(model: nn.Module) -> PytorchTrainableQuantizationWrapper:
    return next(m for m in model.modules() if isinstance(m, PytorchTrainableQuantizationWrapper))


def _weight_quantizer(model: nn.Module) -> DQASymmetricWeightQuantizer:
    return _first_wrapper(model).weights_quantizers["weight"]


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model.train()
    optimizer.zero_grad()
    model(_data()).square().mean().backward()
    optimizer.step()


@pytest.mark.parametrize(("target", "method", "expected"), [
    (QuantizationTarget.Weights, QuantizationMethod.SYMMETRIC, DQASymmetricWeightQuantizer),
    (QuantizationTarget.Weights, QuantizationMethod.POWER_OF_TWO, DQASymmetricWeightQuantizer),
    (QuantizationTarget.Weights, QuantizationMethod.UNIFORM, DQAUniformWeightQuantizer),
    (QuantizationTarget.Activation, QuantizationMethod.SYMMETRIC, DQASymmetricActivationQuantizer),
    (QuantizationTarget.Activation, QuantizationMethod.UNIFORM, DQAUniformActivationQuantizer),
])
def test_resolver_finds_dqa(target, method, expected):
    assert get_trainable_quantizer_class(target, TrainingMethod.DQA, method, BasePytorchTrainableQuantizer) is expected
    assert get_trainable_quantizer_class(target, "DQA", method, BasePytorchTrainableQuantizer) is expected


def test_quantize_model_registers_logits_as_weights_and_keeps_the_grid_fixed():
    model = _model()
    quantizers = quantizers_of(model)
    assert {name.rsplit(".", 1)[1] for name in quantizers} == {"weight", "activation"}
    assert all(type(q).identifier is TrainingMethod.DQA for q in quantizers.values())
    for quantizer in quantizers.values():
        assert quantizer.get_trainable_variables(VariableGroup.QPARAMS) == []
        (logits,) = quantizer.get_trainable_variables(VariableGroup.WEIGHTS)
        assert logits is quantizer.attention_logits
        assert logits.shape == (3,)
    state = model.state_dict()
    assert any(k.endswith("weight_attention") for k in state)
    assert any(k.endswith("weight_step") for k in state)
    assert not any(k.endswith("_step") for k, _ in model.named_parameters())  # a buffer: no optimizer sees it


def test_temperature_follows_the_schedule_and_ends_at_b_bits():
    model = _model()
    quantizer = _weight_quantizer(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    temperatures = []
    for _ in range(5):
        temperatures.append(quantizer.temperature())
        assert np.allclose(quantizer.attention(),
                           numerics.dqa_attention(quantizer.current_logits(), temperatures[-1], 4))
        _train_step(model, optimizer)
    assert temperatures == [SCHEDULE(step) for step in range(5)]
    assert temperatures == pytest.approx([2.0, 2.0, 4 / 3, 2 / 3, 0.0])
    assert quantizer.current_step() == 5
    assert not np.allclose(quantizer.current_logits(), 0.0), "the attention logits did not learn"
    # Past the schedule's end the training forward is the b-bit quantizer, bit for bit, and the logits get 0.
    weight = _first_wrapper(model).module.weight.detach().clone().requires_grad_()
    trained = quantizer(weight, True)
    trained.sum().backward()
    assert torch.equal(trained, quantizer(weight, False))
    assert quantizer.attention().tolist() == [1.0, 0.0, 0.0]
    # Eval mode and calls without gradients do not count.
    assert quantizer.current_step() == 6
    with torch.no_grad():
        model.eval()(_data())
        quantizer(weight, True)
    assert quantizer.current_step() == 6


def test_eval_is_the_b_bit_quantizer_and_converts_exactly():
    model = _model()
    quantizer = _weight_quantizer(model)
    weight = _first_wrapper(model).module.weight.detach()
    expected = numerics.fake_quant_symmetric(
        weight.numpy(), quantizer.effective_threshold().numpy(), 4, channel_axis=0)
    np.testing.assert_array_equal(quantizer(weight, False).numpy(), expected)
    model.eval()
    assert torch.equal(convert_to_inferable(model)(_data()), model(_data()))


def test_state_dict_round_trip_resumes_on_the_schedule():
    model = _model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        _train_step(model, optimizer)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    resumed = _model(seed=1)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for a, b in zip(quantizers_of(model).values(), quantizers_of(resumed).values(), strict=True):
        assert a.current_step() == b.current_step() == 2
        np.testing.assert_array_equal(a.current_logits(), b.current_logits())
    model.train(), resumed.train()
    assert torch.equal(model(_data()), resumed(_data()))


def test_config_round_trip_keeps_the_schedule():
    config = TrainableQuantizerWeightsConfig(QuantizationMethod.UNIFORM, 3, {"range_min": -1.0, "range_max": 0.5},
                                             True, 0, False, 2**-16)
    quantizer = DQAUniformWeightQuantizer(config, temperature_schedule=SCHEDULE)
    rebuilt = DQAUniformWeightQuantizer.from_config(quantizer.get_config())
    assert rebuilt.temperature_schedule == SCHEDULE
    assert rebuilt.quantization_config == config
    quantizer.set_temperature_schedule({"t_start": 0, "t_end": 9, "initial_value": 1.0, "target_value": 0.0})
    assert quantizer.get_config()["temperature_schedule"]["t_end"] == 9
    assert quantizer.candidate_bits == (3, 6, 12)


@pytest.mark.parametrize(("build", "message"), [
    (lambda: DQASymmetricWeightQuantizer(TrainableQuantizerWeightsConfig(
        QuantizationMethod.SYMMETRIC, 12, {"threshold": 1.0}, True, 0, False, 2**-16)),
     "weights_n_bits must be in 2..8 for DQA (its candidates are b, 2b and 4b bits, at most 16), got 12"),
    (lambda: DQASymmetricWeightQuantizer(TrainableQuantizerWeightsConfig(
        QuantizationMethod.SYMMETRIC, 4, {"threshold": 1.0}, True, 0, False, 2**-16),
        temperature_schedule=LinearAnnealing(0, 10, 1.0, 0.5)),
     "temperature_schedule.target_value must be 0.0"),
    (lambda: DQASymmetricWeightQuantizer(TrainableQuantizerWeightsConfig(
        QuantizationMethod.SYMMETRIC, 4, {"threshold": 1.0}, True, 0, False, 2**-16),
        temperature_schedule=LinearAnnealing(0, 10, -1.0, 0.0)),
     "temperature_schedule.initial_value must be > 0 (the starting temperature), got -1.0"),
    (lambda: DQASymmetricWeightQuantizer(TrainableQuantizerWeightsConfig(
        QuantizationMethod.SYMMETRIC, 4, {"threshold": 1.0}, True, 0, False, 2**-16), temperature_schedule=5),
     "temperature_schedule must be a LinearAnnealing, a dict made by its to_dict() or None"),
    (lambda: set_dqa_temperature_schedule(
        quantize_model(nn.Sequential(nn.Linear(4, 2)), QATConfig(), [torch.ones(2, 4)], progress=False), SCHEDULE),
     "model has no DQA quantizers"),
])
def test_bad_input_is_refused_with_the_library_error(build, message):
    with pytest.raises(QuantizationConfigError) as error:
        build()
    assert message in str(error.value)
