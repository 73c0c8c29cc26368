"""Bad input anywhere in the public API: the library's own exception, naming the argument and the offending value.

One table, both backends: configs, the resolver, quantizers, wrappers, `quantize_model`, `calibrate`, loading and
converting. Each case says which exception it expects, a fragment naming the argument and a fragment showing the
value. (No PyTorch loader category: a QAT model's `state_dict` loads with torch's own `load_state_dict`.)
"""

from __future__ import annotations

import dataclasses
import functools
import re
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import torch
from torch import nn

import trainable_infra.keras_backend as kb
import trainable_infra.pytorch_backend as pb
from trainable_infra import (
    LayerOverride,
    LinearAnnealing,
    QATConfig,
    QuantizationConfigError,
    QuantizationMethod,
    QuantizationTarget,
    QuantizerDefinitionError,
    QuantizerNotFoundError,
    TrainableInfraError,
    TrainableQuantizerActivationConfig,
    TrainableQuantizerWeightsConfig,
    TrainingMethod,
    config_from_dict,
    get_trainable_quantizer_class,
    mark_quantizer,
)
from trainable_infra.common.errors import NonFiniteError

SYM, POT, UNI = QuantizationMethod.SYMMETRIC, QuantizationMethod.POWER_OF_TWO, QuantizationMethod.UNIFORM
HUGE = 10**400  # an int no float holds: float(HUGE) raises OverflowError


def wcfg(**changes: Any) -> TrainableQuantizerWeightsConfig:
    """A per-channel symmetric weights config (axis 0, threshold 1.0) with `changes` applied."""
    arguments = {
        "weights_quantization_method": SYM, "weights_n_bits": 8, "weights_quantization_params": {"threshold": 1.0},
        "enable_weights_quantization": True, "weights_channels_axis": 0, "weights_per_channel_threshold": True,
        "min_threshold": 1e-8,
    }
    return TrainableQuantizerWeightsConfig(**{**arguments, **changes})


def acfg(**changes: Any) -> TrainableQuantizerActivationConfig:
    """A signed symmetric activation config (threshold 4.0) with `changes` applied."""
    arguments = {
        "activation_quantization_method": SYM, "activation_n_bits": 8,
        "activation_quantization_params": {"threshold": 4.0, "is_signed": True},
        "enable_activation_quantization": True, "min_threshold": 1e-8,
    }
    return TrainableQuantizerActivationConfig(**{**arguments, **changes})


def uniform_acfg() -> TrainableQuantizerActivationConfig:
    params = {"range_min": -1.0, "range_max": 1.0}
    return acfg(activation_quantization_method=UNI, activation_quantization_params=params)


def weights_dict(**changes: Any) -> dict[str, Any]:
    return {**wcfg().to_dict(), **changes}


def without(d: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != key}


def nested(depth: int) -> list:
    value: list = [1.0]
    for _ in range(depth - 1):
        value = [value]
    return value


# --- quantizers whose convert2inferable breaks the contract -------------------------------------------------------


@mark_quantizer(QuantizationTarget.Weights, [SYM, POT], "bad-inputs-returns-none")
class TorchQuantizerConvertingToNone(pb.STESymmetricWeightQuantizer):
    def convert2inferable(self) -> Any:
        return None


@mark_quantizer(QuantizationTarget.Weights, [SYM, POT], "bad-inputs-returns-itself")
class KerasQuantizerConvertingToItself(kb.STESymmetricWeightQuantizer):
    def convert2inferable(self) -> Any:
        return self


# --- models -------------------------------------------------------------------------------------------------------

TORCH_DATA = [torch.linspace(-1.0, 1.0, 8).reshape(2, 4)]
KERAS_DATA = np.linspace(-1.0, 1.0, 16, dtype=np.float32).reshape(4, 4)


def torch_float() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU())


