"""The demo on PyTorch: float training, PTQ, QAT, save and reload, conversion, ONNX export, per-layer report."""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from trainable_infra.common.digits import accuracy_line, load_digits_split
from trainable_infra.common.dqa import temperature_schedule_for
from trainable_infra.common.enums import TrainingMethod
from trainable_infra.common.qat_config import QATConfig
from trainable_infra.pytorch_backend.convert import convert_to_inferable
from trainable_infra.pytorch_backend.export import export_onnx
from trainable_infra.pytorch_backend.quantize import quantize_model
from trainable_infra.pytorch_backend.report import quantization_report
from trainable_infra.pytorch_backend.training import set_dqa_temperature_schedule

BATCH = 32


def float_cnn() -> nn.Sequential:
    """The demo's float model: three convolutions with BatchNorm and ReLU, global pooling, a linear head."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )


def batches(x: torch.Tensor, y: torch.Tensor, size: int, generator: torch.Generator | None = None):
    """(inputs, targets) batches, shuffled when a generator is given."""
    order = torch.randperm(len(x), generator=generator) if generator is not None else torch.arange(len(x))
    return [(x[order[i:i + size]], y[order[i:i + size]]) for i in range(0, len(x), size)]


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int, label: str,
          progress: bool) -> None:
    """Adam with cosine decay, cross-entropy, shuffled batches."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps = max(epochs * -(-len(x) // BATCH), 1)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    bar = tqdm(range(epochs), desc=label, disable=not progress, unit="epoch")
    for _ in bar:
        total = 0.0
        for inputs, targets in batches(x, y, BATCH, generator):
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(inputs), targets)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(inputs)
        bar.set_postfix(loss=f"{total / len(x):.4f}")


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(x)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((predict(model, x).argmax(1) == y).float().mean())


def run(args: argparse.Namespace) -> int:
    """Run the demo with the options of `python -m trainable_infra demo`; returns the exit status."""
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    progress = not args.no_progress
    x_train, y_train, x_test, y_test = (torch.from_numpy(a) for a in load_digits_split(seed=args.seed))
    x_train, x_test = x_train.unsqueeze(1), x_test.unsqueeze(1)
    method = TrainingMethod[args.method]
    print(f"PyTorch {torch.__version__}: digits, {len(x_train)} train / {len(x_test)} test images, "
          f"W{args.weight_bits}A{args.activation_bits} {method.name}")

    float_model = float_cnn()
    train(float_model, x_train, y_train, args.float_epochs, 3e-3, args.seed, "float training", progress)
    print(accuracy_line("float", accuracy(float_model, x_test, y_test)))

    config = QATConfig(
        weight_training_method=method, activation_training_method=method,
        weight_n_bits=args.weight_bits, activation_n_bits=args.activation_bits,
        fold_batch_norm=getattr(args, "fold_batch_norm", True),
    )
    qat_model = quantize_model(float_model, config, batches(x_train, y_train, 256), progress=progress)
    print(accuracy_line("PTQ", accuracy(qat_model, x_test, y_test)))
    if method is TrainingMethod.DQA:
        # The temperature reaches 0 after 70% of the QAT steps; the rest trains the b-bit quantizers alone.
        set_dqa_temperature_schedule(qat_model, temperature_schedule_for(args.epochs * -(-len(x_train) // BATCH)))
    train(qat_model, x_train, y_train, args.epochs, 1e-3, args.seed + 1, "QAT training", progress)
    print(accuracy_line("QAT", accuracy(qat_model, x_test, y_test)))

    output = Path(args.output) if args.output else Path(tempfile.mkdtemp(prefix="trainable_infra_demo_"))
    output.mkdir(parents=True, exist_ok=True)
    checkpoint = output / "qat_model.pt"
    torch.save(qat_model.state_dict(), checkpoint)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # no data needed: the checkpoint brings the parameters
        reloaded = quantize_model(float_cnn(), config)
    reloaded.load_state_dict(torch.load(checkpoint, weights_only=True))
    same = torch.equal(predict(reloaded, x_test), predict(qat_model, x_test))
    print(f"saved {checkpoint}; reloaded (weights_only) predictions identical: {same}")

    converted = convert_to_inferable(qat_model)
    converted_same = torch.equal(predict(converted, x_test), predict(qat_model, x_test))
    print(f"converted to mct-quantizers modules; predictions identical: {converted_same}")
    print(_deployment_line(converted, output / "model.onnx", x_test))

    print()
    quantization_report(qat_model, [(x_test, y_test)])
    print(f"\ndone in {time.perf_counter() - start:.1f} s")
    return 0 if same and converted_same else 1


def _deployment_line(model: nn.Module, path: Path, x: torch.Tensor) -> str:
    """Export to ONNX (QCDQ); say what a default onnxruntime session makes of it: size, latency, identical outputs."""
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime not installed: ONNX export not run"
    report = export_onnx(model, path, x)
    session = ort.InferenceSession(report.path, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    times = []
    for _ in range(7):
        begin = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - begin)
    return (f"exported {report.path} ({os.path.getsize(report.path) / 1024:.1f} KB, {report.format}); onnxruntime: "
            f"{1000 * float(np.median(times)):.2f} ms for {len(x)} images, identical logits "
            f"{100 * report.identical:.2f}%, identical predictions {100 * report.argmax_identical:.2f}%")
