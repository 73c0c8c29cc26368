"""PyTorch backend of trainable-infra: trainable quantizers, wrapper modules, conversion and export."""

try:
    import torch  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError("trainable_infra.pytorch_backend needs PyTorch: pip install 'trainable-infra[torch]'") from exc

from trainable_infra.pytorch_backend.base_quantizer import (
    BasePytorchActivationTrainableQuantizer,
    BasePytorchQATTrainableQuantizer,
    BasePytorchQATWeightTrainableQuantizer,
    BasePytorchTrainableQuantizer,
    BasePytorchWeightTrainableQuantizer,
)
from trainable_infra.pytorch_backend.calibrate import calibrate
from trainable_infra.pytorch_backend.convert import convert_to_inferable
from trainable_infra.pytorch_backend.export import export_onnx
from trainable_infra.pytorch_backend.integer import IntegerQuantizationWrapper
from trainable_infra.pytorch_backend.quantize import quantize_model
from trainable_infra.pytorch_backend.quantizers import (
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
from trainable_infra.pytorch_backend.report import quantization_coverage, quantization_report
from trainable_infra.pytorch_backend.training import (
    freeze_bn_stats,
    freeze_quantizers,
    set_dqa_temperature_schedule,
    unfreeze_bn_stats,
    unfreeze_quantizers,
)
from trainable_infra.pytorch_backend.wrappers import (
    PytorchTrainableActivationQuantizationHolder,
    PytorchTrainableQuantizationWrapper,
)

__all__ = [
    "BasePytorchActivationTrainableQuantizer",
    "BasePytorchQATTrainableQuantizer",
    "BasePytorchQATWeightTrainableQuantizer",
    "BasePytorchTrainableQuantizer",
    "BasePytorchWeightTrainableQuantizer",
    "DQASymmetricActivationQuantizer",
    "DQASymmetricWeightQuantizer",
    "DQAUniformActivationQuantizer",
    "DQAUniformWeightQuantizer",
    "IntegerQuantizationWrapper",
    "LSQSymmetricActivationQuantizer",
    "LSQSymmetricWeightQuantizer",
    "LSQUniformActivationQuantizer",
    "LSQUniformWeightQuantizer",
    "PytorchTrainableActivationQuantizationHolder",
    "PytorchTrainableQuantizationWrapper",
    "STESymmetricActivationQuantizer",
    "STESymmetricWeightQuantizer",
    "STEUniformActivationQuantizer",
    "STEUniformWeightQuantizer",
    "calibrate",
    "convert_to_inferable",
    "export_onnx",
    "freeze_bn_stats",
    "freeze_quantizers",
    "quantization_coverage",
    "quantization_report",
    "quantize_model",
    "set_dqa_temperature_schedule",
    "unfreeze_bn_stats",
    "unfreeze_quantizers",
]
