"""keras.applications architectures through the QAT life cycle (W4A8 by default).

Each model is built with random weights (`weights=None`, 10 classes) and run through these stages, timed:

- quantize: `quantize_model` with `--calib-batches` batches of random images as representative data;
- train: two `fit` steps (Adam) on random labels, the training step traced as `fit` traces it;
- eval-deterministic: two `model(x, training=False)` calls give identical outputs;
- convert-exact: `convert_to_inferable`'s output equals the QAT model's eval output bit for bit;
- reload-identical: the QAT model and the converted one, saved as `.keras` and loaded in a fresh Python process in
  safe mode without custom_objects (`keras_load_quantized_model`, `keras.models.load_model`), give the QAT model's
  eval output bit for bit;
- export: `export_tflite` writes a full-integer file that the TFLite interpreter runs; the note gives the share of
  output values it reproduces and of rows with the same argmax (the models end in a softmax, whose output the
  TFLite converter stores as int8 on a grid of 1/256, where the Keras model keeps it in float unless a holder
  follows it);
- merges held: additions and concatenations (layers, and `a + b` / `keras.ops` forms between two tensors) followed
  by an activation holder, directly or after an activation layer, of all of them.

    python benchmarks/model_zoo_keras.py                                      # every model below
    python benchmarks/model_zoo_keras.py --models ConvNeXtTiny,MobileNetV3Small --input-size 64

Inputs are `--input-size` pixels square (default 96), raised to the smallest size a model accepts (Xception 71,
InceptionV3 75, the others 32).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
import warnings
from pathlib import Path

import numpy as np

MODELS = [
    "MobileNetV2", "ResNet50", "EfficientNetB0", "DenseNet121", "NASNetMobile", "Xception", "InceptionV3", "VGG16",
    "MobileNetV3Small", "ConvNeXtTiny",
]
MIN_SIZE = {"Xception": 71, "InceptionV3": 75}
STAGES = ["quantize", "train", "eval-deterministic", "convert-exact", "reload-identical", "export"]
CLASSES = 10

# Loads each `.keras` file in a new interpreter, as a deployment would: nothing of this process is registered there.
_FRESH_PROCESS = """
import importlib
import os
import sys
import numpy as np
import keras
from trainable_infra.keras_backend import keras_load_quantized_model

# The test zoo's own layers (LayerScale, RelativePositionBias) register themselves when their module is imported.
for module in filter(None, os.environ.get("ZOO_MODULES", "").split(",")):
    sys.path.insert(0, os.environ["ZOO_ROOT"])
    importlib.import_module(module)

x = np.load(sys.argv[1])
for path in sys.argv[2:]:
    loader = keras_load_quantized_model if path.endswith("qat.keras") else keras.models.load_model
    model = loader(path)  # safe mode, no custom_objects
    np.save(path + ".npy", keras.ops.convert_to_numpy(model(x, training=False)))
