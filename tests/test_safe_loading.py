"""Saved models load without running code from the file: Keras safe mode, `torch.load(weights_only=True)`, and
no unsafe deserialization anywhere in the library's source."""

from __future__ import annotations

import ast
import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import trainable_infra
from trainable_infra import QATConfig, QuantizationMethod, TrainableInfraError, TrainingMethod

LIBRARY = Path(trainable_infra.__file__).parent

# --- Keras ----------------------------------------------------------------------------------------------------

keras = pytest.importorskip("keras")

from trainable_infra.keras_backend import (  # noqa: E402
    convert_to_inferable,
    keras_load_quantized_model,
    quantize_model,
)

KERAS_CONFIG = QATConfig(
    weight_training_method=TrainingMethod.LSQ,
    activation_training_method=TrainingMethod.LSQ,
    overrides={"fc": {"weight_quantization_method": QuantizationMethod.UNIFORM}},
)


def _x(n: int = 16) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(n, 8, 8, 1)).astype(np.float32)


def _keras_float_model(with_lambda: bool = False) -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1), name="image")
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inputs)
    if with_lambda:
        x = keras.layers.Lambda(lambda t: t * 0.5, name="halve")(x)
    x = keras.layers.Flatten()(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="fc")(x))


@pytest.fixture(scope="module")
def keras_files(tmp_path_factory) -> dict[str, tuple[Path, np.ndarray]]:
    """{kind: (path, predictions)} for a quantized model and its conversion, saved as `.keras`."""
    folder = tmp_path_factory.mktemp("keras")
    qat = quantize_model(_keras_float_model(), KERAS_CONFIG, _x(), progress=False)
    files = {}
    for kind, model in (("qat", qat), ("converted", convert_to_inferable(qat))):
        path = folder / f"{kind}.keras"
        model.save(path)
        files[kind] = (path, model.predict(_x(), verbose=0))
    return files


