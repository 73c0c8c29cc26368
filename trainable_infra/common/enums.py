"""Enumerations shared by both backends."""

from enum import Enum


class TrainingMethod(Enum):
    """Identifiers of the built-in training methods.

    A quantizer's `identifier` (given to `mark_quantizer`) may also be a member of a user's own enum or a
    string; this enum only names the methods that ship with the library.
    """

    STE = "STE"  # straight-through estimator: fixed threshold or range
    LSQ = "LSQ"  # learned step size (Esser et al., 2019): the threshold or range is trained
    # DNN Quantization with Attention (Boukli Hacene et al., 2021): a learned mixture of the b, 2b and 4b-bit
    # quantizations, annealed to b bits.
    DQA = "DQA"


class VariableGroup(Enum):
    """Kinds of variables a trainable quantizer registers, so an optimizer can treat them separately."""

    WEIGHTS = "weights"
    QPARAMS = "qparams"
