"""Base classes of PyTorch trainable quantizers."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from trainable_infra.common.base_quantizer import BaseTrainableQuantizer
from trainable_infra.common.enums import VariableGroup
from trainable_infra.common.mct import QuantizationTarget
from trainable_infra.common.quant_params import QuantParams, activation_quant_params, weight_quant_params


class BasePytorchTrainableQuantizer(BaseTrainableQuantizer):
    """Base of PyTorch trainable quantizers: variables are `torch.nn.Parameter`s registered on the layer."""

    def get_trainable_variables(self, group: VariableGroup) -> list[torch.nn.Parameter]:
        """The registered variables of `group` that require gradients (none for QPARAMS when frozen)."""
        return [variable for variable in self.variables_in_group(group) if variable.requires_grad]

    def variable_value(self, variable: torch.Tensor) -> np.ndarray:
        """The current value of one of this quantizer's variables as a numpy array."""
        return variable.detach().float().cpu().numpy()

    def read_quant_params(self, tensor_shape: Any) -> QuantParams:
        """The validated quantization parameters of this quantizer's config for a tensor of `tensor_shape`."""
        raise NotImplementedError


class BasePytorchWeightTrainableQuantizer(BasePytorchTrainableQuantizer):
    """Base of PyTorch trainable weight quantizers."""

    base_quantization_target = QuantizationTarget.Weights

    def read_quant_params(self, tensor_shape: Any) -> QuantParams:
        """Per-channel or per-tensor parameters for a weight of `tensor_shape` (always signed)."""
        return weight_quant_params(self.quantization_config, tuple(tensor_shape))


class BasePytorchActivationTrainableQuantizer(BasePytorchTrainableQuantizer):
    """Base of PyTorch trainable activation quantizers (per-tensor)."""

    base_quantization_target = QuantizationTarget.Activation

    def read_quant_params(self, tensor_shape: Any) -> QuantParams:
        """Per-tensor parameters of the activation (the tensor shape is not needed)."""
        return activation_quant_params(self.quantization_config)


# MCT's names of the same classes, so that quantizers written for MCT's QAT import what they name.
BasePytorchQATTrainableQuantizer = BasePytorchTrainableQuantizer
BasePytorchQATWeightTrainableQuantizer = BasePytorchWeightTrainableQuantizer