"""


class Result:
    """Per-stage outcome ("pass" or "FAIL"), seconds and a note."""

    def __init__(self, name: str, size: int):
        self.name, self.size = name, size
        self.stages: dict[str, tuple[str, float, str]] = {}
        self.merges = "-"
        self.share = "-"
        self.errors: list[str] = []

    def record(self, stage: str, ok: bool, seconds: float, note: str = "") -> None:
        self.stages[stage] = ("pass" if ok else "FAIL", seconds, note)

    def fail(self, stage: str, seconds: float, exc: BaseException) -> None:
        self.stages[stage] = ("FAIL", seconds, type(exc).__name__)
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        self.errors.append(f"{self.name} / {stage}: {type(exc).__name__}: {first_line}")

    def cell(self, stage: str) -> str:
        if stage not in self.stages:
            return "skip"
        status, seconds, note = self.stages[stage]
        return f"{status} {seconds:.1f}s" + (f" ({note})" if note else "")


def differing(a: np.ndarray, b: np.ndarray) -> str:
    """The share of differing values of two arrays, as text."""
    if a.shape != b.shape:
        return f"shapes {a.shape} vs {b.shape}"
    return f"{np.mean(a != b):.1%} differ, max |diff| {np.max(np.abs(a - b)):.3g}"


def merges_held(model) -> tuple[int, int]:
    """(held, total): merges of `model` (Add / Concatenate layers, and `keras.ops` additions and concatenations of
    two or more tensors) whose output an activation holder reads, directly or after an activation layer."""
    import keras
    from keras.src.ops.numpy import Add, Concatenate

    from trainable_infra.keras_backend import KerasActivationQuantizationHolder

    readers: dict[int, list] = {}
    for op in model.operations:
        for node in op._inbound_nodes:
            for tensor in node.input_tensors:
                readers.setdefault(id(tensor), []).append(op)

    def held(tensor, depth: int = 0) -> bool:
        found = readers.get(id(tensor), [])
        if any(isinstance(op, KerasActivationQuantizationHolder) for op in found):
            return True
        activations = (keras.layers.Activation, keras.layers.ReLU)
        return depth == 0 and len(found) == 1 and isinstance(found[0], activations) and held(
            found[0]._inbound_nodes[0].output_tensors[0], 1)

    total = count = 0
    for op in model.operations:
        node = op._inbound_nodes[0] if op._inbound_nodes else None
        merge_layer = isinstance(op, (keras.layers.Add, keras.layers.Concatenate))
        merge_op = isinstance(op, (Add, Concatenate)) and node is not None and len(node.input_tensors) >= 2
        if merge_layer or merge_op:
            total += 1
            count += held(node.output_tensors[0])
    return count, total


def zoo_builders() -> dict:
    """{name: builder} of the test zoo's blocks (the CNN zoo and the transformer blocks)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.keras_backend.zoo import ZOO
    from tests.keras_backend.zoo_attention import tiny_swin, tiny_vit

    return {**ZOO, "vit": tiny_vit, "swin": tiny_swin}


def run_model(name: str, size: int, args: argparse.Namespace, workdir: Path) -> Result:
    import keras

    from trainable_infra import QATConfig
    from trainable_infra.keras_backend import convert_to_inferable, export_tflite, quantization_coverage, quantize_model

    result = Result(name, size)
    config = QATConfig(weight_n_bits=args.weight_bits, activation_n_bits=args.activation_bits)
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    if name.startswith("zoo:"):
        # The test zoo's small re-implementations (tests/keras_backend/zoo*.py), with their own input shapes.
        float_model = zoo_builders()[name.removeprefix("zoo:")]()
        shape = tuple(float_model.inputs[0].shape[1:])
        images = rng.normal(size=(args.batch * max(args.calib_batches, 2), *shape)).astype(np.float32)
    else:
        float_model = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3), classes=CLASSES)
        # Pixel values in [0, 255], as the models with a preprocessing layer expect them.
        images = rng.uniform(0, 255, size=(args.batch * max(args.calib_batches, 2), size, size, 3)).astype(np.float32)
    labels = rng.integers(0, CLASSES, len(images))
    calibration = [images[i * args.batch:(i + 1) * args.batch] for i in range(args.calib_batches)]
    x = images[:args.batch]

    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qat = quantize_model(float_model, config, calibration, progress=False)
    except Exception as exc:
        result.fail("quantize", time.perf_counter() - start, exc)
        return result
    result.record("quantize", True, time.perf_counter() - start)
    held, total = merges_held(qat)
    result.merges = f"{held}/{total}"
    coverage = quantization_coverage(qat, x)
    result.share = f"{coverage.quantized_share:.2%}"

    start = time.perf_counter()
    try:
        qat.compile(optimizer=keras.optimizers.Adam(1e-4),
                    # keras.applications end in a softmax; the zoo's blocks give logits
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=name.startswith("zoo:")))
        history = qat.fit(images[:2 * args.batch], labels[:2 * args.batch], batch_size=args.batch, epochs=1,
                          shuffle=False, verbose=0)
        loss = history.history["loss"][0]
        result.record("train", bool(np.isfinite(loss)), time.perf_counter() - start, f"loss {loss:.3g}")
    except Exception as exc:
        result.fail("train", time.perf_counter() - start, exc)

    start = time.perf_counter()
    expected = keras.ops.convert_to_numpy(qat(x, training=False))
    again = keras.ops.convert_to_numpy(qat(x, training=False))
    same = np.array_equal(expected, again)
    result.record("eval-deterministic", same, time.perf_counter() - start, "" if same else differing(expected, again))

    start = time.perf_counter()
    converted = None
    try:
        converted = convert_to_inferable(qat)
        output = keras.ops.convert_to_numpy(converted(x, training=False))
        same = np.array_equal(output, expected)
        result.record("convert-exact", same, time.perf_counter() - start, "" if same else differing(output, expected))
    except Exception as exc:
        result.fail("convert-exact", time.perf_counter() - start, exc)

    start = time.perf_counter()
    try:
        paths = [str(workdir / f"{name}-qat.keras")]
        qat.save(paths[0])
        if converted is not None:
            paths.append(str(workdir / f"{name}-converted.keras"))
            converted.save(paths[1])
        np.save(workdir / "x.npy", x)
        environment = dict(os.environ)
        if name.startswith("zoo:"):
            environment.update(ZOO_ROOT=str(Path(__file__).resolve().parents[1]),
                               ZOO_MODULES="tests.keras_backend.zoo,tests.keras_backend.zoo_attention")
        process = subprocess.run([sys.executable, "-c", textwrap.dedent(_FRESH_PROCESS), str(workdir / "x.npy"),
                                  *paths], capture_output=True, text=True, timeout=1800, env=environment)
        if process.returncode != 0:
            raise RuntimeError(f"the fresh process failed: {process.stderr.strip().splitlines()[-1]}")
        notes = []
        for path in paths:
            output = np.load(path + ".npy")
            if not np.array_equal(output, expected):
                notes.append(f"{Path(path).stem}: {differing(output, expected)}")
        result.record("reload-identical", not notes, time.perf_counter() - start,
                      "; ".join(notes) if notes else f"{len(paths)} files")
    except Exception as exc:
        result.fail("reload-identical", time.perf_counter() - start, exc)

    if converted is not None:
        start = time.perf_counter()
        try:
            report = export_tflite(converted, workdir / f"{name}.tflite", x)
            result.record("export", True, time.perf_counter() - start,
                          f"{report.identical:.1%} identical, argmax {report.argmax_identical:.0%}")
        except Exception as exc:
            result.fail("export", time.perf_counter() - start, exc)
    return result


