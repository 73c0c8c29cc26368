"""Load a `.keras` model holding trainable quantizers, including quantizer classes the user defined."""

from __future__ import annotations

import os
from typing import Any

import keras

from trainable_infra.common.base_quantizer import is_marked
from trainable_infra.common.errors import QuantizationConfigError
from trainable_infra.common.resolver import all_subclasses
from trainable_infra.keras_backend.base_quantizer import BaseKerasTrainableQuantizer


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
    """
    if custom_objects is not None and not isinstance(custom_objects, dict):
        raise QuantizationConfigError(
            f"custom_objects must be a dict of name -> class or function, or None, got {custom_objects!r}"
        )
    objects = {**quantizer_custom_objects(), **(custom_objects or {})}
    return keras.models.load_model(path, custom_objects=objects, compile=compile, safe_mode=True)
