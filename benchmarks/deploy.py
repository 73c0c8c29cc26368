"""Deployed ONNX files side by side: float, onnxruntime's `quantize_static` int8, and this library's QCDQ export.

The model is the ResNet-18 of benchmarks/step_overhead.py (random weights, BatchNorm statistics set away from
their initial values), 224x224x3 inputs. Each file runs in a default `onnxruntime.InferenceSession` (all graph
optimizations, so QDQ files run as QLinearConv / QGemm) with `--threads` intra-op threads; the table gives the
file size, the median latency of one batch, the integer kernels onnxruntime formed and, for the quantized files,
the share of logits identical to the converted PyTorch model (for `quantize_static`, to the float model's
argmax only: it was not trained, its grid is its own).

    python benchmarks/deploy.py                      # W8A8, batch 8, 2 threads
    python benchmarks/deploy.py --weight-bits 4 --runs 10

Keras (`--backend keras`): the same ResNet-18 written in Keras (random weights, BatchNorm statistics set the same
way), as a float TFLite file (TFLiteConverter, no optimization) and as this library's full-integer TFLite file
(`export_tflite`), each run by the TFLite interpreter export_tflite checks with (default delegate) with
`--threads` threads; the table gives the file size, the median latency of one batch, the operators of the file
and the share of logits identical to the converted Keras model.

    python benchmarks/deploy.py --backend keras
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


def keras_resnet18(size: int, seed: int):
    """ResNet-18 in Keras 3 (basic blocks, 1x1 projection shortcuts), BatchNorm statistics and affine parameters
    of a trained-looking model."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)

    def conv_bn(x, filters, kernel, stride, name, relu=True):
        x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=name)(x)
        x = layers.BatchNormalization(epsilon=1e-5, name=f"{name}_bn")(x)
        return layers.ReLU(name=f"{name}_relu")(x) if relu else x

    inputs = keras.Input((size, size, 3), name="input_0")
    x = conv_bn(inputs, 64, 7, 2, "stem")
    x = layers.MaxPooling2D(3, 2, padding="same", name="stem_pool")(x)
    for stage, channels in enumerate((64, 128, 256, 512)):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            name = f"layer{stage + 1}_{block}"
            y = conv_bn(x, channels, 3, stride, f"{name}_conv1")
            y = conv_bn(y, channels, 3, 1, f"{name}_conv2", relu=False)
            shortcut = conv_bn(x, channels, 1, stride, f"{name}_down", relu=False) if stride != 1 else x
            x = layers.ReLU(name=f"{name}_out")(layers.Add(name=f"{name}_add")([y, shortcut]))
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    model = keras.Model(inputs, layers.Dense(1000, name="fc")(x), name="resnet18")
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.uniform(-0.1, 0.1, n).astype(np.float32))
            layer.moving_variance.assign(rng.uniform(0.5, 1.5, n).astype(np.float32))
            layer.gamma.assign(rng.uniform(0.3, 0.8, n).astype(np.float32))
            layer.beta.assign(rng.uniform(-0.1, 0.1, n).astype(np.float32))
    return model


def keras_main(args: argparse.Namespace) -> None:
    import keras
    import tensorflow as tf

    from trainable_infra import QATConfig
    from trainable_infra.keras_backend import convert_to_inferable, export_tflite, quantize_model
    from trainable_infra.keras_backend.export import tflite_interpreter, tflite_kernels

    rng = np.random.default_rng(args.seed)
    shape = (args.batch, args.size, args.size, 3)
    calibration = [rng.random(shape, dtype=np.float32) for _ in range(args.calibration_batches)]
    x = rng.random(shape, dtype=np.float32)
    model = keras_resnet18(args.size, args.seed)
    directory = Path(tempfile.mkdtemp(prefix="deploy_benchmark_keras_"))

    float_path = str(directory / "float.tflite")
    with tempfile.TemporaryDirectory() as saved_model:
        model.export(saved_model, format="tf_saved_model", verbose=False)
        Path(float_path).write_bytes(tf.lite.TFLiteConverter.from_saved_model(saved_model).convert())
    config = QATConfig(weight_n_bits=args.weight_bits, activation_n_bits=args.activation_bits)
    converted = convert_to_inferable(quantize_model(model, config, calibration, progress=False))
    ours_path = str(directory / "int8.tflite")
    report = export_tflite(converted, ours_path, x)
    converted_logits = keras.ops.convert_to_numpy(converted(x, training=False))
    float_logits = keras.ops.convert_to_numpy(model(x, training=False))

    rows = []
    for name, path in (("float TFLite", float_path),
                       (f"trainable-infra int8 TFLite W{args.weight_bits}A{args.activation_bits}", ours_path)):
        interpreter = tflite_interpreter(path, num_threads=args.threads)
        interpreter.resize_tensor_input(interpreter.get_input_details()[0]["index"], shape)
        interpreter.allocate_tensors()
        index = interpreter.get_input_details()[0]["index"]
        output = interpreter.get_output_details()[0]["index"]
        interpreter.set_tensor(index, x)
        for _ in range(2):
            interpreter.invoke()
        times = []
        for _ in range(args.runs):
            begin = time.perf_counter()
            interpreter.invoke()
            times.append(time.perf_counter() - begin)
        logits = interpreter.get_tensor(output)
        ops = [f"{op} {dtype}" for op, dtype in tflite_kernels(path) if op in ("CONV_2D", "FULLY_CONNECTED", "ADD")]
        counts = ", ".join(f"{op} {ops.count(op)}" for op in sorted(set(ops)))
        if path == ours_path:
            fidelity = f"{100 * np.mean(logits == converted_logits):.2f}% identical logits"
        else:
            agree = np.mean(logits.argmax(1) == float_logits.argmax(1))
            fidelity = f"argmax = Keras float model's on {100 * agree:.0f}%"
        rows.append((name, os.path.getsize(path) / 2**20, 1000 * statistics.median(times), counts, fidelity))
    float_size, float_ms = rows[0][1], rows[0][2]
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}; ResNet-18 {args.size}x{args.size}, batch "
          f"{args.batch}, {args.threads} threads, median of {args.runs}; {report.runtime}, export identical "
          f"{100 * report.identical:.2f}%")
    print("| file | size (MiB) | vs float | latency (ms) | vs float | kernels | fidelity |")
    print("|---|---|---|---|---|---|---|")
    for name, size, ms, ops, fidelity in rows:
        print(f"| {name} | {size:.2f} | {size / float_size:.2f}x | {ms:.1f} | {ms / float_ms:.2f}x | {ops} | "
              f"{fidelity} |")


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
    parser.add_argument("--backend", choices=["pytorch", "keras"], default="pytorch")
    args = parser.parse_args()
    if args.backend == "keras":
        keras_main(args)
        return

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
