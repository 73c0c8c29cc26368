"""Every GPU row of docs/performance.md in one process: QAT step time relative to the float step on CUDA.

For ResNet-18 (batch 128, 224x224) and `cnn7` (batch 64, 32x32): the float model, our W8A8 QAT model with STE and
with LSQ (per-channel weights), each with the fused Triton kernels and with them switched off (the decomposed
ops of before, for the before/after columns), and torch.ao QAT (eager-mode fusion for `cnn7`, FX graph mode for
ResNet-18, the x86 QAT qconfig), are timed with interleaved steps; then the float, STE and LSQ models compiled with
`torch.compile`. Prints one line per model with the median step time and the ratio to the float step of its group.
Installs nothing; meant to finish in under five minutes on one H200.

    python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --models cnn7 --no-compile
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_overhead import float_cnn, resnet18, torch_ao_qat

SETTINGS = {"resnet18": (128, 224), "cnn7": (64, 32)}


def torch_ao_fx_qat(model, example):
    """`model` under torch.ao FX graph mode QAT (it fuses Conv-BN(-ReLU) itself), x86 QAT qconfig."""
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    return prepare_qat_fx(copy.deepcopy(model).train(), get_default_qat_qconfig_mapping("x86"), (example,))


def fused_kernels(enabled: bool) -> contextlib.AbstractContextManager[None]:
    """Run with the quantizers' Triton kernels on ("auto": eager CUDA calls) or off (the decomposed torch ops)."""
    from trainable_infra.pytorch_backend.quantizers import triton_kernels

    return triton_kernels.triton_mode("auto" if enabled else "off")


def make_step(model, x, y, fused: bool | None) -> Callable[[], None]:
    """One SGD step of `model` on (x, y), with the Triton kernels on, off, or as they are (None)."""
    import torch
    from torch import nn

    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()

    def step() -> None:
        with fused_kernels(fused) if fused is not None else contextlib.nullcontext():
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        if x.is_cuda:
            torch.cuda.synchronize()

    return step


def time_group(steps: dict[str, Callable[[], None]], warmup: int, count: int) -> dict[str, float]:
    """Median milliseconds per step of each entry, steps interleaved."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(warmup + count):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if i >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def gpu_busy(step: Callable[[], None], steps: int = 3) -> tuple[float, float]:
    """(milliseconds the GPU spends in kernels, kernels launched) per step: a step whose wall time is well above
    its kernel time waits on the CPU (Python and kernel launches), not on the GPU."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.device_time for e in kernels) / 1e3 / steps, len(kernels) / steps


def report(title: str, medians: dict[str, float]) -> None:
    base = medians["float"]
    print(title, flush=True)
    for name, median in medians.items():
        print(f"  {name:28s} {median:9.2f} ms/step   {median / base:.3f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(SETTINGS), default=["resnet18", "cnn7"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="eager rows only")
    parser.add_argument("--profile", action="store_true", help="also the GPU's kernel time and launches per step")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu to try the script's plumbing")
    args = parser.parse_args()

    import torch

    from trainable_infra import QATConfig, TrainingMethod
    from trainable_infra.pytorch_backend import quantize_model

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check.py needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    from trainable_infra.pytorch_backend.quantizers import triton_kernels

    kernels = triton_kernels.available()
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {where}, TF32 allowed, W8A8 per-channel weights, "
          f"median of {args.steps} interleaved steps after {args.warmup}; Triton kernels "
          f"{'available' if kernels else 'NOT available'}", flush=True)
    built = {}
    for name in args.models:
        batch, size = SETTINGS[name]
        torch.manual_seed(0)
        float_model = (resnet18() if name == "resnet18" else float_cnn()).to(device)
        x = torch.randn(batch, 3, size, size, device=device)
        y = torch.randint(0, 10, (batch,), device=device)
        qat = {
            method: quantize_model(float_model, QATConfig(weight_training_method=TrainingMethod[method],
                                                          activation_training_method=TrainingMethod[method]),
                                   [x[:8]], progress=False)
            for method in ("STE", "LSQ")
        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ao = torch_ao_qat(float_model) if name == "cnn7" else torch_ao_fx_qat(float_model, x[:8])
        built[name] = (float_model, qat, ao.to(device), x, y)
        steps = {
            "float": make_step(float_model, x, y, None),
            "STE, fused kernels": make_step(qat["STE"], x, y, True),
            "LSQ, fused kernels": make_step(qat["LSQ"], x, y, True),
            "STE, decomposed": make_step(qat["STE"], x, y, False),
            "LSQ, decomposed": make_step(qat["LSQ"], x, y, False),
            "torch.ao QAT": make_step(ao, x, y, None),
        }
        report(f"{name}, batch {batch}, {size}x{size}, eager", time_group(steps, args.warmup, args.steps))
        if args.profile:
            for label, step in steps.items():
                busy, launched = gpu_busy(step)
                print(f"  {label:28s} GPU busy {busy:7.2f} ms/step, {launched:6.0f} kernels/step", flush=True)
    if args.no_compile:
        return
    for name in args.models:
        float_model, qat, _, x, y = built[name]
        start = time.perf_counter()
        steps = {
            "float": make_step(torch.compile(float_model), x, y, None),
            "STE, fused kernels": make_step(torch.compile(qat["STE"]), x, y, True),
            "LSQ, fused kernels": make_step(torch.compile(qat["LSQ"]), x, y, True),
        }
        for step in steps.values():
            step()  # compile outside the timed steps
        medians = time_group(steps, args.warmup, args.steps)
        report(f"{name}, compiled (compilation {time.perf_counter() - start:.0f} s)", medians)


if __name__ == "__main__":
    main()
