"""Training-step time of a QAT model relative to its float model (PyTorch).

The model is a 7-layer CNN (convolutions 3→32→32→64→64→128→128, each with BatchNorm and ReLU, then a linear
classifier) on 32x32x3 inputs, batch 64, SGD. Its QAT version quantizes every convolution / linear weight
per-channel and every activation (input and after each ReLU) at 8 bits (W8A8). Float and QAT steps are
interleaved in one process and the median of each is reported.

    python benchmarks/step_overhead.py --method STE --steps 30
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import numpy as np
import torch
from torch import nn

from trainable_infra import (
    QuantizationMethod,
    TrainableQuantizerActivationConfig,
    TrainableQuantizerWeightsConfig,
    TrainingMethod,
    get_trainable_quantizer_class,
)
from trainable_infra.common import numerics
from trainable_infra.common.mct import QuantizationTarget
from trainable_infra.pytorch_backend import (
    BasePytorchTrainableQuantizer,
    PytorchTrainableActivationQuantizationHolder,
    PytorchTrainableQuantizationWrapper,
)

WIDTHS = (32, 32, 64, 64, 128, 128)


def float_cnn() -> nn.Sequential:
    """The float 7-layer CNN."""
    layers: list[nn.Module] = []
    channels = 3
    for i, width in enumerate(WIDTHS):
        layers += [nn.Conv2d(channels, width, 3, padding=1, stride=2 if i in (2, 4) else 1), nn.BatchNorm2d(width),
                   nn.ReLU()]
        channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10)]
    return nn.Sequential(*layers)


def qat_cnn(model: nn.Sequential, method: TrainingMethod) -> nn.Sequential:
    """A W8A8 per-channel QAT copy of `model`, its quantizers initialised from its weights."""
    weight_cls = get_trainable_quantizer_class(
        QuantizationTarget.Weights, method, QuantizationMethod.SYMMETRIC, BasePytorchTrainableQuantizer
    )
    activation_cls = get_trainable_quantizer_class(
        QuantizationTarget.Activation, method, QuantizationMethod.SYMMETRIC, BasePytorchTrainableQuantizer
    )

    def holder(signed: bool) -> nn.Module:
        config = TrainableQuantizerActivationConfig(
            QuantizationMethod.SYMMETRIC, 8, {"threshold": 4.0, "is_signed": signed}, True, 2**-16
        )
        return PytorchTrainableActivationQuantizationHolder(activation_cls(config))

    layers: list[nn.Module] = [holder(True)]
    for module in model:
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            threshold = numerics.max_abs_threshold(module.weight.detach().numpy(), channel_axis=0)
            config = TrainableQuantizerWeightsConfig(
                QuantizationMethod.SYMMETRIC, 8, {"threshold": threshold}, True, 0, True, 2**-16
            )
            layers.append(PytorchTrainableQuantizationWrapper(module, {"weight": weight_cls(config)}))
        else:
            layers.append(module)
        if isinstance(module, nn.ReLU):
            layers.append(holder(False))
    return nn.Sequential(*layers)


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        if x.is_cuda:
            torch.cuda.synchronize()

    return step


def measure(method: TrainingMethod, steps: int, warmup: int, batch: int, compile_models: bool,
            device: str = "cpu") -> dict:
    """Median step times (ms) of the float and the QAT model, interleaved."""
    torch.manual_seed(0)
    float_model = float_cnn()
    qat_model = qat_cnn(copy.deepcopy(float_model), method)
    float_model, qat_model = float_model.to(device), qat_model.to(device)
    if compile_models:
        float_model, qat_model = torch.compile(float_model), torch.compile(qat_model)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    runs = {"float": make_step(float_model, x, y), "qat": make_step(qat_model, x, y)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(warmup + steps):
        for name, step in runs.items():
            start = time.perf_counter()
            step()
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times[name].append(elapsed * 1e3)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {**medians, "ratio": medians["qat"] / medians["float"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=[m.name for m in TrainingMethod], default="STE")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    np.random.seed(0)
    result = measure(TrainingMethod[args.method], args.steps, args.warmup, args.batch, args.compile, args.device)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {args.threads} threads"
    print(f"torch {torch.__version__}, {where}, batch {args.batch}, {args.method}"
          f"{', compiled' if args.compile else ''}, median of {args.steps} interleaved steps")
    print(f"float {result['float']:.2f} ms/step | QAT {result['qat']:.2f} ms/step | ratio {result['ratio']:.3f}x")


if __name__ == "__main__":
    main()
