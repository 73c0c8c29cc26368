"""Exceptions raised by trainable-infra.

Every error the library raises on purpose derives from `TrainableInfraError`, which is a `ValueError`
because each is caused by a value the user passed (a config, an identifier, a class definition).
"""


class TrainableInfraError(ValueError):
    """Base class of the library's own errors."""


class QuantizationConfigError(TrainableInfraError):
    """A configuration value is invalid (wrong type, out of range, inconsistent with another value)."""


class QuantizerNotFoundError(TrainableInfraError, LookupError):
    """No trainable quantizer class matches the requested target, method and identifier."""


class AmbiguousQuantizerError(TrainableInfraError, LookupError):
    """More than one trainable quantizer class matches the requested target, method and identifier."""


class QuantizerDefinitionError(TrainableInfraError, TypeError):
    """A trainable quantizer class is defined incorrectly (not decorated, bad `__init__` signature, ...)."""


class ExportValidationError(TrainableInfraError):
    """An export failed: the converter, the format's checker, the runtime, or the comparison with the model."""


class NonFiniteError(TrainableInfraError, FloatingPointError):
    """A quantizer met NaN or ±Inf: in an input or a variable while `check_finite` is on (which also rejects a
    threshold <= 0 and an empty range), or in a parameter `convert2inferable` would export."""
