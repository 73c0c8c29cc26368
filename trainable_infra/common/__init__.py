"""Framework-neutral core: configs, training methods, resolver, base quantizer, numerics reference, errors."""

from trainable_infra.common.base_quantizer import BaseTrainableQuantizer
from trainable_infra.common.config import (
    IS_SIGNED,
    MIN_THRESHOLD,
    RANGE_MAX,
    RANGE_MIN,
    SIGNED,
    THRESHOLD,
    TrainableQuantizerActivationConfig,
    TrainableQuantizerCandidateConfig,
    TrainableQuantizerWeightsConfig,
    config_from_dict,
)
from trainable_infra.common.debug import check_finite
from trainable_infra.common.enums import TrainingMethod, VariableGroup
from trainable_infra.common.errors import (
    AmbiguousQuantizerError,
    ExportValidationError,
    NonFiniteError,
    QuantizationConfigError,
    QuantizerDefinitionError,
    QuantizerNotFoundError,
    TrainableInfraError,
)
from trainable_infra.common.export import ExportReport
from trainable_infra.common.mct import QuantizationMethod, QuantizationTarget, mark_quantizer
from trainable_infra.common.qat_config import LayerOverride, LayerSettings, QATConfig
from trainable_infra.common.resolver import get_trainable_quantizer_class
from trainable_infra.common.schedules import LinearAnnealing

__all__ = [
    "IS_SIGNED",
    "MIN_THRESHOLD",
    "RANGE_MAX",
    "RANGE_MIN",
    "SIGNED",
    "THRESHOLD",
    "AmbiguousQuantizerError",
    "BaseTrainableQuantizer",
    "ExportReport",
    "ExportValidationError",
    "LayerOverride",
    "LayerSettings",
    "LinearAnnealing",
    "NonFiniteError",
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
    "check_finite",
    "config_from_dict",
    "get_trainable_quantizer_class",
    "mark_quantizer",
]