@functools.cache
def torch_qat() -> nn.Module:
    """A QAT model shared by the cases that fail before changing it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # no representative data
        return pb.quantize_model(torch_float(), progress=False)


def torch_convert_with(quantizer: pb.BasePytorchTrainableQuantizer, threshold: float = 1.0) -> nn.Module:
    wrapper = pb.PytorchTrainableQuantizationWrapper(nn.Linear(4, 3), {"weight": quantizer})
    with torch.no_grad():
        wrapper.weight_threshold.fill_(threshold)
    return pb.convert_to_inferable(nn.Sequential(wrapper))


def keras_float() -> keras.Model:
    inputs = keras.Input((4,), name="x")
    return keras.Model(inputs, keras.layers.Dense(3, activation="relu", name="dense")(inputs), name="float_mlp")


@functools.cache
def keras_qat() -> keras.Model:
    """A QAT model shared by the cases that fail before changing it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # no representative data
        return kb.quantize_model(keras_float(), progress=False)


def keras_wrapped(quantizer: kb.BaseKerasTrainableQuantizer, name: str = "wrapped") -> keras.Model:
    inputs = keras.Input((4,))
    outputs = kb.KerasTrainableQuantizationWrapper(keras.layers.Dense(3), {"kernel": quantizer})(inputs)
    return keras.Model(inputs, outputs, name=name)


def keras_convert_with_nan_range() -> keras.Model:
    quantizer = kb.STEUniformWeightQuantizer(wcfg(
        weights_quantization_method=UNI, weights_channels_axis=-1,
        weights_quantization_params={"range_min": -1.0, "range_max": 1.0},
    ))
    model = keras_wrapped(quantizer)
    quantizer.range_max.assign(np.full(quantizer.range_max.shape, np.nan, np.float32))
    return kb.convert_to_inferable(model)


class KerasSubclassed(keras.Model):
    def __init__(self) -> None:
        super().__init__(name="subclassed")
        self.dense = keras.layers.Dense(2)

    def call(self, x: Any) -> Any:
        return self.dense(x)


def keras_unbuilt() -> keras.Model:
    quantizer = kb.STESymmetricWeightQuantizer(wcfg(weights_channels_axis=-1))
    return keras.Sequential([kb.KerasTrainableQuantizationWrapper(keras.layers.Dense(3), {"kernel": quantizer})],
                            name="unbuilt")


def load_file(name: str, content: bytes | None = None, members: dict[str, str] | None = None, **kwargs: Any) -> Any:
    """Write `content` (or a zip of `members`) to `name` in the current directory, then load it."""
    if members is not None:
        with zipfile.ZipFile(name, "w") as archive:
            for member, text in members.items():
                archive.writestr(member, text)
    elif content is not None:
        Path(name).write_bytes(content)
    return kb.keras_load_quantized_model(name, **kwargs)


# --- the matrix ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BadInput:
    """`call()` must raise exactly `error`, whose message contains `names` (the argument) and `shows` (the value)."""

    id: str
    call: Callable[[], Any]
    error: type[TrainableInfraError]
    names: str
    shows: str

    @property
    def category(self) -> str:
        return self.id.split(":")[0]


