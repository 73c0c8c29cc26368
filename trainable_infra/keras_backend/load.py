"""Load a `.keras` model holding trainable quantizers, including quantizer classes the user defined."""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from typing import Any

import h5py
import keras
import numpy as np

from trainable_infra.common.base_quantizer import is_marked
from trainable_infra.common.config import check_bool
from trainable_infra.common.errors import QuantizationConfigError, TrainableInfraError
from trainable_infra.common.resolver import all_subclasses
from trainable_infra.keras_backend.base_quantizer import BaseKerasTrainableQuantizer
from trainable_infra.keras_backend.calibrate import all_layers

# Packages whose objects Keras' loader imports by module name; it finds any other object only by registration.
_KERAS_PACKAGES = frozenset({"keras", "keras_hub", "keras_cv", "keras_nlp"})
# Where a `.keras` archive keeps its variables, and where in them the optimizer's are (Keras' saving_lib layout).
_WEIGHTS_FILE = "model.weights.h5"
_OPTIMIZER_VARIABLES = "optimizer/vars"


def quantizer_custom_objects() -> dict[str, type]:
    """Every decorated subclass of `BaseKerasTrainableQuantizer`, by class name and by Keras registered name.

    A class name shared by two different classes is left out (a file cannot say which one it meant); pass
    that class in `custom_objects` or register it with `keras.saving.register_keras_serializable`.
    """
    found: dict[str, type] = {}
    ambiguous: set[str] = set()
    for cls in all_subclasses(BaseKerasTrainableQuantizer):
        if not is_marked(cls):
            continue
        for name in {cls.__name__, keras.saving.get_registered_name(cls)}:
            if found.get(name, cls) is not cls:
                ambiguous.add(name)
            found[name] = cls
    return {name: cls for name, cls in found.items() if name not in ambiguous}


def keras_load_quantized_model(
    path: str | os.PathLike, custom_objects: dict[str, Any] | None = None, compile: bool = True
) -> keras.Model:
    """Load a `.keras` model with trainable quantizers, in Keras' safe mode.

    The library's layers and quantizers are registered with Keras and need nothing; this also makes every
    user-defined quantizer (a decorated subclass of `BaseKerasTrainableQuantizer`) known to the loader.

    Args:
        path: the `.keras` file.
        custom_objects: further classes or functions the model needs, by name; these take precedence.
        compile: whether to restore the training configuration (optimizer state included).

    Returns:
        The model.

    Raises:
        TrainableInfraError: `path` is missing, is not a `.keras` zip archive, or does not hold a Keras model.
    """
    if custom_objects is not None and not isinstance(custom_objects, dict):
        raise QuantizationConfigError(
            f"custom_objects must be a dict of name -> class or function, or None, got {custom_objects!r}"
        )
    check_bool("compile", compile)
    path = _check_path(path)
    objects = {**quantizer_custom_objects(), **(custom_objects or {})}
    try:
        with warnings.catch_warnings():
            # Keras skips the optimizer state when the trainable variables changed since it was built;
            # restore_optimizer_state below loads it anyway, or warns itself.
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            model = keras.models.load_model(path, custom_objects=objects, compile=compile, safe_mode=True)
    except TrainableInfraError:
        raise
    except (KeyError, ValueError, TypeError, zipfile.BadZipFile) as exc:
        refused = refused_objects(path, objects)
        if refused:
            # Keras names only the outermost object that failed (often the model itself); say what it refused.
            raise TrainableInfraError(
                f"path {path!r} could not be loaded as a Keras model: it names {', '.join(refused)}, which safe "
                "mode does not load. It loads Keras' own objects, the library's layers and quantizers, decorated "
                "quantizer classes, classes registered with keras.saving.register_keras_serializable and those "
                "passed in custom_objects; never a Python lambda, whose bytecode would run on loading"
            ) from exc
        # A zip that is not a Keras archive (no config.json, bad JSON), or a class the loader cannot find.
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrainableInfraError(f"path {path!r} could not be loaded as a Keras model: {reason}") from exc
    if compile:
        restore_optimizer_state(model, path)
    return model


