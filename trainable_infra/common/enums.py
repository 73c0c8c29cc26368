"""Enumerations shared by both backends."""

from enum import Enum


class TrainingMethod(Enum):
    """Identifiers of the built-in training methods.

    A quantizer's `identifier` (given to `mark_quantizer`) may also be a member of a user's own enum or a
    string; this enum only names the methods that ship with the library.
    """

    STE = "STE"
    LSQ = "LSQ"


class VariableGroup(Enum):
    """Kinds of variables a trainable quantizer registers, so an optimizer can treat them separately."""

    WEIGHTS = "weights"
    QPARAMS = "qparams"
