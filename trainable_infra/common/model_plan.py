"""What `quantize_model` decides the same way in both backends: argument checks, overrides, holder names."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator, Sequence
from fnmatch import fnmatchcase
from typing import Any

from trainable_infra.common.calibration import ACTIVATION_CALIBRATIONS, DEFAULT_ACTIVATION_THRESHOLD
from trainable_infra.common.config import check_bool, check_choice, check_optional_count
from trainable_infra.common.errors import QuantizationConfigError
from trainable_infra.common.qat_config import QATConfig


def check_qat_arguments(
    qat_config: Any, num_calibration_batches: Any, supported_layer_types: Iterable[str], backend: str
) -> QATConfig:
    """The `QATConfig` to use (the default when None), after checking it and the calibration batch count."""
    if qat_config is None:
        qat_config = QATConfig()
    if not isinstance(qat_config, QATConfig):
        raise QuantizationConfigError(f"qat_config must be a QATConfig, got {qat_config!r}")
    check_optional_count("num_calibration_batches", num_calibration_batches)
    if qat_config.layer_types is not None:
        supported = sorted(supported_layer_types)
        unknown = sorted(set(qat_config.layer_types) - set(supported))
        if unknown:
            raise QuantizationConfigError(
                f"layer_types names {unknown}, which the {backend} backend cannot quantize; supported: {supported}"
            )
    return qat_config


def check_calibrate_arguments(num_batches: Any, calibration: Any, progress: Any) -> int | None:
    """The batch count to use (None: all), after checking `calibrate`'s options."""
    num_batches = check_optional_count("num_batches", num_batches)
    check_choice("calibration", calibration, ACTIVATION_CALIBRATIONS)
    check_bool("progress", progress)
    return num_batches


def check_overrides(config: QATConfig, names: Sequence[str]) -> None:
    """Raise unless every override pattern of `config` matches at least one of the model's layer `names`."""
    for override in config.overrides:
        if not any(fnmatchcase(name, override.pattern) for name in names):
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            raise QuantizationConfigError(
                f"override pattern {override.pattern!r} matches no layer of the model; its layers are: {shown}"
            )


def holder_name(base: str, taken: set[str]) -> str:
    """A new name "<base>_activation_quantizer" (dots made underscores), made unique among `taken` and added."""
    name = f"{base.replace('.', '_')}_activation_quantizer"
    unique, index = name, 1
    while unique in taken:
        unique, index = f"{name}_{index}", index + 1
    taken.add(unique)
    return unique


def warn_no_representative_data() -> None:
    """Say that activation quantizers start at their defaults because no data was given."""
    t = DEFAULT_ACTIVATION_THRESHOLD
    warnings.warn(
        f"quantize_model got no representative_data: activation quantizers start at a threshold of {t:g} "
        f"(range [-{t:g}, {t:g}], or [0, {t:g}] after ReLU); call calibrate(model, data) or pass representative_data",
        stacklevel=3,
    )


@contextlib.contextmanager
def naming_layer(name: str) -> Iterator[None]:
    """Add the layer's name to any error raised while its quantizers are made (e.g. by an invalid override)."""
    try:
        yield
    except Exception as exc:
        exc.add_note(f"raised while making the quantizers of layer {name!r}; the input model is unchanged")
        raise
