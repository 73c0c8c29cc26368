"""What the runtime computes against what was trained: the share of identical logits and predictions.

Each model is trained in float on scikit-learn's digits, quantized (`quantize_model`, BatchNorm folded, int32
biases), trained a few QAT epochs, converted and exported; the exported file then runs the digits test set in
the runtime users deploy on and is compared with the converted model (which equals the QAT model in eval, bit
for bit). PyTorch: ONNX (QCDQ) in a default `onnxruntime.InferenceSession`. Models: the demo CNN and the
ResNet-style and MobileNetV2-style models of the test zoo (tests/pytorch_backend/zoo.py). Keras
(`--backend keras`): the full-integer TFLite file of `export_tflite` in the TFLite interpreter (default delegate),
the demo CNN and the ResNet-style and MobileNet-style models of tests/keras_backend/zoo.py; the last column says
whether every quantized layer runs on an int8 kernel.

    python benchmarks/fidelity.py
    python benchmarks/fidelity.py --bits 8/8 4/8 4/4 2/4 --qat-epochs 2
    python benchmarks/fidelity.py --backend keras
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def torch_rows(bits: list[tuple[int, int]], float_epochs: int, qat_epochs: int, seed: int) -> list[tuple]:
    import torch
    from torch import nn

    from tests.pytorch_backend.zoo import TinyMobileNet, TinyResNet
    from trainable_infra import QATConfig
    from trainable_infra.common.digits import load_digits_split
    from trainable_infra.pytorch_backend import convert_to_inferable, export_onnx, quantize_model
    from trainable_infra.pytorch_backend.demo import float_cnn

    x_train, y_train, x_test, y_test = (torch.from_numpy(a) for a in load_digits_split(seed=seed))
    x_train, x_test = x_train.unsqueeze(1), x_test.unsqueeze(1)

    def train(model: nn.Module, epochs: int, lr: float) -> None:
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        generator = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(x_train), generator=generator)
            for i in range(0, len(x_train), 32):
                batch = order[i:i + 32]
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x_train[batch]), y_train[batch]).backward()
                optimizer.step()
        model.eval()

    rows = []
    directory = Path(tempfile.mkdtemp(prefix="fidelity_"))
    for name, architecture in (("demo CNN", float_cnn), ("ResNet-style", TinyResNet),
                               ("MobileNetV2-style", TinyMobileNet)):
        torch.manual_seed(seed)
        float_model = architecture()
        train(float_model, float_epochs, 3e-3)
        for w_bits, a_bits in bits:
            config = QATConfig(weight_n_bits=w_bits, activation_n_bits=a_bits)
            qat = quantize_model(float_model, config, [x_train[:256]], progress=False)
            train(qat, qat_epochs, 1e-3)
            converted = convert_to_inferable(qat)
            with torch.no_grad():
                accuracy = float((converted(x_test).argmax(1) == y_test).float().mean())
            report = export_onnx(converted, directory / "model.onnx", x_test)
            rows.append((name, f"W{w_bits}A{a_bits}", "onnxruntime (QCDQ, default session)", report.identical,
                         report.argmax_identical, accuracy))
    return rows


def keras_rows(bits: list[tuple[int, int]], float_epochs: int, qat_epochs: int, seed: int) -> list[tuple]:
    import keras

    from tests.keras_backend.zoo import tiny_mobilenet, tiny_resnet
    from trainable_infra import QATConfig
    from trainable_infra.common.digits import load_digits_split
    from trainable_infra.keras_backend import convert_to_inferable, export_tflite, quantize_model
    from trainable_infra.keras_backend.demo import accuracy, float_cnn, train
    from trainable_infra.keras_backend.export import tflite_kernels
    from trainable_infra.keras_backend.inferable_wrappers import KerasInferableQuantizationWrapper

    x_train, y_train, x_test, y_test = load_digits_split(seed=seed)
    x_train, x_test = x_train[..., None], x_test[..., None]
    kernels = {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"}
    rows = []
    directory = Path(tempfile.mkdtemp(prefix="fidelity_keras_"))
    for name, architecture in (("demo CNN", float_cnn), ("ResNet-style", tiny_resnet),
                               ("MobileNet-style", tiny_mobilenet)):
        keras.utils.set_random_seed(seed)
        float_model = architecture()
        train(float_model, x_train, y_train, float_epochs, 3e-3, name, False)
        for w_bits, a_bits in bits:
            keras.utils.set_random_seed(seed)
            config = QATConfig(weight_n_bits=w_bits, activation_n_bits=a_bits)
            qat = quantize_model(float_model, config, x_train[:256], progress=False)
            train(qat, x_train, y_train, qat_epochs, 1e-3, name, False)
            converted = convert_to_inferable(qat)
            report = export_tflite(converted, directory / "model.tflite", x_test)
            found = tflite_kernels(report)
            quantized = sum(isinstance(layer, KerasInferableQuantizationWrapper) for layer in converted.layers)
            int8 = sum(1 for op, dtype in found if op in kernels and dtype == "int8")
            float_kernels = sum(1 for op, dtype in found if op in kernels and dtype == "float32")
            note = "yes" if not float_kernels and int8 >= quantized else f"no ({float_kernels} float kernels)"
            rows.append((name, f"W{w_bits}A{a_bits}", "TFLite interpreter (full integer)", report.identical,
                         report.argmax_identical, accuracy(converted, x_test, y_test), note))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", nargs="+", default=["8/8", "4/8", "4/4"], help="weight/activation bits")
    parser.add_argument("--float-epochs", type=int, default=10)
    parser.add_argument("--qat-epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", choices=["pytorch", "keras"], default="pytorch")
    args = parser.parse_args()
    bits = [tuple(int(b) for b in pair.split("/")) for pair in args.bits]
    warnings.simplefilter("ignore")
    if args.backend == "keras":
        rows = keras_rows(bits, args.float_epochs, args.qat_epochs, args.seed)
        print("| model | bits | runtime | identical logits | identical predictions | QAT test accuracy | "
              "int8 kernels |")
        print("|---|---|---|---|---|---|---|")
        for name, bits_name, runtime, identical, argmax, accuracy, note in rows:
            print(f"| {name} | {bits_name} | {runtime} | {100 * identical:.2f}% | {100 * argmax:.2f}% | "
                  f"{100 * accuracy:.2f}% | {note} |")
        return
    rows = torch_rows(bits, args.float_epochs, args.qat_epochs, args.seed)
    print("| model | bits | runtime | identical logits | identical predictions | QAT test accuracy |")
    print("|---|---|---|---|---|---|")
    for name, bits_name, runtime, identical, argmax, accuracy in rows:
        print(f"| {name} | {bits_name} | {runtime} | {100 * identical:.2f}% | {100 * argmax:.2f}% | "
              f"{100 * accuracy:.2f}% |")


if __name__ == "__main__":
    main()
