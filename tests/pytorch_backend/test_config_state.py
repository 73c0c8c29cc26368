"""A quantizer's config follows its variables: after calibration `quantization_config` and `get_config()` hold
the calibrated threshold or range, after training `get_config()` holds the trained one, and
`from_config(get_config())` rebuilds a quantizer that computes the same."""

import json

import pytest
import torch
from torch import nn

from trainable_infra import QATConfig, QuantizationMethod, TrainingMethod
from trainable_infra.pytorch_backend import (
    PytorchTrainableActivationQuantizationHolder,
    PytorchTrainableQuantizationWrapper,
    quantize_model,
)

PLACEHOLDER_THRESHOLD = 8.0


def float_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def data(n: int = 32) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.5


def holders(model: nn.Module) -> dict[str, PytorchTrainableActivationQuantizationHolder]:
    return {n: m for n, m in model.named_modules() if isinstance(m, PytorchTrainableActivationQuantizationHolder)}


def rebuilt_holder(holder: PytorchTrainableActivationQuantizationHolder) -> nn.Module:
    quantizer = holder.activation_holder_quantizer
    config = json.loads(json.dumps(quantizer.get_config()))
    return PytorchTrainableActivationQuantizationHolder(type(quantizer).from_config(config))


def rebuilt_wrapper(wrapper: PytorchTrainableQuantizationWrapper) -> PytorchTrainableQuantizationWrapper:
    quantizer = wrapper.weights_quantizers["weight"]
    config = json.loads(json.dumps(quantizer.get_config()))
    return PytorchTrainableQuantizationWrapper(wrapper.module, {"weight": type(quantizer).from_config(config)})


def train(model: nn.Module, steps: int = 5) -> None:
    # Adam moves every parameter by about lr per step, the thresholds' small gradients too.
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    x = data()
    target = torch.arange(len(x)) % 3
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), target).backward()
        optimizer.step()
    model.eval()


@pytest.mark.parametrize("method", [QuantizationMethod.SYMMETRIC, QuantizationMethod.POWER_OF_TWO,
                                    QuantizationMethod.UNIFORM])
def test_calibrated_values_are_in_the_config_and_get_config(method):
    qat = quantize_model(float_model(), QATConfig(activation_quantization_method=method), [data()],
                         progress=False)
    x = data(8)
    for name, holder in holders(qat).items():
        quantizer = holder.activation_holder_quantizer
        params = quantizer.quantization_config.activation_quantization_params
        keys = ["range_min", "range_max"] if method is QuantizationMethod.UNIFORM else ["threshold"]
        for key in keys:
            assert params[key] == float(quantizer.get_quantizer_variable(key)), (name, key)
        if method is not QuantizationMethod.UNIFORM:
            assert params["threshold"] != PLACEHOLDER_THRESHOLD
        assert quantizer.get_config()["quantization_config"] == quantizer.quantization_config.to_dict()
        rebuilt = rebuilt_holder(holder).eval()
        holder.eval()
        assert torch.equal(rebuilt(x), holder(x))


def test_trained_values_are_in_get_config():
    config = QATConfig(weight_training_method=TrainingMethod.LSQ, activation_training_method=TrainingMethod.LSQ)
    qat = quantize_model(float_model(), config, [data()], progress=False)
    calibrated = {n: h.activation_holder_quantizer.quantization_config for n, h in holders(qat).items()}
    train(qat)
    x = data(8)
    for name, holder in holders(qat).items():
        quantizer = holder.activation_holder_quantizer
        threshold = float(quantizer.get_quantizer_variable("threshold").detach())
        assert threshold != calibrated[name].activation_quantization_params["threshold"], name
        assert quantizer.get_config()["quantization_config"]["activation_quantization_params"]["threshold"] == threshold
        assert torch.equal(rebuilt_holder(holder).eval()(x), holder(x))
    for module in qat.modules():
        if isinstance(module, PytorchTrainableQuantizationWrapper):
            rebuilt = rebuilt_wrapper(module).eval()
            assert torch.equal(rebuilt.get_quantized_weights()["weight"], module.get_quantized_weights()["weight"])
            trained = module.weights_quantizers["weight"].get_quantizer_variable("threshold")
            assert torch.equal(rebuilt.weights_quantizers["weight"].get_quantizer_variable("threshold"), trained)