def _edited(source: Path, target: Path, edit) -> Path:
    """A copy of the `.keras` archive `source` whose config.json was changed by `edit(config)`."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for item in old.infolist():
            data = old.read(item.filename)
            if item.filename == "config.json":
                config = json.loads(data)
                edit(config)
                data = json.dumps(config).encode()
            new.writestr(item, data)
    return target


def _layer(config: dict, name: str) -> dict:
    return next(layer for layer in config["config"]["layers"] if layer["config"]["name"] == name)


@pytest.mark.parametrize("kind", ["qat", "converted"])
def test_keras_models_load_in_safe_mode_and_predict_the_same(keras_files, kind):
    path, expected = keras_files[kind]
    for loaded in (keras.models.load_model(path, safe_mode=True), keras_load_quantized_model(path)):
        np.testing.assert_array_equal(loaded.predict(_x(), verbose=0), expected)


# Where the unknown object is named: the model itself, a layer, and a quantizer inside a wrapper's config.
_EDITS = {
    "model is os.system": (lambda c: c.update(module="os", class_name="system", registered_name=None), "os.system"),
    "layer from an unregistered package": (
        lambda c: _layer(c, "fc").update(module="evil_pkg.layers", class_name="Payload",
                                         registered_name="evil>Payload"),
        "evil_pkg.layers.Payload",
    ),
    "quantizer is builtins.eval": (
        lambda c: _layer(c, "conv")["config"]["weights_quantizers"]["kernel"].update(
            module="builtins", class_name="eval", registered_name=None),
        "builtins.eval",
    ),
}


@pytest.mark.parametrize("case", list(_EDITS))
def test_keras_file_naming_an_unknown_class_is_refused_clearly(keras_files, tmp_path, case):
    edit, offending = _EDITS[case]
    path = _edited(keras_files["qat"][0], tmp_path / "edited.keras", edit)
    with pytest.raises(TrainableInfraError) as error:
        keras_load_quantized_model(path)
    message = str(error.value)
    assert str(path) in message
    assert offending in message
    assert "safe mode" in message


def test_keras_loader_never_imports_a_module_named_in_the_file(keras_files, tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "payload_module.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Payload: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = _edited(keras_files["qat"][0], tmp_path / "edited.keras",
                   lambda c: _layer(c, "fc").update(module="payload_module", class_name="Payload",
                                                    registered_name=None))
    with pytest.raises(TrainableInfraError, match=r"payload_module\.Payload"):
        keras_load_quantized_model(path)
    with pytest.raises(TypeError):
        keras.models.load_model(path, safe_mode=True)
    assert not marker.exists()
    assert "payload_module" not in sys.modules


def test_keras_lambda_layer_is_cloned_in_memory_but_refused_from_a_file(tmp_path):
    qat = quantize_model(_keras_float_model(with_lambda=True), KERAS_CONFIG, _x(), progress=False)
    assert isinstance(qat.get_layer("halve"), keras.layers.Lambda)
    # Converting copies the in-memory lambda (regression: this failed in safe mode like a file would).
    converted = convert_to_inferable(qat)
    np.testing.assert_array_equal(converted.predict(_x(), verbose=0), qat.predict(_x(), verbose=0))
    for kind, model in (("qat", qat), ("converted", converted)):
        path = tmp_path / f"{kind}.keras"
        model.save(path)
        with pytest.raises(ValueError, match="lambda"):
            keras.models.load_model(path, safe_mode=True)
        with pytest.raises(TrainableInfraError, match="a Python lambda") as error:
            keras_load_quantized_model(path)
        assert str(path) in str(error.value)


# --- PyTorch --------------------------------------------------------------------------------------------------

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402 - after the import guard
from torch.nn import functional as F  # noqa: E402, N812

from trainable_infra.pytorch_backend import (  # noqa: E402
    freeze_bn_stats,
    freeze_quantizers,
)
from trainable_infra.pytorch_backend import quantize_model as torch_quantize_model  # noqa: E402
from trainable_infra.pytorch_backend.training import quantizers_of  # noqa: E402

# One layer per (training method, quantization method): with the input holder's default, all eight built-in
# quantizer classes (weights and activations of STE / LSQ, symmetric / uniform) appear.
TORCH_CONFIG = QATConfig(overrides={
    "conv2": {"weight_quantization_method": QuantizationMethod.UNIFORM,
              "activation_quantization_method": QuantizationMethod.UNIFORM},
    "conv3": {"weight_training_method": TrainingMethod.LSQ, "activation_training_method": TrainingMethod.LSQ,
              "weight_quantization_method": QuantizationMethod.POWER_OF_TWO},
    "fc": {"weight_training_method": TrainingMethod.LSQ, "activation_training_method": TrainingMethod.LSQ,
           "weight_quantization_method": QuantizationMethod.UNIFORM,
           "activation_quantization_method": QuantizationMethod.UNIFORM},
})


class _TorchCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv3 = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.conv2(x)
        x = F.relu(self.conv3(x))
        return self.fc(torch.flatten(x, 1))


def _torch_x() -> torch.Tensor:
    return torch.from_numpy(_x()).permute(0, 3, 1, 2).contiguous()


def _torch_qat(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return torch_quantize_model(_TorchCNN(), TORCH_CONFIG, [_torch_x()], progress=False)


def _plain(value: object) -> bool:
    """Whether `value` is made only of tensors and plain Python values (what `weights_only=True` accepts)."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return type(value) is torch.Tensor or value is None or type(value) in (bool, int, float, str)


@pytest.mark.parametrize("frozen", [False, True], ids=["training", "frozen"])
def test_torch_state_dict_of_all_quantizer_kinds_loads_with_weights_only(tmp_path, frozen):
    model = _torch_qat(seed=0)
    kinds = {type(q).__name__ for q in quantizers_of(model).values()}
    assert kinds == {f"{m}{g}{t}Quantizer" for m in ("STE", "LSQ") for g in ("Symmetric", "Uniform")
                     for t in ("Weight", "Activation")}
    model.train()
    model(_torch_x())  # moves the BatchNorm statistics away from their initial values
    if frozen:
        freeze_quantizers(model)
        freeze_bn_stats(model)
    state = model.state_dict()
    assert _plain(dict(state))
    assert _plain(getattr(state, "_metadata", {}))
    torch.save(state, tmp_path / "qat.pt")

    fresh = _torch_qat(seed=1)
    fresh.load_state_dict(torch.load(tmp_path / "qat.pt", weights_only=True))
    for name, value in model.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[name]), name
    for mode in ("train", "eval"):
        getattr(model, mode)()
        getattr(fresh, mode)()
        assert torch.equal(model(_torch_x()), fresh(_torch_x())), mode
    # The switches travel in the state_dict too (as tensors): the fresh model is frozen exactly when the saved one was.
    assert all(q.freeze_quant_params is frozen for q in quantizers_of(fresh).values())
    learned = [p for n, p in fresh.named_parameters() if n.startswith(("conv3", "fc")) and "weight_" in n]
    assert learned
    assert all(p.requires_grad is not frozen for p in learned)