def table(results: list[Result]) -> str:
    header = ["model", "input", *STAGES, "merges held", "quantized MACs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        cells = [r.name, str(r.size), *(r.cell(s) for s in STAGES), r.merges, r.share]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS),
                        help="comma-separated keras.applications names, or `zoo` for the test zoo's blocks")
    parser.add_argument("--input-size", type=int, default=96, help="image side (raised to each model's minimum)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--calib-batches", type=int, default=2)
    parser.add_argument("--weight-bits", type=int, default=4)
    parser.add_argument("--activation-bits", type=int, default=8)
    args = parser.parse_args()

    import keras
    import tensorflow as tf

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    if names == ["zoo"]:
        names = [f"zoo:{name}" for name in zoo_builders()]
    unknown = [n for n in names if not n.startswith("zoo:") and not callable(getattr(keras.applications, n, None))]
    if unknown:
        parser.error(f"not keras.applications models: {unknown}")
    if args.input_size < 32:
        parser.error(f"--input-size must be at least 32 (the smallest keras.applications accepts), got "
                     f"{args.input_size}")
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in names:
            size = max(args.input_size, MIN_SIZE.get(name, 32))
            started = time.perf_counter()
            try:
                result = run_model(name, size, args, Path(workdir))
            except Exception as exc:  # a failure outside the timed stages: keep going with the other models
                result = Result(name, size)
                result.errors.append(f"{name}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
            print(f"{name}: {time.perf_counter() - started:.1f}s", file=sys.stderr, flush=True)
            results.append(result)
            keras.backend.clear_session()
    print(f"W{args.weight_bits}A{args.activation_bits}, batch {args.batch}, Keras {keras.__version__}, "
          f"TensorFlow {tf.__version__}\n")
    print(table(results))
    errors = [e for r in results for e in r.errors]
    if errors:
        print("\n" + "\n".join(errors))


if __name__ == "__main__":
    main()
