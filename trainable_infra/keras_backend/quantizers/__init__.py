"""The built-in Keras trainable quantizers."""

from trainable_infra.keras_backend.quantizers.dqa import (
    DQASymmetricActivationQuantizer,
    DQASymmetricWeightQuantizer,
    DQAUniformActivationQuantizer,
    DQAUniformWeightQuantizer,
)
from trainable_infra.keras_backend.quantizers.lsq import (
    LSQSymmetricActivationQuantizer,
    LSQSymmetricWeightQuantizer,
    LSQUniformActivationQuantizer,
    LSQUniformWeightQuantizer,
)
from trainable_infra.keras_backend.quantizers.ste import (
    STESymmetricActivationQuantizer,
    STESymmetricWeightQuantizer,
    STEUniformActivationQuantizer,
    STEUniformWeightQuantizer,
)

__all__ = [
    "DQASymmetricActivationQuantizer",
    "DQASymmetricWeightQuantizer",
    "DQAUniformActivationQuantizer",
    "DQAUniformWeightQuantizer",
    "LSQSymmetricActivationQuantizer",
    "LSQSymmetricWeightQuantizer",
    "LSQUniformActivationQuantizer",
    "LSQUniformWeightQuantizer",
    "STESymmetricActivationQuantizer",
    "STESymmetricWeightQuantizer",
    "STEUniformActivationQuantizer",
    "STEUniformWeightQuantizer",
]