def refused_objects(path: str, custom_objects: dict[str, Any]) -> list[str]:
    """The objects named in the config of the `.keras` file at `path` that safe mode cannot load.

    These are Python lambdas and classes or functions of modules outside Keras that are neither registered
    with Keras nor in `custom_objects`: the loader never imports such a module.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return []
    found: list[str] = []

    def visit(node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                visit(item)
            return
        if not isinstance(node, dict):
            return
        class_name, module = node.get("class_name"), node.get("module")
        if class_name == "__lambda__":
            found.append("a Python lambda")
        elif isinstance(class_name, str) and isinstance(module, str) and module.split(".")[0] not in _KERAS_PACKAGES:
            # Keras looks functions up by the name in `config`, classes by `registered_name`.
            is_function = class_name == "function" and isinstance(node.get("config"), str)
            name = node["config"] if is_function else node.get("registered_name") or class_name
            # Keras' built-in functions (activations, losses) are saved with the module "builtins".
            builtin = is_function and module == "builtins"
            if not builtin and keras.saving.get_registered_object(name, custom_objects) is None:
                found.append(f"{module}.{node['config'] if is_function else class_name}")
        for value in node.values():
            visit(value)

    visit(config)
    return list(dict.fromkeys(found))


def restore_optimizer_state(model: keras.Model, path: str) -> None:
    """Load the optimizer state saved in `path` into `model` where Keras' loader skipped it.

    Keras builds the optimizer of a loaded model for the variables trainable now, and skips the saved state
    when that state was built for another set. `freeze_bn_stats` after the first training step does this: the
    BatchNormalization layers are saved with `trainable=False`, but the optimizer was built while they were
    trainable. The optimizer is then rebuilt for the variables of every layer, the frozen BatchNormalization
    layers included, as it was when the state was saved.
    """
    optimizer = getattr(model, "optimizer", None)
    saved = _saved_optimizer_variables(path, unless=len(optimizer.variables)) if optimizer is not None else None
    if saved is None:
        return  # nothing saved, or Keras restored it
    rebuilt = optimizer.__class__.from_config(optimizer.get_config())
    if len(saved) == len(rebuilt.variables):
        return  # saved before its first step, unbuilt: there is no state to restore
    frozen = [layer for layer in all_layers(model)
              if isinstance(layer, keras.layers.BatchNormalization) and not layer.trainable]
    for layer in frozen:
        layer.trainable = True
    try:
        variables = list(model.trainable_variables)
    finally:
        for layer in frozen:
            layer.trainable = False
    rebuilt.build(variables)
    if len(rebuilt.variables) != len(saved):
        warnings.warn(
            f"the optimizer state saved in {path!r} has {len(saved)} variables, but the optimizer of the loaded model "
            f"has {len(optimizer.variables)}: it was built for other trainable variables than the loaded model has, "
            "and starts afresh (step count included)", stacklevel=3,
        )
        return
    rebuilt.load_own_variables({str(i): value for i, value in enumerate(saved)})
    model.optimizer = rebuilt


def _saved_optimizer_variables(path: str, unless: int) -> list[np.ndarray] | None:
    """The optimizer variables stored in a `.keras` archive, in order; None if it has none or `unless` of them."""
    with zipfile.ZipFile(path) as archive:
        if _WEIGHTS_FILE not in archive.namelist():
            return None
        with archive.open(_WEIGHTS_FILE) as file, h5py.File(file, "r") as weights:
            group = weights.get(_OPTIMIZER_VARIABLES)
            if group is None or len(group) == unless:
                return None
            return [np.asarray(group[str(i)]) for i in range(len(group))]


def _check_path(path: Any) -> str:
    """`path` as a string if it names an existing `.keras` archive, else raise naming the problem."""
    if not isinstance(path, (str, os.PathLike)):
        raise TrainableInfraError(f"path must be a str or os.PathLike naming a .keras file, got {path!r}")
    path = os.fspath(path)
    if not isinstance(path, str):  # a PathLike of bytes
        raise TrainableInfraError(f"path must name a .keras file as a str, got {path!r}")
    if not os.path.exists(path):
        raise TrainableInfraError(f"path {path!r} does not exist")
    if os.path.isdir(path) or not path.endswith(".keras"):
        raise TrainableInfraError(
            f"path must name a .keras file (as model.save('model.keras') writes it), got {path!r}"
        )
    if not zipfile.is_zipfile(path):
        raise TrainableInfraError(f"path {path!r} is not a .keras archive: the file is not a zip file")
    return path
