"""Small QAT models wrapped by hand, and the digits data, for the PyTorch backend tests."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

from trainable_infra import (
    QuantizationMethod,
    TrainableQuantizerActivationConfig,
    TrainableQuantizerWeightsConfig,
    TrainingMethod,
)
from trainable_infra.common import numerics
from trainable_infra.pytorch_backend import (
    LSQSymmetricActivationQuantizer,
    LSQSymmetricWeightQuantizer,
    PytorchTrainableActivationQuantizationHolder,
    PytorchTrainableQuantizationWrapper,
    STESymmetricActivationQuantizer,
    STESymmetricWeightQuantizer,
)

MIN_THRESHOLD = 2.0**-16


def digits(n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `n` of scikit-learn's bundled 8x8 digits, as (N, 1, 8, 8) float32 in [0, 1] and labels."""
    data = load_digits()
    x = torch.tensor(data.images[:n] / 16.0, dtype=torch.float32).unsqueeze(1)
    return x, torch.tensor(data.target[:n], dtype=torch.long)


def weight_quantizer(module: nn.Module, method: TrainingMethod, n_bits: int = 8, freeze: bool = False):
    weight = module.weight.detach().numpy()
    config = TrainableQuantizerWeightsConfig(
        QuantizationMethod.SYMMETRIC, n_bits, {"threshold": numerics.max_abs_threshold(weight, channel_axis=0)},
        True, 0, True, MIN_THRESHOLD,
    )
    cls = LSQSymmetricWeightQuantizer if method is TrainingMethod.LSQ else STESymmetricWeightQuantizer
    return cls(config, freeze_quant_params=freeze)


def activation_holder(threshold: float, signed: bool, method: TrainingMethod, n_bits: int = 8):
    config = TrainableQuantizerActivationConfig(
        QuantizationMethod.SYMMETRIC, n_bits, {"threshold": threshold, "is_signed": signed}, True, MIN_THRESHOLD
    )
    cls = LSQSymmetricActivationQuantizer if method is TrainingMethod.LSQ else STESymmetricActivationQuantizer
    return PytorchTrainableActivationQuantizationHolder(cls(config))


def wrap(module: nn.Module, method: TrainingMethod, **kwargs) -> PytorchTrainableQuantizationWrapper:
    return PytorchTrainableQuantizationWrapper(module, {"weight": weight_quantizer(module, method, **kwargs)})


def qat_cnn(method: TrainingMethod = TrainingMethod.STE, seed: int = 0, freeze_first: bool = False) -> nn.Sequential:
    """A small CNN for 8x8 digits with every conv / linear weight and every activation quantized."""
    torch.manual_seed(seed)
    return nn.Sequential(
        activation_holder(1.0, False, method),
        wrap(nn.Conv2d(1, 8, 3, padding=1), method, freeze=freeze_first),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        activation_holder(4.0, False, method),
        wrap(nn.Conv2d(8, 16, 3, padding=1, stride=2), method),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        activation_holder(4.0, False, method),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        wrap(nn.Linear(16, 10), method),
        activation_holder(8.0, True, method),
    )


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, batch: int = 32, start: int = 0) -> list:
    """Plain training loop over the digits; returns the losses."""
    x, y = digits()
    losses = []
    model.train()
    for step in range(start, start + steps):
        index = torch.arange(step * batch, (step + 1) * batch) % len(x)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x[index]), y[index])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def snapshot(model: nn.Module) -> dict[str, np.ndarray]:
    return {name: tensor.detach().clone().numpy() for name, tensor in model.state_dict().items()}
