"""Keras 3 backend of trainable-infra (TensorFlow backend of Keras)."""

try:
    import keras
    import tensorflow  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "trainable_infra.keras_backend needs TensorFlow and Keras 3: pip install 'trainable-infra[keras]'"
    ) from exc

if int(keras.__version__.split(".")[0]) < 3:  # pragma: no cover
    raise ImportError(
        f"trainable_infra.keras_backend needs Keras 3, found Keras {keras.__version__}: "
        "pip install 'trainable-infra[keras]'"
    )

from trainable_infra.keras_backend.attention import KerasInferableMultiHeadAttention, KerasQuantizedMultiHeadAttention
from trainable_infra.keras_backend.base_quantizer import (
    BaseKerasActivationTrainableQuantizer,
    BaseKerasQATTrainableQuantizer,
    BaseKerasQATWeightTrainableQuantizer,
    BaseKerasTrainableQuantizer,
    BaseKerasWeightTrainableQuantizer,
)
from trainable_infra.keras_backend.calibrate import calibrate
from trainable_infra.keras_backend.convert import convert_to_inferable
from trainable_infra.keras_backend.export import export_tflite
from trainable_infra.keras_backend.inferable_wrappers import (
    KerasInferableActivationQuantizationHolder,
    KerasInferableQuantizationWrapper,
)
from trainable_infra.keras_backend.load import keras_load_quantized_model
from trainable_infra.keras_backend.quantize import quantize_model
from trainable_infra.keras_backend.quantizers import (
    DQASymmetricActivationQuantizer,
    DQASymmetricWeightQuantizer,
    DQAUniformActivationQuantizer,
    DQAUniformWeightQuantizer,
    LSQSymmetricActivationQuantizer,
    LSQSymmetricWeightQuantizer,
    LSQUniformActivationQuantizer,
    LSQUniformWeightQuantizer,
    STESymmetricActivationQuantizer,
    STESymmetricWeightQuantizer,
    STEUniformActivationQuantizer,
    STEUniformWeightQuantizer,
)
from trainable_infra.keras_backend.report import quantization_coverage, quantization_report
from trainable_infra.keras_backend.training import (
    QuantizerFreezeCallback,
    freeze_bn_stats,
    freeze_quantizers,
    set_dqa_temperature_schedule,
    unfreeze_bn_stats,
    unfreeze_quantizers,
)
from trainable_infra.keras_backend.wrappers import KerasActivationQuantizationHolder, KerasTrainableQuantizationWrapper

__all__ = [
    "BaseKerasActivationTrainableQuantizer",
    "BaseKerasQATTrainableQuantizer",
    "BaseKerasQATWeightTrainableQuantizer",
    "BaseKerasTrainableQuantizer",
    "BaseKerasWeightTrainableQuantizer",
    "DQASymmetricActivationQuantizer",
    "DQASymmetricWeightQuantizer",
    "DQAUniformActivationQuantizer",
    "DQAUniformWeightQuantizer",
    "KerasActivationQuantizationHolder",
    "KerasInferableActivationQuantizationHolder",
    "KerasInferableMultiHeadAttention",
    "KerasInferableQuantizationWrapper",
    "KerasQuantizedMultiHeadAttention",
    "KerasTrainableQuantizationWrapper",
    "LSQSymmetricActivationQuantizer",
    "LSQSymmetricWeightQuantizer",
    "LSQUniformActivationQuantizer",
    "LSQUniformWeightQuantizer",
    "QuantizerFreezeCallback",
    "STESymmetricActivationQuantizer",
    "STESymmetricWeightQuantizer",
    "STEUniformActivationQuantizer",
    "STEUniformWeightQuantizer",
    "calibrate",
    "convert_to_inferable",
    "export_tflite",
    "freeze_bn_stats",
    "freeze_quantizers",
    "keras_load_quantized_model",
    "quantization_coverage",
    "quantization_report",
    "quantize_model",
    "set_dqa_temperature_schedule",
    "unfreeze_bn_stats",
    "unfreeze_quantizers",
]