# --- the library's source ------------------------------------------------------------------------------------

# Calls that read code or arbitrary objects from data.
_ALWAYS_UNSAFE = {
    "eval", "exec", "builtins.eval", "builtins.exec", "pickle.load", "pickle.loads", "pickle.Unpickler",
    "_pickle.load", "_pickle.loads", "dill.load", "dill.loads", "cloudpickle.load", "cloudpickle.loads",
    "keras.config.enable_unsafe_deserialization",
}
# (file relative to the package, function) allowed to pass safe_mode=False: cloning an in-memory Lambda layer.
_SAFE_MODE_OFF_ALLOWED = {("keras_backend/quantize.py", "copy_layer")}


def _aliases(tree: ast.Module) -> dict[str, str]:
    """Local name -> the dotted name it was imported as (`import numpy as np` gives np -> numpy)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                names[alias.asname or top] = alias.name if alias.asname else top
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _dotted(node: ast.expr, aliases: dict[str, str]) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def _keyword(call: ast.Call, name: str) -> object:
    """The constant value of keyword `name` (`...` if absent, None if not a constant)."""
    for keyword in call.keywords:
        if keyword.arg == name:
            return keyword.value.value if isinstance(keyword.value, ast.Constant) else None
    return ...


def unsafe_calls(source: str, filename: str) -> list[str]:
    """Where `source` deserializes unsafely: "file:line: what"."""
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(m.split(".")[0] == "marshal" for m in modules):
                found.append(f"{filename}:{node.lineno}: imports marshal")
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, ast.Call) and _keyword(inner, "safe_mode") is False \
                        and (filename, node.name) not in _SAFE_MODE_OFF_ALLOWED:
                    found.append(f"{filename}:{inner.lineno}: safe_mode=False in {node.name}")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func, aliases) or ""
        where = f"{filename}:{node.lineno}: {name}"
        if name in _ALWAYS_UNSAFE or name.startswith("marshal."):
            found.append(where)
        elif name == "torch.load" and _keyword(node, "weights_only") is not True:
            found.append(f"{where} without weights_only=True")
        elif name == "numpy.load" and _keyword(node, "allow_pickle") not in (..., False):
            found.append(f"{where} with allow_pickle")
        elif name.split(".")[-1] == "load_model" and _keyword(node, "safe_mode") not in (..., True):
            found.append(f"{where} without safe mode")
    return sorted(set(found))


def test_scanner_finds_each_unsafe_pattern():
    source = """
import pickle, marshal
import numpy as np
import torch as t
from keras.models import load_model
from pickle import loads

def f(path, code):
    pickle.load(open(path, "rb"))
    loads(b"")
    eval(code)
    exec(code)
    t.load(path)
    t.load(path, weights_only=False)
    np.load(path, allow_pickle=True)
    load_model(path, safe_mode=False)
    keras.layers.Lambda.from_config({}, safe_mode=False)
    marshal.loads(b"")

def fine(path):
    t.load(path, weights_only=True)
    np.load(path)
    load_model(path)
"""
    found = unsafe_calls(source, "example.py")
    lines = sorted({int(entry.split(":")[1]) for entry in found})
    assert lines == [2, *range(9, 19)], found


def test_library_source_never_deserializes_unsafely():
    files = sorted(LIBRARY.rglob("*.py"))
    assert len(files) > 20
    found = [entry for path in files
             for entry in unsafe_calls(path.read_text(), path.relative_to(LIBRARY).as_posix())]
    assert found == []
