"""Training-step time of a QAT model relative to its float model, in one process.

PyTorch (`--backend torch`, the default): the float model and its QAT copy from `quantize_model` (W8A8,
per-channel weights, STE or LSQ) train with SGD on random data; their steps are interleaved after a warm-up and
the median of each is reported, with the ratio. `--torch-ao` adds the same model under torch.ao eager QAT
(fused Conv-BN-ReLU, default x86 QAT qconfig) for comparison.

Models: `cnn7` — convolutions 3→32→32→64→64→128→128 with BatchNorm and ReLU, a linear classifier, 32x32x3 inputs;
`resnet18` — a torchvision-style ResNet-18 written here, 224x224x3 inputs.

`--backend keras` runs benchmarks/keras_step_overhead.py (model.fit) with the same method.

    python benchmarks/step_overhead.py --method STE --steps 30 --torch-ao
    python benchmarks/step_overhead.py --device cuda --model resnet18 --batch 128 --compile
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

WIDTHS = (32, 32, 64, 64, 128, 128)


def float_cnn():
    """The float 7-layer CNN."""
    from torch import nn

    layers: list[nn.Module] = []
    channels = 3
    for i, width in enumerate(WIDTHS):
        layers += [nn.Conv2d(channels, width, 3, padding=1, stride=2 if i in (2, 4) else 1), nn.BatchNorm2d(width),
                   nn.ReLU()]
        channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10)]
    return nn.Sequential(*layers)


def resnet18(classes: int = 1000):
    """A torchvision-style ResNet-18 (basic blocks [2, 2, 2, 2])."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, inputs: int, outputs: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(outputs)
            self.relu = nn.ReLU()
            self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(outputs)
            self.downsample = (
                nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs))
                if stride != 1 or inputs != outputs else nn.Identity()
            )
            self.relu_out = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
            return self.relu_out(y + self.downsample(x))

    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    channels = 64
    for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [Block(channels, width, stride), Block(width, width, 1)]
        channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes)]
    return nn.Sequential(*layers)


def torch_ao_qat(model):
    """`model` (a Sequential of Conv-BN-ReLU triples) under torch.ao eager-mode QAT."""
    from torch import nn
    from torch.ao import quantization as tq

    model = copy.deepcopy(model).train()
    groups = [[str(i), str(i + 1), str(i + 2)] for i in range(len(model) - 2)
              if isinstance(model[i], nn.Conv2d) and isinstance(model[i + 2], nn.ReLU)]
    model = tq.fuse_modules_qat(model, groups)
    wrapped = nn.Sequential(tq.QuantStub(), model, tq.DeQuantStub())
    wrapped.qconfig = tq.get_default_qat_qconfig("x86")
    return tq.prepare_qat(wrapped.train())


def run_torch(args: argparse.Namespace) -> None:
    import torch
    from torch import nn

    from trainable_infra import QATConfig, TrainingMethod
    from trainable_infra.pytorch_backend import quantize_model

    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    size = 224 if args.model == "resnet18" else 32
    float_model = (resnet18() if args.model == "resnet18" else float_cnn()).to(args.device)
    x = torch.randn(args.batch, 3, size, size, device=args.device)
    if args.channels_last:
        float_model = float_model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,), device=args.device)
    method = TrainingMethod[args.method]
    config = QATConfig(weight_training_method=method, activation_training_method=method)
    models = {"float": float_model, "qat": quantize_model(float_model, config, [x[:8]], progress=False)}
    if args.torch_ao:
        if args.model != "cnn7":
            sys.exit("--torch-ao supports --model cnn7 (a plain Sequential to fuse)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            models["torch.ao"] = torch_ao_qat(float_model).to(args.device)
    if args.compile:
        models = {name: torch.compile(model) for name, model in models.items()}

    def make_step(model: nn.Module):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        model.train()

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            if x.is_cuda:
                torch.cuda.synchronize()

        return step

    steps = {name: make_step(model) for name, model in models.items()}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(args.warmup + args.steps):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if i >= args.warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {args.threads} threads"
    print(f"torch {torch.__version__}, {where}, {args.model}, batch {args.batch}, W8A8 {args.method}"
          f"{', compiled' if args.compile else ', eager'}{', channels-last' if args.channels_last else ''}, "
          f"median of {args.steps} interleaved steps")
    base = statistics.median(times["float"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:9s} {median:9.2f} ms/step   {median / base:.3f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["torch", "keras"], default="torch")
    parser.add_argument("--method", choices=["STE", "LSQ"], default="STE")
    parser.add_argument("--model", choices=["cnn7", "resnet18"], default="cnn7")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model")
    parser.add_argument("--torch-ao", action="store_true", help="also time torch.ao eager QAT (cnn7)")
    parser.add_argument("--channels-last", action="store_true", help="models and input in channels-last memory format")
    args = parser.parse_args()
    if args.steps < 15:
        parser.error("--steps must be at least 15 for a meaningful median")
    if args.backend == "keras":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import keras_step_overhead

        sys.argv = [sys.argv[0], "--method", args.method, "--batch", str(args.batch)]
        keras_step_overhead.main()
        return
    run_torch(args)


if __name__ == "__main__":
    main()
