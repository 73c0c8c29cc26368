"""Find the trainable quantizer class for a target, a training method and a quantization method."""

from __future__ import annotations

from enum import Enum
from typing import Any

from trainable_infra.common.base_quantizer import BaseTrainableQuantizer, is_marked
from trainable_infra.common.errors import AmbiguousQuantizerError, QuantizationConfigError, QuantizerNotFoundError
from trainable_infra.common.mct import QuantizationMethod, QuantizationTarget


def all_subclasses(cls: type) -> list[type]:
    """Every class that inherits from `cls`, directly or not, each once, in definition order."""
    seen: dict[type, None] = {}
    stack = list(reversed(cls.__subclasses__()))
    while stack:
        sub = stack.pop()
        if sub not in seen:
            seen[sub] = None
            stack.extend(reversed(sub.__subclasses__()))
    return list(seen)


def identifier_matches(declared: Any, requested: Any) -> bool:
    """Whether a class's identifier answers a request.

    Equal values match. An enum member also matches a string equal to its name, so an identifier written
    to JSON by name (e.g. in a `QATConfig`) finds a user's own enum member again.
    """
    if declared == requested:
        return True
    if isinstance(declared, Enum) and isinstance(requested, str):
        return declared.name == requested
    if isinstance(requested, Enum) and isinstance(declared, str):
        return requested.name == declared
    return False


def _describe(cls: type) -> str:
    methods = ", ".join(m.name for m in cls.quantization_method)
    return f"{cls.__module__}.{cls.__qualname__} (identifier={cls.identifier!r}, methods=[{methods}])"


def get_trainable_quantizer_class(
    quant_target: QuantizationTarget,
    quantizer_id: Any,
    quant_method: QuantizationMethod,
    quantizer_base_class: type,
) -> type:
    """Return the one subclass of `quantizer_base_class` marked for this target, identifier and method.

    Args:
        quant_target: `QuantizationTarget.Weights` or `QuantizationTarget.Activation`.
        quantizer_id: the identifier given to `mark_quantizer`: a `TrainingMethod` member, a member of the
            user's own enum, or a string (a string also matches an enum member of that name).
        quant_method: the `QuantizationMethod` the quantizer must support.
        quantizer_base_class: the backend's base class to search under (e.g. `BasePytorchTrainableQuantizer`).

    Returns:
        The quantizer class.

    Raises:
        QuantizerNotFoundError: nothing matches; the message lists what exists for this target and base.
        AmbiguousQuantizerError: several classes match; the message lists them.

    Example:
        >>> get_trainable_quantizer_class(QuantizationTarget.Weights, TrainingMethod.STE,  # doctest: +SKIP
        ...                               QuantizationMethod.SYMMETRIC, BasePytorchTrainableQuantizer)
    """
    if not isinstance(quant_target, QuantizationTarget):
        raise QuantizationConfigError(
            f"quant_target must be QuantizationTarget.Weights or QuantizationTarget.Activation, got {quant_target!r}"
        )
    if not isinstance(quant_method, QuantizationMethod):
        raise QuantizationConfigError(f"quant_method must be a QuantizationMethod member, got {quant_method!r}")
    if not isinstance(quantizer_base_class, type) or not issubclass(quantizer_base_class, BaseTrainableQuantizer):
        raise QuantizationConfigError(
            "quantizer_base_class must be a class derived from BaseTrainableQuantizer (e.g. "
            f"BasePytorchTrainableQuantizer or BaseKerasTrainableQuantizer), got {quantizer_base_class!r}"
        )
    if not isinstance(quantizer_id, Enum) and not (isinstance(quantizer_id, str) and quantizer_id):
        raise QuantizationConfigError(
            f"quantizer_id must be an enum member (e.g. TrainingMethod.STE) or a non-empty string, got {quantizer_id!r}"
        )

    candidates = [
        cls for cls in all_subclasses(quantizer_base_class)
        if is_marked(cls) and cls.quantization_target is quant_target
    ]
    matches = [
        cls for cls in candidates
        if identifier_matches(cls.identifier, quantizer_id)
        and isinstance(cls.quantization_method, (list, tuple)) and quant_method in cls.quantization_method
    ]
    if len(matches) == 1:
        return matches[0]
    request = (
        f"target {quant_target.value}, identifier {quantizer_id!r}, method {quant_method.name} "
        f"under {quantizer_base_class.__qualname__}"
    )
    if not matches:
        available = "; ".join(_describe(cls) for cls in candidates) or "none"
        raise QuantizerNotFoundError(
            f"No trainable quantizer for {request}. Available for {quant_target.value}: {available}"
        )
    raise AmbiguousQuantizerError(
        f"{len(matches)} trainable quantizers match {request}: " + "; ".join(_describe(cls) for cls in matches)
        + ". Give each a distinct identifier in mark_quantizer."
    )
