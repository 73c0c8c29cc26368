"""Torchvision architectures through the QAT life cycle, each quantized while in train mode (W4A8 by default).

Each model is built with random weights (`weights=None`) and run through these stages, timed:

- quantize: `quantize_model` with `--calib-batches` batches of random images as representative data;
- train: two SGD steps on random labels;
- eval-deterministic: two eval-mode calls give identical outputs;
- convert-exact: `convert_to_inferable`'s output equals the QAT model's eval output bit for bit;
- reload-identical: the `state_dict`, saved and read back with `torch.load(weights_only=True)` into a fresh
  `quantize_model` of the same float model, gives the same eval output;
- export: `export_onnx` (QCDQ) writes a file that onnxruntime runs; the table also says whether the file holds a
  random op (dropout or stochastic depth left in training form) and the share of outputs it reproduces;
- MAC share: `quantization_coverage`'s share of multiply-accumulates on quantized operands;
- linear weights: nn.Linear layers and nn.MultiheadAttention projections (q, k, v counted apart) with a weight
  quantizer, of all of them.

    python benchmarks/model_zoo_torch.py                                  # every model below
    python benchmarks/model_zoo_torch.py --models resnet18,swin_t --batch 2

ViT-B/16 and Swin-T run at 224x224 (the size they are built for); the others at `--input-size` (default 64).
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
import traceback
import types
import warnings
from pathlib import Path

MODELS = [
    "resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "shufflenet_v2_x1_0", "squeezenet1_0",
    "densenet121", "regnet_y_400mf", "mnasnet0_5", "googlenet", "convnext_tiny", "vit_b_16", "swin_t",
]
# Built for 224x224 inputs: ViT's position embedding has one entry per 16x16 patch of a 224x224 image, Swin's
# window (7) and four downsamplings fit 224 exactly.
NATIVE_SIZE = {"vit_b_16": 224, "swin_t": 224}
EXTRA_KWARGS = {"googlenet": {"aux_logits": False, "init_weights": True}}
STAGES = ["quantize", "train", "eval-deterministic", "convert-exact", "reload-identical", "export"]
RANDOM_OPS = {"RandomUniform", "RandomUniformLike", "RandomNormal", "RandomNormalLike", "Bernoulli", "Multinomial"}


def import_torchvision():
    """torchvision, also where its wheel was built for another torch variant than the installed one.

    Such a wheel registers meta and autograd kernels of its C++ operators (nms, roi_align, ...) at import and fails
    where torch lacks them; the classification models use none of those operators, so the two registration
    modules are stood in for by empty ones and the import is retried.
    """
    try:
        import torchvision
    except RuntimeError:
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
            sys.modules[name] = types.ModuleType(name)
        import torchvision
    return torchvision


class Result:
    """Per-stage outcome ("pass", "FAIL" or "skip"), seconds and a note, plus the coverage figures."""

    def __init__(self, name: str, size: int):
        self.name, self.size = name, size
        self.stages: dict[str, tuple[str, float, str]] = {}
        self.random_ops = "-"
        self.mac_share = "-"
        self.linear = "-"
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


def differing(a, b) -> str:
    """The share of differing values of two tensors, as text."""
    if a.shape != b.shape:
        return f"shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    return f"{(a != b).float().mean().item():.1%} differ, max |diff| {(a - b).abs().max().item():.3g}"


def linear_maps(float_model, qat) -> tuple[int, int]:
    """(quantized, total) linear maps: each nn.Linear and each q / k / v projection of an nn.MultiheadAttention.

    A layer counts as quantized where the QAT model holds a weights wrapper under its name (quantize_model keeps
    names) that quantizes its weight; a packed in-projection counts three times.
    """
    from torch import nn

    from trainable_infra.pytorch_backend import PytorchTrainableQuantizationWrapper

    def wrapper_at(name: str):
        try:
            module = qat.get_submodule(name)
        except AttributeError:
            return None
        return module if isinstance(module, PytorchTrainableQuantizationWrapper) else None

    quantized = total = 0
    for name, module in float_model.named_modules():
        if isinstance(module, nn.Linear):
            total += 1
            wrapper = wrapper_at(name)
            quantized += wrapper is not None and "weight" in wrapper.weights_quantizers
        elif isinstance(module, nn.MultiheadAttention):
            total += 3
            whole = wrapper_at(name)
            for projection in ("q", "k", "v"):
                part = wrapper_at(f"{name}.{projection}_proj")
                quantized += (part is not None and "weight" in part.weights_quantizers) or (
                    whole is not None
                    and bool({"in_proj_weight", f"{projection}_proj_weight"} & set(whole.weights_quantizers))
                )
    return quantized, total


def random_ops_in(path: str) -> list[str]:
    """Random ONNX ops of a file (graph and subgraphs) and Dropout nodes switched to training."""
    import onnx

    found = []

    def walk(graph):
        for node in graph.node:
            if node.op_type in RANDOM_OPS or (node.op_type == "Dropout" and len(node.input) > 2 and node.input[2]):
                found.append(node.op_type)
            for attribute in node.attribute:
                for sub in [attribute.g, *attribute.graphs]:
                    if sub is not None and sub.node:
                        walk(sub)

    walk(onnx.load(path).graph)
    return sorted(set(found), key=found.index)


def run_model(name: str, size: int, args, workdir: Path) -> Result:
    import torch

    import trainable_infra.pytorch_backend as tpb
    from trainable_infra import QATConfig

    result = Result(name, size)
    config = QATConfig(weight_n_bits=args.weight_bits, activation_n_bits=args.activation_bits)
    torch.manual_seed(0)
    if name.startswith("zoo:"):
        # The test zoo's small re-implementations (tests/pytorch_backend/zoo.py), with their own input shapes.
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.pytorch_backend.test_zoo import CASES

        case = CASES[name.removeprefix("zoo:")]
        float_model, shape = case.build().train(), case.input_shape
    else:
        torchvision = import_torchvision()
        float_model = getattr(torchvision.models, name)(weights=None, **EXTRA_KWARGS.get(name, {})).train()
        shape = (3, size, size)
    data = [(torch.randn(args.batch, *shape), torch.randint(0, 10, (args.batch,))) for _ in range(args.calib_batches)]
    x = torch.randn(args.batch, *shape)

    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qat = tpb.quantize_model(float_model, config, data, progress=False)
    except Exception as exc:
        result.fail("quantize", time.perf_counter() - start, exc)
        return result
    result.record("quantize", True, time.perf_counter() - start)

    start = time.perf_counter()
    try:
        optimizer = torch.optim.SGD(qat.parameters(), lr=0.01, momentum=0.9)
        qat.train()
        for step in range(2):
            inputs, labels = data[step % len(data)]
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(qat(inputs), labels).backward()
            optimizer.step()
        result.record("train", True, time.perf_counter() - start)
    except Exception as exc:
        result.fail("train", time.perf_counter() - start, exc)

    start = time.perf_counter()
    with torch.no_grad():
        qat.eval()
        expected, again = qat(x), qat(x)
    same = torch.equal(expected, again)
    result.record("eval-deterministic", same, time.perf_counter() - start, "" if same else differing(expected, again))

    start = time.perf_counter()
    converted = None
    try:
        converted = tpb.convert_to_inferable(qat).eval()
        with torch.no_grad():
            output = converted(x)
        same = torch.equal(output, expected)
        result.record("convert-exact", same, time.perf_counter() - start, "" if same else differing(output, expected))
    except Exception as exc:
        result.fail("convert-exact", time.perf_counter() - start, exc)

    start = time.perf_counter()
    try:
        buffer = io.BytesIO()
        torch.save(qat.state_dict(), buffer)
        buffer.seek(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fresh = tpb.quantize_model(float_model, config, data, progress=False)
        fresh.load_state_dict(torch.load(buffer, weights_only=True))
        with torch.no_grad():
            output = fresh.eval()(x)
        same = torch.equal(output, expected)
        result.record("reload-identical", same, time.perf_counter() - start,
                      "" if same else differing(output, expected))
        del fresh
    except Exception as exc:
        result.fail("reload-identical", time.perf_counter() - start, exc)

    if converted is not None:
        start = time.perf_counter()
        path = workdir / f"{name}.onnx"
        try:
            report = tpb.export_onnx(converted, path, x)
            note = f"{report.identical:.1%} identical, argmax {report.argmax_identical:.0%}"
            result.record("export", True, time.perf_counter() - start, note)
            result.random_ops = ", ".join(random_ops_in(report.path)) or "none"
        except Exception as exc:
            result.fail("export", time.perf_counter() - start, exc)
        finally:
            path.unlink(missing_ok=True)

    try:
        coverage = tpb.quantization_coverage(qat, x)
        result.mac_share = f"{coverage.quantized_share:.2%}"
    except Exception as exc:
        result.errors.append(f"{name} / coverage: {type(exc).__name__}: {exc}")
    quantized, total = linear_maps(float_model, qat)
    result.linear = f"{quantized}/{total}"
    return result


def table(results: list[Result]) -> str:
    header = ["model", "input", *STAGES, "random ops", "MAC share", "linear weights"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        cells = [r.name, str(r.size), *(r.cell(s) for s in STAGES), r.random_ops, r.mac_share, r.linear]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS),
                        help="comma-separated torchvision model names, or `zoo` for the test zoo's blocks")
    parser.add_argument("--input-size", type=int, default=64, help="image side (ViT-B/16 and Swin-T: at least 224)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--calib-batches", type=int, default=2)
    parser.add_argument("--weight-bits", type=int, default=4)
    parser.add_argument("--activation-bits", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    if names == ["zoo"]:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.pytorch_backend.test_zoo import CASES

        names = [f"zoo:{case}" for case in CASES]
    torchvision = import_torchvision()
    unknown = [n for n in names if not n.startswith("zoo:") and not callable(getattr(torchvision.models, n, None))]
    if unknown:
        parser.error(f"not torchvision models: {unknown}")
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in names:
            size = max(args.input_size, NATIVE_SIZE.get(name, 0))
            started = time.perf_counter()
            try:
                result = run_model(name, size, args, Path(workdir))
            except Exception as exc:  # a failure outside the timed stages: keep going with the other models
                result = Result(name, size)
                result.errors.append(f"{name}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
            print(f"{name}: {time.perf_counter() - started:.1f}s", file=sys.stderr, flush=True)
            results.append(result)
    print(f"W{args.weight_bits}A{args.activation_bits}, batch {args.batch}, torch {torch.__version__}, "
          f"torchvision {import_torchvision().__version__}\n")
    print(table(results))
    errors = [e for r in results for e in r.errors]
    if errors:
        print("\n" + "\n".join(errors))


if __name__ == "__main__":
    main()
