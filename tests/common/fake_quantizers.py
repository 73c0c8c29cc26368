"""A numpy "backend" for testing the framework-neutral base quantizer and resolver in isolation."""

from enum import Enum

import numpy as np

from trainable_infra import (
    BaseTrainableQuantizer,
    QuantizationMethod,
    QuantizationTarget,
    TrainingMethod,
    VariableGroup,
    mark_quantizer,
)
from trainable_infra.common import numerics
from trainable_infra.common.quant_params import weight_quant_params


class Variable:
    """A stand-in for a framework variable."""

    def __init__(self, value, trainable=True):
        self.value = np.asarray(value, dtype=np.float32)
        self.trainable = trainable


class BaseNumpyTrainableQuantizer(BaseTrainableQuantizer):
    """The base a backend would provide."""

    def get_trainable_variables(self, group):
        return [v for v in self.variables_in_group(group) if v.trainable]

    def variable_value(self, variable):
        return variable.value


class UserMethod(Enum):
    PACT = "pact"


@mark_quantizer(
    quantization_target=QuantizationTarget.Weights,
    quantization_method=[QuantizationMethod.SYMMETRIC, QuantizationMethod.POWER_OF_TWO],
    identifier=TrainingMethod.STE,
)
class NumpySTEWeightQuantizer(BaseNumpyTrainableQuantizer):
    def __init__(self, quantization_config, freeze_quant_params=False, scale=1.0):
        super().__init__(quantization_config, freeze_quant_params)
        self.scale = scale

    def initialize_quantization(self, tensor_shape, name, layer):
        self.params = weight_quant_params(self.quantization_config, tensor_shape)
        threshold = Variable(self.params.threshold)
        layer[f"{name}_threshold"] = threshold
        self.add_quantizer_variable("threshold", threshold, VariableGroup.QPARAMS)

    def __call__(self, inputs, training):
        p = self.params
        return numerics.fake_quant_symmetric(
            inputs, self.get_quantizer_variable("threshold").value, p.n_bits, p.signed,
            power_of_two=p.power_of_two, channel_axis=p.channel_axis,
        )

    def convert2inferable(self):
        return {"threshold": self.get_quantizer_variable("threshold").value.tolist()}


@mark_quantizer(
    quantization_target=QuantizationTarget.Activation,
    quantization_method=[QuantizationMethod.UNIFORM],
    identifier=UserMethod.PACT,
)
class NumpyPACTActivationQuantizer(BaseNumpyTrainableQuantizer):
    def initialize_quantization(self, tensor_shape, name, layer):
        self.add_quantizer_variable("alpha", Variable(6.0), VariableGroup.QPARAMS)
        self.add_quantizer_variable("frozen", Variable(1.0, trainable=False), VariableGroup.QPARAMS)

    def __call__(self, inputs, training):
        return np.clip(inputs, 0, self.get_quantizer_variable("alpha").value)

    def convert2inferable(self):
        return None


@mark_quantizer(
    quantization_target=QuantizationTarget.Activation,
    quantization_method=[QuantizationMethod.SYMMETRIC],
    identifier="my-string-method",
)
class NumpyStringIdActivationQuantizer(NumpyPACTActivationQuantizer):
    pass