QCE = QuantizationConfigError
CASES = [
    # Weights configs.
    BadInput("weights-config:n-bits-17", lambda: wcfg(weights_n_bits=17), QCE,
             "weights_n_bits must be an int in 2..16", "got 17"),
    BadInput("weights-config:n-bits-numpy-float", lambda: wcfg(weights_n_bits=np.float32(8)), QCE,
             "weights_n_bits must be an int", "np.float32(8.0) of type float32"),
    BadInput("weights-config:method-by-name", lambda: wcfg(weights_quantization_method="UNIFORM"), QCE,
             "weights_quantization_method must be one of", "got 'UNIFORM'"),
    BadInput("weights-config:threshold-int-too-large-for-float",
             lambda: wcfg(weights_quantization_params={"threshold": HUGE}), QCE,
             "weights_quantization_params['threshold'] must be finite", "got 1000000000"),
    BadInput("weights-config:range-min-int-too-large-for-float",
             lambda: wcfg(weights_quantization_method=UNI,
                          weights_quantization_params={"range_min": -HUGE, "range_max": 1.0}), QCE,
             "weights_quantization_params['range_min'] must be finite", "got -1000000000"),
    BadInput("weights-config:min-threshold-int-too-large-for-float", lambda: wcfg(min_threshold=HUGE), QCE,
             "min_threshold must be a finite number > 0", "got 1000000000"),
    BadInput("weights-config:channels-axis-string", lambda: wcfg(weights_channels_axis="0"), QCE,
             "weights_channels_axis must be an int", "got '0' of type str"),
    BadInput("weights-config:per-channel-numpy-int", lambda: wcfg(weights_per_channel_threshold=np.int64(1)), QCE,
             "weights_per_channel_threshold must be a bool", "np.int64(1)"),
    BadInput("weights-config:threshold-list-of-dicts",
             lambda: wcfg(weights_quantization_params={"threshold": [{"t": 1.0}]}), QCE,
             "weights_quantization_params['threshold'] must be a non-empty array of numbers", "[{'t': 1.0}]"),
    BadInput("weights-config:threshold-bytes", lambda: wcfg(weights_quantization_params={"threshold": b"1"}), QCE,
             "weights_quantization_params['threshold'] must be a number or an array", "b'1' of type bytes"),
    BadInput("weights-config:extra-param-nan",
             lambda: wcfg(weights_quantization_params={"threshold": 1.0, "offset": float("nan")}), QCE,
             "weights_quantization_params['offset'] must be a finite number", "got nan"),
    BadInput("weights-config:extra-param-nested-too-deep",
             lambda: wcfg(weights_quantization_params={"threshold": 1.0, "path": nested(40)}), QCE,
             "weights_quantization_params['path'][0]", "nests lists more than 32 deep"),
    BadInput("weights-config:extra-param-dict",
             lambda: wcfg(weights_quantization_params={"threshold": 1.0, "meta": {"a": 1}}), QCE,
             "weights_quantization_params['meta'] must be a number, bool, string", "got {'a': 1} of type dict"),
    BadInput("weights-config:candidates-bytes", lambda: wcfg(weights_quantization_candidates=b""), QCE,
             "weights_quantization_candidates must be None or a list", "got b''"),
    BadInput("weights-config:per-tensor-four-thresholds",
             lambda: wcfg(weights_per_channel_threshold=False, weights_channels_axis=None,
                          weights_quantization_params={"threshold": np.ones(4)}), QCE,
             "weights_quantization_params['threshold'] must hold one value for per-tensor", "got 4 values"),
    # Activation configs.
    BadInput("activation-config:n-bits-string", lambda: acfg(activation_n_bits="8"), QCE,
             "activation_n_bits must be an int in 2..16", "got '8' of type str"),
    BadInput("activation-config:is-signed-string",
             lambda: acfg(activation_quantization_params={"threshold": 1.0, "is_signed": "true"}), QCE,
             "activation_quantization_params['is_signed'] must be a bool", "got 'true'"),
    BadInput("activation-config:range-reversed",
             lambda: acfg(activation_quantization_method=UNI,
                          activation_quantization_params={"range_min": 1.0, "range_max": -1.0}), QCE,
             "activation_quantization_params: range_min must be < range_max", "range_min=1.0, range_max=-1.0"),
    BadInput("activation-config:threshold-zero",
             lambda: acfg(activation_quantization_params={"threshold": 0, "is_signed": False}), QCE,
             "activation_quantization_params['threshold'] must be > 0", "got 0"),
    BadInput("activation-config:min-threshold-nan", lambda: acfg(min_threshold=float("nan")), QCE,
             "min_threshold must be a finite number > 0", "got nan"),
    BadInput("activation-config:candidates-dict", lambda: acfg(activation_quantization_candidates={"n_bits": 4}),
             QCE, "activation_quantization_candidates must be None or a list", "{'n_bits': 4}"),
    # Config dicts.
    BadInput("from-dict:kind-array",
             lambda: TrainableQuantizerWeightsConfig.from_dict(weights_dict(kind=np.array(["weights", "weights"]))),
             QCE, "TrainableQuantizerWeightsConfig.from_dict expects kind 'weights'", "got kind array(['weights',"),
    BadInput("from-dict:missing-n-bits",
             lambda: TrainableQuantizerWeightsConfig.from_dict(without(weights_dict(), "weights_n_bits")), QCE,
             "TrainableQuantizerWeightsConfig.from_dict is missing keys", "['weights_n_bits']"),
    BadInput("from-dict:method-lowercase",
             lambda: config_from_dict(weights_dict(weights_quantization_method="symmetric")), QCE,
             "weights_quantization_method must be one of", "got 'symmetric'"),
    BadInput("from-dict:candidate-with-unknown-key",
             lambda: config_from_dict(weights_dict(weights_quantization_candidates=[
                 {"n_bits": 4, "quantization_params": {"threshold": 1.0}, "extra": 1}])), QCE,
             "TrainableQuantizerCandidateConfig.from_dict got unknown keys", "['extra']"),
    BadInput("from-dict:kind-none", lambda: config_from_dict({"kind": None}), QCE,
             "config_from_dict: 'kind' must be one of ['activation', 'candidate', 'weights']", "got None"),
    BadInput("from-dict:bytes", lambda: config_from_dict(b"{}"), QCE,
             "config_from_dict expects a dict", "got b'{}' of type bytes"),
    BadInput("from-dict:activation-class-given-weights",
             lambda: TrainableQuantizerActivationConfig.from_dict(weights_dict()), QCE,
             "TrainableQuantizerActivationConfig.from_dict expects kind 'activation'", "got kind 'weights'"),
    # QATConfig.
    BadInput("qat-config:weight-init-array", lambda: QATConfig(weight_init=np.array(["mse", "mse"])), QCE,
             "weight_init must be one of ('max_abs', 'mse')", "got array(['mse', 'mse']"),
    BadInput("qat-config:activation-calibration-none", lambda: QATConfig(activation_calibration=None), QCE,
             "activation_calibration must be one of ('minmax', 'mse')", "got None"),
    BadInput("qat-config:min-threshold-negative-int-too-large", lambda: QATConfig(min_threshold=-HUGE), QCE,
             "min_threshold must be a finite number > 0", "got -1000000000"),
    BadInput("qat-config:layer-types-bytes", lambda: QATConfig(layer_types=b""), QCE,
             "layer_types must be None (the backend's defaults) or a list of layer class names", "got b''"),
    BadInput("qat-config:overrides-bytes", lambda: QATConfig(overrides=b""), QCE,
             "overrides must be a sequence of LayerOverride", "got b''"),
    BadInput("qat-config:training-method-list", lambda: QATConfig(weight_training_method=["STE"]), QCE,
             "weight_training_method must be a TrainingMethod member", "got ['STE']"),
    BadInput("qat-config:from-dict-override-skip-string",
             lambda: QATConfig.from_dict({"overrides": [{"pattern": "conv*", "skip": "no"}]}), QCE,
             "skip must be a bool", "got 'no'"),
    BadInput("qat-config:quantize-activations-string", lambda: QATConfig(quantize_activations="false"), QCE,
             "quantize_activations must be a bool", "got 'false'"),
    # LayerOverride.
    BadInput("layer-override:pattern-int", lambda: LayerOverride(pattern=5), QCE,
             "pattern must be a non-empty string", "got 5"),
    BadInput("layer-override:activation-n-bits-1", lambda: LayerOverride("conv*", activation_n_bits=1), QCE,
             "activation_n_bits must be an int in 2..16", "got 1"),
    BadInput("layer-override:method-by-name",
             lambda: LayerOverride("conv*", weight_quantization_method="POWER_OF_TWO"), QCE,
             "weight_quantization_method must be one of", "got 'POWER_OF_TWO'"),
    BadInput("layer-override:from-dict-unknown-key",
             lambda: LayerOverride.from_dict({"pattern": "conv*", "n_bits": 4}), QCE,
             "layer override has unknown keys", "['n_bits']"),
    BadInput("layer-override:per-channel-string", lambda: LayerOverride("conv*", weight_per_channel="yes"), QCE,
             "weight_per_channel must be a bool", "got 'yes'"),
    # LinearAnnealing.
    BadInput("linear-annealing:t-end-past-int64", lambda: LinearAnnealing(0, 2**64, 1.0, 0.0), QCE,
             "t_end must be an int >= 0", "got 18446744073709551616"),
    BadInput("linear-annealing:t-end-before-t-start", lambda: LinearAnnealing(10, 5, 1.0, 0.0), QCE,
             "t_end must be greater than t_start (10)", "got 5"),
    BadInput("linear-annealing:initial-value-int-too-large", lambda: LinearAnnealing(0, 10, HUGE, 0.0), QCE,
             "initial_value must be a finite number", "got 1000000000"),
    BadInput("linear-annealing:target-value-minus-inf", lambda: LinearAnnealing(0, 10, 1.0, float("-inf")), QCE,
             "target_value must be a finite number", "got -inf"),
    BadInput("linear-annealing:from-dict-missing-key",
             lambda: LinearAnnealing.from_dict({"t_start": 0, "t_end": 5, "initial_value": 1.0}), QCE,
             "LinearAnnealing.from_dict expects keys t_start, t_end, initial_value, target_value",
             "got {'t_start': 0, 't_end': 5, 'initial_value': 1.0}"),
    BadInput("linear-annealing:t-start-numpy-float", lambda: LinearAnnealing(np.float64(1.0), 10, 1.0, 0.0), QCE,
             "t_start must be an int >= 0", "got np.float64(1.0)"),
    # The resolver.
    BadInput("resolver:target-string",
             lambda: get_trainable_quantizer_class("Activation", TrainingMethod.STE, SYM,
                                                   pb.BasePytorchTrainableQuantizer), QCE,
             "quant_target must be QuantizationTarget.Weights or QuantizationTarget.Activation", "got 'Activation'"),
    BadInput("resolver:method-none",
             lambda: get_trainable_quantizer_class(QuantizationTarget.Weights, TrainingMethod.STE, None,
                                                   kb.BaseKerasTrainableQuantizer), QCE,
             "quant_method must be a QuantizationMethod member", "got None"),
    BadInput("resolver:identifier-list",
             lambda: get_trainable_quantizer_class(QuantizationTarget.Weights, ["STE"], SYM,
                                                   pb.BasePytorchTrainableQuantizer), QCE,
             "quantizer_id must be an enum member", "got ['STE']"),
    BadInput("resolver:identifier-empty-string",
             lambda: get_trainable_quantizer_class(QuantizationTarget.Activation, "", UNI,
                                                   kb.BaseKerasTrainableQuantizer), QCE,
             "quantizer_id must be an enum member (e.g. TrainingMethod.STE) or a non-empty string", "got ''"),
    BadInput("resolver:unknown-identifier",
             lambda: get_trainable_quantizer_class(QuantizationTarget.Activation, "NOT_A_METHOD", UNI,
                                                   pb.BasePytorchTrainableQuantizer), QuantizerNotFoundError,
             "No trainable quantizer for target Activation", "identifier 'NOT_A_METHOD'"),
    BadInput("resolver:base-object",
             lambda: get_trainable_quantizer_class(QuantizationTarget.Weights, TrainingMethod.STE, SYM, object), QCE,
             "quantizer_base_class must be a class derived from BaseTrainableQuantizer", "got <class 'object'>"),
    BadInput("resolver:keras-lsq-lut",
             lambda: get_trainable_quantizer_class(QuantizationTarget.Weights, TrainingMethod.LSQ,
                                                   QuantizationMethod.LUT_SYM_QUANTIZER,
                                                   kb.BaseKerasTrainableQuantizer), QuantizerNotFoundError,
             "identifier <TrainingMethod.LSQ", "method LUT_SYM_QUANTIZER"),
    # Quantizer construction.
    BadInput("quantizer:torch-weights-given-activation-config", lambda: pb.STESymmetricWeightQuantizer(acfg()), QCE,
             "STESymmetricWeightQuantizer quantizes Weights and needs a TrainableQuantizerWeightsConfig",
             "got TrainableQuantizerActivationConfig("),
    BadInput("quantizer:torch-lsq-uniform-given-symmetric", lambda: pb.LSQUniformWeightQuantizer(wcfg()), QCE,
             "LSQUniformWeightQuantizer supports quantization methods UNIFORM", "got SYMMETRIC in quantization_config"),
    BadInput("quantizer:torch-freeze-int",
             lambda: pb.STEUniformActivationQuantizer(uniform_acfg(), freeze_quant_params=1), QCE,
             "freeze_quant_params must be a bool", "got 1 of type int"),
    BadInput("quantizer:torch-from-config-string",
             lambda: pb.STEUniformWeightQuantizer.from_config({"quantization_config": "uniform"}), QCE,
             "STEUniformWeightQuantizer.from_config: 'quantization_config' must be a config dict", "got 'uniform'"),
    BadInput("quantizer:keras-given-config-dict", lambda: kb.STESymmetricWeightQuantizer(wcfg().to_dict()), QCE,
             "needs a TrainableQuantizerWeightsConfig as quantization_config", "got {'kind': 'weights'"),
    BadInput("quantizer:keras-activation-missing-threshold",
             lambda: kb.LSQSymmetricActivationQuantizer(acfg(activation_quantization_params={"is_signed": True})),
             QCE, "activation_quantization_params must contain 'threshold' for SYMMETRIC", "got keys ['is_signed']"),
    BadInput("quantizer:keras-freeze-string",
             lambda: kb.LSQSymmetricWeightQuantizer(wcfg(), freeze_quant_params="yes"), QCE,
             "freeze_quant_params must be a bool", "got 'yes'"),
    BadInput("quantizer:keras-from-config-unknown-key",
             lambda: kb.STESymmetricActivationQuantizer.from_config(
                 {"quantization_config": acfg().to_dict(), "bits": 4}), QCE,
             "STESymmetricActivationQuantizer.from_config got unknown keys", "['bits']"),
    # Wrappers and holders.
    BadInput("wrapper:torch-attribute-missing",
             lambda: pb.PytorchTrainableQuantizationWrapper(
                 nn.Linear(3, 4), {"kernel": pb.STESymmetricWeightQuantizer(wcfg())}), QCE,
             "weights_quantizers names 'kernel'", "its parameters are ['weight', 'bias']"),
    BadInput("wrapper:torch-quantizers-list",
             lambda: pb.PytorchTrainableQuantizationWrapper(nn.Linear(3, 4), [pb.STESymmetricWeightQuantizer(wcfg())]),
             QCE, "weights_quantizers must be a dict", "got [STESymmetricWeightQuantizer("),
    BadInput("wrapper:torch-holder-given-function", lambda: pb.PytorchTrainableActivationQuantizationHolder(torch.relu),
             QCE, "activation_quantizer must be a PyTorch trainable quantizer", "got <built-in method relu"),
    BadInput("wrapper:torch-holder-given-weights-quantizer",
             lambda: pb.PytorchTrainableActivationQuantizationHolder(pb.STESymmetricWeightQuantizer(wcfg())), QCE,
             "activation_quantizer must quantize Activation", "got STESymmetricWeightQuantizer"),
    BadInput("wrapper:keras-layer-string", lambda: kb.KerasTrainableQuantizationWrapper("dense", {}), QCE,
             "layer must be a Keras 3 layer", "got 'dense' of type str"),
    BadInput("wrapper:keras-holder-none", lambda: kb.KerasActivationQuantizationHolder(None), QCE,
             "activation_quantizer must be a Keras activation trainable quantizer", "got None"),
    BadInput("wrapper:keras-quantizer-string",
             lambda: kb.KerasTrainableQuantizationWrapper(keras.layers.Dense(3), {"kernel": "ste"}), QCE,
             "weights_quantizers['kernel'] must be a Keras weights trainable quantizer", "got 'ste'"),
    BadInput("wrapper:keras-key-int",
             lambda: kb.KerasTrainableQuantizationWrapper(
                 keras.layers.Dense(3), {0: kb.STESymmetricWeightQuantizer(wcfg())}), QCE,
             "weights_quantizers keys must be attribute names of the layer", "got 0"),
    # quantize_model.
    BadInput("quantize-model:torch-model-string", lambda: pb.quantize_model("resnet"), QCE,
             "model must be a torch.nn.Module", "got str 'resnet'"),
    BadInput("quantize-model:torch-data-int", lambda: pb.quantize_model(torch_float(), None, 64), QCE,
             "representative data must be an iterable of batches", "representative_data=64 of type int"),
    BadInput("quantize-model:torch-progress-string",
             lambda: pb.quantize_model(torch_float(), None, TORCH_DATA, progress="no"), QCE,
             "progress must be a bool", "got 'no'"),
    BadInput("quantize-model:torch-batches-bool",
             lambda: pb.quantize_model(torch_float(), None, TORCH_DATA, num_calibration_batches=True), QCE,
             "num_calibration_batches must be a positive int or None", "got True"),
    BadInput("quantize-model:torch-config-as-dict", lambda: pb.quantize_model(torch_float(), QATConfig().to_dict()),
             QCE, "qat_config must be a QATConfig", "got {'weight_training_method': 'STE'"),
    BadInput("quantize-model:keras-torch-layer-types",
             lambda: kb.quantize_model(keras_float(), QATConfig(layer_types=["Linear"])), QCE,
             "layer_types names ['Linear'], which the Keras backend cannot quantize", "supported: ['Conv1D'"),
    BadInput("quantize-model:keras-data-int", lambda: kb.quantize_model(keras_float(), None, 7), QCE,
             "representative data must be an array of samples or an iterable", "representative_data=7 of type int"),
    BadInput("quantize-model:keras-layer", lambda: kb.quantize_model(keras.layers.Dense(3)), QCE,
             "model must be a Keras 3 model", "got Dense <Dense name="),
    BadInput("quantize-model:keras-already-quantized", lambda: kb.quantize_model(keras_qat()), QCE,
             "is already quantized", "model 'float_mlp'"),
    # calibrate.
    BadInput("calibrate:torch-calibration-name",
             lambda: pb.calibrate(torch_qat(), TORCH_DATA, calibration="percentile", progress=False), QCE,
             "calibration must be one of ('minmax', 'mse')", "got 'percentile'"),
    BadInput("calibrate:torch-num-batches-string",
             lambda: pb.calibrate(torch_qat(), TORCH_DATA, "2", progress=False), QCE,
             "num_batches must be a positive int or None", "got '2'"),
    BadInput("calibrate:torch-data-none", lambda: pb.calibrate(torch_qat(), None, progress=False), QCE,
             "representative data must be an iterable of batches", "data=None of type NoneType"),
    BadInput("calibrate:torch-float-model", lambda: pb.calibrate(torch_float(), TORCH_DATA, progress=False), QCE,
             "model has no trainable activation quantizers", "this Sequential holds no"),
    BadInput("calibrate:torch-only-nan",
             lambda: pb.calibrate(torch_qat(), [torch.full((2, 4), float("nan"))], progress=False), QCE,
             "saw no finite value in 1 batch of representative data", "['input_1_activation_quantizer'"),
    BadInput("calibrate:keras-num-batches-float",
             lambda: kb.calibrate(keras_qat(), KERAS_DATA, 1.5, progress=False), QCE,
             "num_batches must be a positive int or None", "got 1.5"),
    BadInput("calibrate:keras-calibration-upper-case",
             lambda: kb.calibrate(keras_qat(), KERAS_DATA, calibration="MSE", progress=False), QCE,
             "calibration must be one of ('minmax', 'mse')", "got 'MSE'"),
    BadInput("calibrate:keras-float-model", lambda: kb.calibrate(keras_float(), KERAS_DATA, progress=False), QCE,
             "model has no trainable activation quantizers", "'float_mlp' holds no"),
    BadInput("calibrate:keras-data-dict", lambda: kb.calibrate(keras_qat(), {"x": KERAS_DATA}, progress=False), QCE,
             "representative data must be an array of samples or an iterable", "data={'x': array("),
    BadInput("calibrate:keras-model-none", lambda: kb.calibrate(None, KERAS_DATA), QCE,
             "model must be a Keras 3 model", "got NoneType None"),
    # Loading.
    BadInput("load:keras-missing-file", lambda: kb.keras_load_quantized_model("missing.keras"), TrainableInfraError,
             "path 'missing.keras'", "does not exist"),
    BadInput("load:keras-h5-file", lambda: load_file("model.h5", b"\x89HDF\r\n"), TrainableInfraError,
             "path must name a .keras file", "got 'model.h5'"),
    BadInput("load:keras-not-a-zip", lambda: load_file("model.keras", b"not a zip"), TrainableInfraError,
             "path 'model.keras'", "is not a .keras archive: the file is not a zip file"),
    BadInput("load:keras-zip-without-config", lambda: load_file("model.keras", members={"weights.txt": "1"}),
             TrainableInfraError, "path 'model.keras' could not be loaded as a Keras model", "'config.json'"),
    BadInput("load:keras-path-int", lambda: kb.keras_load_quantized_model(3), TrainableInfraError,
             "path must be a str or os.PathLike", "got 3"),
    BadInput("load:keras-custom-objects-list",
             lambda: kb.keras_load_quantized_model("m.keras", custom_objects=[kb.STESymmetricWeightQuantizer]), QCE,
             "custom_objects must be a dict", "got [<class "),
    BadInput("load:keras-compile-string", lambda: load_file("model.keras", b"x", compile="yes"), QCE,
             "compile must be a bool", "got 'yes'"),
    # Converting.
    BadInput("convert:torch-state-dict", lambda: pb.convert_to_inferable(torch_float().state_dict()), QCE,
             "model must be a torch.nn.Module", "got OrderedDict"),
    BadInput("convert:torch-float-model", lambda: pb.convert_to_inferable(torch_float()), QCE,
             "has no trainable quantization wrapper or holder", "Sequential"),
    BadInput("convert:torch-convert2inferable-returns-none",
             lambda: torch_convert_with(TorchQuantizerConvertingToNone(wcfg())), QuantizerDefinitionError,
             "TorchQuantizerConvertingToNone.convert2inferable() must return an mct-quantizers PyTorch inferable",
             "got None"),
    BadInput("convert:torch-nan-threshold",
             lambda: torch_convert_with(pb.LSQSymmetricWeightQuantizer(wcfg()), threshold=float("nan")),
             NonFiniteError, "LSQSymmetricWeightQuantizer cannot be converted", "its threshold is not finite ([nan"),
    BadInput("convert:keras-convert2inferable-returns-itself",
             lambda: kb.convert_to_inferable(keras_wrapped(KerasQuantizerConvertingToItself(
                 wcfg(weights_channels_axis=-1)))), QuantizerDefinitionError,
             "KerasQuantizerConvertingToItself.convert2inferable() must return an mct-quantizers Keras inferable",
             "got KerasQuantizerConvertingToItself("),
    BadInput("convert:keras-nan-range", keras_convert_with_nan_range, NonFiniteError,
             "STEUniformWeightQuantizer cannot be converted", "kernel_range_max is not finite ([nan"),
    BadInput("convert:keras-subclassed", lambda: kb.convert_to_inferable(KerasSubclassed()), QCE,
             "supports Sequential and Functional models", "'subclassed' is a subclassed model"),
    BadInput("convert:keras-layer", lambda: kb.convert_to_inferable(keras.layers.Dense(3)), QCE,
             "convert_to_inferable expects a Keras model", "got <Dense name="),
    BadInput("convert:keras-unbuilt", lambda: kb.convert_to_inferable(keras_unbuilt()), QCE,
             "is not built", "model 'unbuilt'"),
]

CATEGORIES = {
    "weights-config", "activation-config", "from-dict", "qat-config", "layer-override", "linear-annealing",
    "resolver", "quantizer", "wrapper", "quantize-model", "calibrate", "load", "convert",
}


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_raises_the_library_error_naming_argument_and_value(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the loading cases write their files here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # e.g. "no representative data": not what is tested here
        # The argument must be named as a whole word: "calibration" is not found inside "activation_calibration".
        with pytest.raises(case.error, match=r"(?<!\w)" + re.escape(case.names)) as caught:
            case.call()
    assert type(caught.value) is case.error, f"{case.id}: {type(caught.value).__name__}: {caught.value}"
    assert case.shows in str(caught.value), f"{case.id}: {case.shows!r} not in {caught.value}"


def test_the_matrix_keeps_at_least_40_distinct_cases_in_every_category():
    ids = [case.id for case in CASES]
    expectations = [(case.error, case.names, case.shows) for case in CASES]
    assert len(set(ids)) == len(ids), "duplicate case ids"
    assert len(set(expectations)) == len(expectations), "two cases expect the same error and message"
    assert len(CASES) >= 40
    assert {case.category for case in CASES} == CATEGORIES
