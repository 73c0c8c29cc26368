"""Framework-neutral core: configs, training methods, resolver, base quantizer, numerics reference, errors."""

from trainable_infra.common.base_quantizer import BaseTrainableQuantizer
from trainable_infra.common.config import (
    TrainableQuantizerActivationConfig,
    TrainableQuantizerCandidateConfig,
    TrainableQuantizerWeightsConfig,
    config_from_dict,
)
from trainable_infra.common.enums import TrainingMethod, VariableGroup
from trainable_infra.common.errors import (
    AmbiguousQuantizerError,
    QuantizationConfigError,
    QuantizerDefinitionError,
    QuantizerNotFoundError,
    TrainableInfraError,
)
from trainable_infra.common.mct import QuantizationMethod, QuantizationTarget, mark_quantizer
from trainable_infra.common.qat_config import LayerOverride, LayerSettings, QATConfig
from trainable_infra.common.resolver import get_trainable_quantizer_class
from trainable_infra.common.schedules import LinearAnnealing

__all__ = [
    "AmbiguousQuantizerError",
    "BaseTrainableQuantizer",
    "LayerOverride",
    "LayerSettings",
    "LinearAnnealing",
    "QATConfig",
    "QuantizationConfigError",
    "QuantizationMethod",
    "QuantizationTarget",
    "QuantizerDefinitionError",
    "QuantizerNotFoundError",
    "TrainableInfraError",
    "TrainableQuantizerActivationConfig",
    "TrainableQuantizerCandidateConfig",
    "TrainableQuantizerWeightsConfig",
    "TrainingMethod",
    "VariableGroup",
    "config_from_dict",
    "get_trainable_quantizer_class",
    "mark_quantizer",
]
