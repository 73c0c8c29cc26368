"""Forward+backward time per element of each built-in PyTorch quantizer, beside torch's fused fake-quant op.

Each quantizer kind (STE / LSQ × symmetric / uniform, weights per-channel, activations per-tensor) runs in
training mode on tensors of 1M and 16M elements; the baseline is `torch.fake_quantize_per_tensor_affine` (or
`_per_channel_affine`) with a learnable-free backward on the same tensor. Times are medians of `--repeats` runs.

    python benchmarks/quantizer_kernels.py --sizes 1M 16M
    python benchmarks/quantizer_kernels.py --device cuda --triton off     # the torch path, for an A/B comparison

`--count-kernels` prints instead how many kernels one training forward and one backward of each quantizer
launch. On CUDA they are counted by torch.profiler; on the CPU the Triton path runs under Triton's interpreter
and every Triton launch and every torch op that is not a view or an allocation counts as one kernel (the kernels
the same calls launch on CUDA; torch's fused fake-quant ops have no CPU twin there, so count `--triton off` on
CUDA). With `--compiled` it counts the kernels of the quantizer under `torch.compile` (fullgraph): on CUDA by
torch.profiler, on the CPU in the code inductor generates for the graph CUDA compiles (the CPU-only opaque
straight-through gradient op switched off), its fused C++ kernels and external kernel calls; Triton's code may
split a reduction that the C++ code keeps in one loop.

    python benchmarks/quantizer_kernels.py --count-kernels --compiled
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from unittest import mock

import torch
from kernel_cases import CHANNELS, SIZES, quantizers
from torch import nn
from torch._inductor.utils import run_and_get_code

from trainable_infra import TrainingMethod
from trainable_infra.pytorch_backend import BasePytorchTrainableQuantizer
from trainable_infra.pytorch_backend.quantizers import fake_quant, triton_kernels


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
    parser.add_argument("--triton", choices=triton_kernels.MODES, default="auto",
                        help="the Triton path: auto (CUDA), off (torch ops), interpret (Triton's interpreter)")
    parser.add_argument("--count-kernels", action="store_true", help="count kernels per pass instead of timing")
    parser.add_argument("--compiled", action="store_true", help="with --count-kernels: under torch.compile")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.count_kernels:
        with triton_kernels.triton_mode(args.triton):
            count_kernels(args.device, args.compiled)
        return
    where = torch.cuda.get_device_name() if args.device != "cpu" else f"CPU, {args.threads} threads"
    print(f"torch {torch.__version__}, {where}; Triton path {args.triton}; ns per element, "
          "forward+backward, training mode")
    print(f"{'quantizer':44s} {'size':>5s} {'ours':>8s} {'fused op':>9s} {'ratio':>7s}")
    with triton_kernels.triton_mode(args.triton):
        for size_name in args.sizes:
            run_size(size_name, args)


class _OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the torch ops that launch a kernel (not views, not allocations)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        # scalar_tensor wraps a Python number (torch.where(mask, g, 0.0)) on the host: no kernel on CUDA.
        if not (func.is_view or name.startswith(("empty", "detach", "alias", "lift_fresh", "scalar_tensor"))):
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def interpreted_kernels(fn) -> list[str]:
    """The kernels `fn` launches on the path CUDA takes, by name, counted on the CPU: each Triton launch (run by
    the interpreter, prefixed `triton:`) and each other torch op that is not a view or an allocation."""
    launched: list[str] = []
    original = triton_kernels._launch

    def launch(kernel, *args, **kwargs):
        launched.append(f"triton:{kernel.fn.__name__}")
        with torch.utils._python_dispatch._disable_current_modes():
            original(kernel, *args, **kwargs)

    counter = _OpCounter()
    with mock.patch.object(triton_kernels, "_launch", launch), counter:
        fn()
    return launched + counter.ops


def _count(fn, device: str) -> tuple[int, list[str]]:
    """(kernels launched by `fn`, their names)."""
    if device != "cpu":
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        return len(names), names
    names = interpreted_kernels(fn)
    return len(names), names


def inductor_kernels(fn) -> list[list[str]]:
    """The kernels of each graph inductor compiles while `fn` runs (forward, then backward), read from its code:
    the fused kernels it generates and the external kernels it calls."""
    _, codes = run_and_get_code(fn)
    kernel = re.compile(r"\b(cpp_fused_\w+|triton_\w+\.run|extern_kernels\.\w+|torch\.ops\.\w+\.\w+)\(")
    return [kernel.findall(code[code.index("def call("):]) for code in codes]


def count_kernels(device: str, compiled: bool = False) -> None:
    """Print the kernels of one training forward and one backward of each quantizer kind."""
    mode = triton_kernels.mode()
    path = "torch.compile" if compiled else f"Triton path {mode}"
    print(f"torch {torch.__version__}, {device}, {path}: kernels per pass (forward / backward)")
    x0 = torch.randn(CHANNELS, 64, device=device) * 2
    grad = torch.randn_like(x0)
    for method in TrainingMethod:
        for kind, (quantizer, is_weight) in quantizers(method, BasePytorchTrainableQuantizer, 0).items():
            layer = nn.Module()
            quantizer.initialize_quantization(tuple(x0.shape) if is_weight else None, "t", layer)
            layer.to(device)
            x = x0.clone().requires_grad_()
            call = quantizer
            if compiled:
                torch._dynamo.reset()
                call = torch.compile(lambda x, training, q=quantizer: q(x, training), fullgraph=True)
            if compiled and device == "cpu":
                # The graph CUDA compiles: without the CPU's opaque straight-through gradient op.
                with mock.patch.object(fake_quant, "_opaque_ste_input_grad", None):
                    graphs = inductor_kernels(lambda c=call, x=x: c(x, True).backward(grad))
                forward_names, backward_names = graphs if len(graphs) == 2 else (graphs[0], [])
                forward, backward = len(forward_names), len(backward_names)
            else:
                call(x, True).backward(grad)  # warm up (compile the kernels)
                x.grad = None
                for parameter in layer.parameters():
                    parameter.grad = None  # counted: the gradients' kernels, not their accumulation into .grad
                holder = {}
                forward, forward_names = _count(lambda c=call, x=x, h=holder: h.update(out=c(x, True)), device)
                backward, backward_names = _count(lambda h=holder: h["out"].backward(grad), device)
            print(f"{method.name + ' ' + kind:44s} {forward:3d} / {backward:3d}   fwd: {', '.join(forward_names)}"
                  f" | bwd: {', '.join(backward_names)}")


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
