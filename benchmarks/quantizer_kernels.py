"""Forward+backward time per element of each built-in PyTorch quantizer, beside torch's fused fake-quant op.

Each quantizer kind (STE / LSQ × symmetric / uniform, weights per-channel, activations per-tensor) runs in
training mode on tensors of 1M and 16M elements; the baseline is `torch.fake_quantize_per_tensor_affine` (or
`_per_channel_affine`) with a learnable-free backward on the same tensor. Times are medians of `--repeats` runs.

    python benchmarks/quantizer_kernels.py --sizes 1M 16M
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from kernel_cases import CHANNELS, SIZES, quantizers
from torch import nn

from trainable_infra import TrainingMethod
from trainable_infra.pytorch_backend import BasePytorchTrainableQuantizer


def timed(fn, repeats: int, device: str) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["1M", "16M"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name() if args.device != "cpu" else f"CPU, {args.threads} threads"
    print(f"torch {torch.__version__}, {where}; ns per element, forward+backward, training mode")
    print(f"{'quantizer':44s} {'size':>5s} {'ours':>8s} {'fused op':>9s} {'ratio':>7s}")
    for size_name in args.sizes:
        run_size(size_name, args)


def run_size(size_name: str, args: argparse.Namespace) -> None:
    """Time every quantizer kind and the fused ops on one tensor size and print the rows."""
    n = SIZES[size_name]
    x = (torch.randn(CHANNELS, n // CHANNELS, device=args.device) * 2).requires_grad_()
    grad = torch.randn_like(x)
    scale = torch.full((CHANNELS,), 3.0 / 128, device=args.device)
    zero = torch.zeros(CHANNELS, dtype=torch.int32, device=args.device)

    def fused_per_channel():
        torch.fake_quantize_per_channel_affine(x, scale, zero, 0, -128, 127).backward(grad)

    def fused_per_tensor():
        torch.fake_quantize_per_tensor_affine(x, scale[:1], zero[:1], -128, 127).backward(grad)

    baselines = {True: timed(fused_per_channel, args.repeats, args.device),
                 False: timed(fused_per_tensor, args.repeats, args.device)}
    for method in TrainingMethod:
        for kind, (quantizer, is_weight) in quantizers(method, BasePytorchTrainableQuantizer, 0).items():
            layer = nn.Module()
            quantizer.initialize_quantization(tuple(x.shape) if is_weight else None, "t", layer)
            layer.to(args.device)

            def ours_step(q=quantizer):
                q(x, True).backward(grad)

            ours = timed(ours_step, args.repeats, args.device)
            base = baselines[is_weight]
            print(f"{method.name + ' ' + kind:44s} {size_name:>5s} {ours / n * 1e9:8.3f} {base / n * 1e9:9.3f}"
                  f" {ours / base:7.2f}x")


if __name__ == "__main__":
    main()
