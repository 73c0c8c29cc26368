"""Bad input to PyTorch quantizers and wrappers: the library's exception, naming the problem.

The cross-backend table of bad inputs is tests/test_bad_inputs.py; these are the PyTorch-only ones.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

from trainable_infra import (
    QuantizationConfigError,
    QuantizationMethod,
    QuantizerDefinitionError,
    TrainableQuantizerActivationConfig,
    TrainableQuantizerWeightsConfig,
)
from trainable_infra.pytorch_backend import (
    BasePytorchWeightTrainableQuantizer,
    PytorchTrainableActivationQuantizationHolder,
    PytorchTrainableQuantizationWrapper,
    STESymmetricActivationQuantizer,
    STESymmetricWeightQuantizer,
    STEUniformWeightQuantizer,
)

SYM, UNI = QuantizationMethod.SYMMETRIC, QuantizationMethod.UNIFORM


def weights_config(method=SYM, params=None, axis=0, per_channel=True):
    params = {"threshold": np.ones(4)} if params is None else params
    return TrainableQuantizerWeightsConfig(method, 8, params, True, axis, per_channel, 1e-8)


def activation_config(params=None):
    params = {"threshold": 1.0, "is_signed": True} if params is None else params
    return TrainableQuantizerActivationConfig(SYM, 8, params, True, 1e-8)


class Undecorated(BasePytorchWeightTrainableQuantizer):
    def initialize_quantization(self, tensor_shape, name, layer):
        pass

    def __call__(self, inputs, training):
        return inputs

    def convert2inferable(self):
        return None


CASES = [
    ("method the quantizer does not support", lambda: STESymmetricWeightQuantizer(
        weights_config(UNI, {"range_min": -1.0, "range_max": 1.0})),
     QuantizationConfigError, "supports quantization methods SYMMETRIC, POWER_OF_TWO, got UNIFORM"),
    ("missing threshold", lambda: PytorchTrainableQuantizationWrapper(
        nn.Linear(3, 4), {"weight": STESymmetricWeightQuantizer(weights_config(params={"x": 1.0}))}),
     QuantizationConfigError, "weights_quantization_params must contain 'threshold' for SYMMETRIC"),
    ("missing range", lambda: PytorchTrainableQuantizationWrapper(
        nn.Linear(3, 4), {"weight": STEUniformWeightQuantizer(weights_config(UNI, {"range_min": -1.0}))}),
     QuantizationConfigError, "must contain 'range_max' for UNIFORM"),
    ("missing is_signed for an activation", lambda: PytorchTrainableActivationQuantizationHolder(
        STESymmetricActivationQuantizer(activation_config({"threshold": 1.0}))),
     QuantizationConfigError, "activation_quantization_params must contain 'is_signed'"),
    ("channel axis out of range", lambda: PytorchTrainableQuantizationWrapper(
        nn.Linear(3, 4), {"weight": STESymmetricWeightQuantizer(weights_config(axis=2))}),
     QuantizationConfigError, "weights_channels_axis 2 is out of range for a tensor of rank 2"),
    ("threshold of the wrong length", lambda: PytorchTrainableQuantizationWrapper(
        nn.Linear(3, 4), {"weight": STESymmetricWeightQuantizer(weights_config(params={"threshold": np.ones(3)}))}),
     QuantizationConfigError, "does not fit a tensor of shape (4, 3) with channel axis 0"),
    ("undecorated quantizer", lambda: Undecorated(weights_config()),
     QuantizerDefinitionError, "Undecorated must be decorated with @mark_quantizer"),
    ("module that is not a module", lambda: PytorchTrainableQuantizationWrapper(
        "conv", {"weight": STESymmetricWeightQuantizer(weights_config())}),
     QuantizationConfigError, "module must be a torch.nn.Module, got 'conv' of type str"),
    ("activation quantizer on a weight", lambda: PytorchTrainableQuantizationWrapper(
        nn.Linear(3, 4), {"weight": STESymmetricActivationQuantizer(activation_config())}),
     QuantizationConfigError, "weights_quantizers['weight'] must quantize Weights"),
    ("variables on something that is not a module", lambda: STESymmetricWeightQuantizer(
        weights_config()).initialize_quantization((4, 3), "weight", object()),
     QuantizationConfigError, "layer must be the torch.nn.Module that holds the quantizer's variables"),
]


@pytest.mark.parametrize(("case", "build", "error", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_library_error(case, build, error, message):
    with pytest.raises(error, match=re.escape(message)):
        build()


def test_one_quantizer_for_two_layers_is_refused():
    quantizer = STESymmetricWeightQuantizer(weights_config())
    PytorchTrainableQuantizationWrapper(nn.Linear(3, 4), {"weight": quantizer})
    with pytest.raises(QuantizationConfigError, match="already holds the variables of another layer"):
        PytorchTrainableQuantizationWrapper(nn.Linear(3, 4), {"weight": quantizer})


def test_failed_construction_does_not_change_the_module():
    module = nn.Linear(3, 4)
    before = dict(module.state_dict())
    with pytest.raises(QuantizationConfigError):
        PytorchTrainableQuantizationWrapper(module, {"weight": STESymmetricWeightQuantizer(weights_config(axis=5))})
    assert module.state_dict().keys() == before.keys()
    assert all(torch.equal(module.state_dict()[k], v) for k, v in before.items())
