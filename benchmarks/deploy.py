"""Deployed ONNX files side by side: float, onnxruntime's `quantize_static` int8, and this library's QCDQ export.

The model is the ResNet-18 of benchmarks/step_overhead.py (random weights, BatchNorm statistics set away from
their initial values), 224x224x3 inputs. Each file runs in a default `onnxruntime.InferenceSession` (all graph
optimizations, so QDQ files run as QLinearConv / QGemm) with `--threads` intra-op threads; the table gives the
file size, the median latency of one batch, the integer kernels onnxruntime formed and, for the quantized files,
the share of logits identical to the converted PyTorch model (for `quantize_static`, to the float model's
argmax only: it was not trained, its grid is its own).

    python benchmarks/deploy.py                      # W8A8, batch 8, 2 threads
    python benchmarks/deploy.py --weight-bits 4 --runs 10
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def float_model(seed: int):
    """ResNet-18 with BatchNorm statistics and affine parameters of a trained-looking model, in eval mode."""
    import torch
    from step_overhead import resnet18

    torch.manual_seed(seed)
    model = resnet18()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.3, 0.8)
            module.bias.data.uniform_(-0.1, 0.1)
    return model.eval()


def session(path: str, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.optimized_model_filepath = path + ".optimized.onnx"
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def kernels(path: str) -> str:
    """The integer kernels in onnxruntime's optimized graph of `path`, with counts."""
    import onnx

    ops = [node.op_type for node in onnx.load(path + ".optimized.onnx").graph.node]
    found = {op: ops.count(op) for op in sorted(set(ops)) if op.startswith("QLinear") or op in ("QGemm",)}
    floats = {op: ops.count(op) for op in ("Conv", "FusedConv", "Gemm", "FusedGemm") if op in ops}
    text = ", ".join(f"{op} {n}" for op, n in found.items()) or "none"
    return text + ("; float " + ", ".join(f"{op} {n}" for op, n in floats.items()) if floats else "")


def latency(sess, x: np.ndarray, runs: int) -> float:
    """Median milliseconds of one batch, after two warm-up runs."""
    feed = {sess.get_inputs()[0].name: x}
    for _ in range(2):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        begin = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - begin)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--weight-bits", type=int, default=8)
    parser.add_argument("--activation-bits", type=int, default=8)
    parser.add_argument("--calibration-batches", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from trainable_infra import QATConfig
    from trainable_infra.pytorch_backend import convert_to_inferable, export_onnx, quantize_model

    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)
    shape = (args.batch, 3, args.size, args.size)
    calibration = [torch.rand(shape, generator=generator) for _ in range(args.calibration_batches)]
    x = torch.rand(shape, generator=generator)
    model = float_model(args.seed)
    directory = Path(tempfile.mkdtemp(prefix="deploy_benchmark_"))

    float_path = str(directory / "float.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), float_path, input_names=["input_0"], output_names=["output"],
                          dynamic_axes={"input_0": {0: "batch"}, "output": {0: "batch"}}, opset_version=15,
                          dynamo=False)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calibration)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"input_0": batch.numpy()}

    static_path = str(directory / "quantize_static.onnx")
    quantize_static(float_path, static_path, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)

    config = QATConfig(weight_n_bits=args.weight_bits, activation_n_bits=args.activation_bits)
    qat = quantize_model(model, config, calibration, progress=False)
    converted = convert_to_inferable(qat)
    ours_path = str(directory / "qcdq.onnx")
    report = export_onnx(converted, ours_path, x[:1])
    with torch.no_grad():
        float_logits, converted_logits = model(x).numpy(), converted(x).numpy()

    rows = []
    for name, path in (("float", float_path), ("quantize_static int8", static_path),
                       (f"trainable-infra QCDQ W{args.weight_bits}A{args.activation_bits}", ours_path)):
        sess = session(path, args.threads)
        (logits,) = sess.run(None, {"input_0": x.numpy()})
        if path == ours_path:
            fidelity = f"{100 * np.mean(logits == converted_logits):.2f}% identical logits"
        else:
            agree = np.mean(logits.argmax(1) == float_logits.argmax(1))
            fidelity = f"argmax = float model's on {100 * agree:.0f}%"
        rows.append((name, os.path.getsize(path) / 2**20, latency(sess, x.numpy(), args.runs), kernels(path),
                     fidelity))
    static_size, static_ms = rows[1][1], rows[1][2]
    print(f"onnxruntime {ort.__version__}, torch {torch.__version__}; ResNet-18 {args.size}x{args.size}, batch "
          f"{args.batch}, {args.threads} threads, median of {args.runs}; export max |diff| {report.max_abs_diff:.3g}")
    print("| file | size (MiB) | vs quantize_static | latency (ms) | vs quantize_static | onnxruntime kernels | "
          "fidelity |")
    print("|---|---|---|---|---|---|---|")
    for name, size, ms, ops, fidelity in rows:
        print(f"| {name} | {size:.2f} | {size / static_size:.2f}x | {ms:.1f} | {ms / static_ms:.2f}x | {ops} | "
              f"{fidelity} |")


if __name__ == "__main__":
    main()
