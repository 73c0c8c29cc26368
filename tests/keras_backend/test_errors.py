"""Bad input to the Keras backend raises the library's exceptions naming the argument, the value, what is allowed.

The cross-backend table of bad inputs is tests/test_bad_inputs.py; these are the Keras-only ones.
"""

import keras
import numpy as np
import pytest

from tests.keras_backend.helpers import activation_config, weights_config
from trainable_infra import (
    QuantizationConfigError,
    QuantizationMethod,
    QuantizationTarget,
    QuantizerDefinitionError,
    mark_quantizer,
)
from trainable_infra.keras_backend import (
    BaseKerasActivationTrainableQuantizer,
    BaseKerasWeightTrainableQuantizer,
    KerasActivationQuantizationHolder,
    KerasInferableActivationQuantizationHolder,
    KerasInferableQuantizationWrapper,
    KerasTrainableQuantizationWrapper,
    LSQSymmetricWeightQuantizer,
    LSQUniformActivationQuantizer,
    STESymmetricActivationQuantizer,
    STESymmetricWeightQuantizer,
    STEUniformWeightQuantizer,
)
from trainable_infra.keras_backend.inferable_wrappers import deserialize_inferable


class UndecoratedQuantizer(BaseKerasWeightTrainableQuantizer):
    def initialize_quantization(self, tensor_shape, name, layer):
        pass

    def __call__(self, inputs, training=False):
        return inputs

    def convert2inferable(self):
        return None


@mark_quantizer(quantization_target=QuantizationTarget.Activation, quantization_method=[QuantizationMethod.SYMMETRIC],
                identifier="mismatched-target")
class WrongTargetQuantizer(UndecoratedQuantizer):
    pass


def _initialize(quantizer, shape=(3, 3, 2, 4)):
    quantizer.initialize_quantization(shape, "kernel", keras.layers.Layer())


def _build(wrapper, shape=(None, 4)):
    wrapper.build(shape)


def _built_dense():
    dense = keras.layers.Dense(3)
    dense.build((None, 4))
    return dense


BAD_INPUTS = {
    "weights-quantizer-given-activation-config": (
        lambda: STESymmetricWeightQuantizer(activation_config()),
        QuantizationConfigError, ["STESymmetricWeightQuantizer", "TrainableQuantizerWeightsConfig",
                                  "TrainableQuantizerActivationConfig("],
    ),
    "activation-quantizer-given-weights-config": (
        lambda: STESymmetricActivationQuantizer(weights_config()),
        QuantizationConfigError, ["TrainableQuantizerActivationConfig", "TrainableQuantizerWeightsConfig("],
    ),
    "method-not-supported": (
        lambda: STESymmetricWeightQuantizer(weights_config(QuantizationMethod.UNIFORM, params={"range_min": -1.0,
                                                                                                 "range_max": 1.0})),
        QuantizationConfigError, ["supports quantization methods SYMMETRIC, POWER_OF_TWO", "got UNIFORM"],
    ),
    "lut-method-not-supported": (
        lambda: LSQUniformActivationQuantizer(activation_config(QuantizationMethod.LUT_POT_QUANTIZER)),
        QuantizationConfigError, ["supports quantization methods UNIFORM", "LUT_POT_QUANTIZER"],
    ),
    "missing-threshold": (
        lambda: _initialize(STESymmetricWeightQuantizer(weights_config(params={"thresh": 1.0}))),
        QuantizationConfigError, ["weights_quantization_params must contain 'threshold'", "['thresh']"],
    ),
    "missing-range-max": (
        lambda: LSQUniformActivationQuantizer(activation_config(QuantizationMethod.UNIFORM,
                                                                params={"range_min": -1.0})),
        QuantizationConfigError, ["activation_quantization_params must contain 'range_max'", "UNIFORM"],
    ),
    "missing-is-signed": (
        lambda: STESymmetricActivationQuantizer(activation_config(params={"threshold": 2.0})),
        QuantizationConfigError, ["must contain 'is_signed'"],
    ),
    "channel-axis-out-of-range": (
        lambda: _initialize(LSQSymmetricWeightQuantizer(weights_config(axis=5))),
        QuantizationConfigError, ["weights_channels_axis 5 is out of range for a tensor of rank 4"],
    ),
    "per-channel-threshold-of-wrong-length": (
        lambda: _initialize(STESymmetricWeightQuantizer(weights_config(params={"threshold": [1.0, 2.0, 3.0]}))),
        QuantizationConfigError, ["'threshold'", "shape (3,)", "length 4"],
    ),
    "per-channel-range-of-wrong-shape": (
        lambda: _initialize(STEUniformWeightQuantizer(weights_config(
            QuantizationMethod.UNIFORM, params={"range_min": -np.ones((1, 1, 4, 1)), "range_max": np.ones(4)}))),
        QuantizationConfigError, ["'range_min'", "(1, 1, 4, 1)", "(1, 1, 1, 4)"],
    ),
    "quantizer-not-decorated": (
        lambda: UndecoratedQuantizer(weights_config()),
        QuantizerDefinitionError, ["UndecoratedQuantizer must be decorated with @mark_quantizer"],
    ),
    "quantizer-marked-for-the-other-target": (
        lambda: WrongTargetQuantizer(weights_config()),
        QuantizerDefinitionError, ["WrongTargetQuantizer", "Weights", "QuantizationTarget.Activation"],
    ),
    "attribute-the-built-layer-lacks": (
        lambda: KerasTrainableQuantizationWrapper(_built_dense(), {"kernal": STESymmetricWeightQuantizer(
            weights_config())}),
        QuantizationConfigError, ["weights_quantizers names 'kernal'", "Dense", "['bias', 'kernel']"],
    ),
    "attribute-the-layer-lacks-found-at-build": (
        lambda: _build(KerasTrainableQuantizationWrapper(keras.layers.Dense(3), {"gamma": STESymmetricWeightQuantizer(
            weights_config())})),
        QuantizationConfigError, ["weights_quantizers names 'gamma'", "no such attribute"],
    ),
    "attribute-that-is-not-a-variable": (
        lambda: KerasTrainableQuantizationWrapper(_built_dense(), {"activation": STESymmetricWeightQuantizer(
            weights_config())}),
        QuantizationConfigError, ["'activation'", "not a variable"],
    ),
    "weights-quantizers-not-a-dict": (
        lambda: KerasTrainableQuantizationWrapper(keras.layers.Dense(3), [STESymmetricWeightQuantizer(
            weights_config())]),
        QuantizationConfigError, ["weights_quantizers must be a dict", "[STESymmetricWeightQuantizer("],
    ),
    "activation-quantizer-on-a-weight": (
        lambda: KerasTrainableQuantizationWrapper(keras.layers.Dense(3), {"kernel": STESymmetricActivationQuantizer(
            activation_config())}),
        QuantizationConfigError, ["weights_quantizers['kernel'] quantizes Activation, not Weights"],
    ),
    "one-quantizer-for-two-weights": (
        lambda: (lambda q: KerasTrainableQuantizationWrapper(keras.layers.Dense(3), {"kernel": q, "bias": q}))(
            STESymmetricWeightQuantizer(weights_config(per_channel=False))),
        QuantizationConfigError, ["weights_quantizers['bias'] is the same quantizer object", "'kernel'"],
    ),
    "one-quantizer-in-two-layers": (
        lambda: (lambda q: [KerasActivationQuantizationHolder(q, name=n).build((None, 3)) for n in ("a", "b")])(
            STESymmetricActivationQuantizer(activation_config())),
        QuantizationConfigError, ["activation_quantizer (STESymmetricActivationQuantizer) already quantizes",
                                  "layer 'a'", "layer 'b' needs its own quantizer instance"],
    ),
    "holder-given-a-weights-quantizer": (
        lambda: KerasActivationQuantizationHolder(STESymmetricWeightQuantizer(weights_config())),
        QuantizationConfigError, ["activation_quantizer quantizes Weights, not Activation"],
    ),
    "inferable-wrapper-given-a-trainable-quantizer": (
        lambda: KerasInferableQuantizationWrapper(keras.layers.Dense(3), {"kernel": STESymmetricWeightQuantizer(
            weights_config())}),
        QuantizationConfigError, ["must be a mct-quantizers Keras inferable quantizer", "STESymmetricWeightQuantizer"],
    ),
    "inferable-holder-given-a-trainable-quantizer": (
        lambda: KerasInferableActivationQuantizationHolder(STESymmetricActivationQuantizer(activation_config())),
        QuantizationConfigError, ["must be an mct-quantizers Keras inferable quantizer"],
    ),
    "inferable-quantizer-class-unknown": (
        lambda: deserialize_inferable({"class_name": "os.system", "config": {}}),
        QuantizationConfigError,
        ["unknown inferable quantizer class 'os.system'", "WeightsSymmetricInferableQuantizer"],
    ),
    "variable-group-not-a-member": (
        lambda: STESymmetricActivationQuantizer(activation_config()).get_trainable_variables("qparams"),
        QuantizationConfigError, ["group must be a VariableGroup member", "'qparams'"],
    ),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_raises_the_library_error_naming_the_problem(name):
    action, error, fragments = BAD_INPUTS[name]
    with pytest.raises(error) as caught:
        action()
    for fragment in fragments:
        assert fragment in str(caught.value), f"{name}: {fragment!r} not in {caught.value}"


def test_every_library_error_is_a_value_error():
    # Users may catch ValueError around configuration code.
    assert all(issubclass(error, ValueError) for _, error, _ in BAD_INPUTS.values())


def test_activation_base_rejects_a_weights_target():
    @mark_quantizer(quantization_target=QuantizationTarget.Weights, quantization_method=[QuantizationMethod.UNIFORM],
                    identifier="activation-base-weights-target")
    class Misfiled(BaseKerasActivationTrainableQuantizer):
        def initialize_quantization(self, tensor_shape, name, layer):
            pass

        def __call__(self, inputs, training=False):
            return inputs

        def convert2inferable(self):
            return None

    with pytest.raises(QuantizerDefinitionError, match="Misfiled derives from a base for Activation quantizers"):
        Misfiled(weights_config(QuantizationMethod.UNIFORM, params={"range_min": -1.0, "range_max": 1.0}))
