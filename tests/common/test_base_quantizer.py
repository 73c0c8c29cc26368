"""BaseTrainableQuantizer: class-definition checks, config checks, variable registry, get_config."""

import copy
import json

import numpy as np
import pytest

from tests.common.fake_quantizers import (
    BaseNumpyTrainableQuantizer,
    NumpyPACTActivationQuantizer,
    NumpySTEWeightQuantizer,
)
from tests.common.test_config import activation_config, weights_config
from trainable_infra import (
    QuantizationConfigError,
    QuantizationMethod,
    QuantizationTarget,
    QuantizerDefinitionError,
    TrainableInfraError,
    TrainingMethod,
    VariableGroup,
    mark_quantizer,
)


def _define(decorator=None, init=None, implement=True):
    """Define a quantizer class on the fly (decorated or not, with a given __init__)."""
    namespace = {}
    if implement:
        namespace.update(
            initialize_quantization=lambda self, shape, name, layer: None,
            __call__=lambda self, inputs, training: inputs,
            convert2inferable=lambda self: None,
        )
    if init is not None:
        namespace["__init__"] = init
    cls = type("OnTheFlyQuantizer", (BaseNumpyTrainableQuantizer,), namespace)
    return decorator(cls) if decorator else cls


WEIGHTS_STE = mark_quantizer(
    quantization_target=QuantizationTarget.Weights,
    quantization_method=[QuantizationMethod.SYMMETRIC],
    identifier="on-the-fly",
)


def test_undecorated_class_is_refused():
    cls = _define()
    with pytest.raises(QuantizerDefinitionError, match="must be decorated with @mark_quantizer"):
        cls(weights_config())


def test_subclass_of_decorated_class_must_be_decorated_itself():
    class Child(NumpySTEWeightQuantizer):
        pass

    with pytest.raises(QuantizerDefinitionError, match="Child must be decorated"):
        Child(weights_config())


@pytest.mark.parametrize(
    ("methods", "identifier", "message"),
    [
        ([], "x", "non-empty list of QuantizationMethod"),
        (QuantizationMethod.SYMMETRIC, "x", "non-empty list of QuantizationMethod"),
        (["SYMMETRIC"], "x", "non-empty list of QuantizationMethod"),
        ([QuantizationMethod.SYMMETRIC], None, "identifier must be"),
    ],
)
def test_bad_mark_quantizer_arguments_are_refused(methods, identifier, message):
    decorator = mark_quantizer(QuantizationTarget.Weights, methods, identifier)
    with pytest.raises(QuantizerDefinitionError, match=message):
        _define(decorator)(weights_config())


def test_class_missing_abstract_methods_is_refused_with_library_error():
    cls = _define(WEIGHTS_STE, implement=False)
    with pytest.raises(QuantizerDefinitionError, match=r"abstract methods \['__call__', 'convert2inferable'"):
        cls(weights_config())


def _init_without_default(self, quantization_config, bits):
    super(type(self), self).__init__(quantization_config)


def _init_with_star_args(self, quantization_config, *args):
    super(type(self), self).__init__(quantization_config)


def _init_keyword_only_config(self, *, quantization_config=None):
    super(type(self), self).__init__(quantization_config)


@pytest.mark.parametrize(
    ("init", "message"),
    [
        (_init_without_default, "'bits' has none"),
        (_init_with_star_args, "'args' has none"),
        (_init_keyword_only_config, "must take the quantization config as its first argument"),
    ],
)
def test_init_signature_must_be_config_then_defaults(init, message):
    with pytest.raises(QuantizerDefinitionError, match=message):
        _define(WEIGHTS_STE, init=init)(weights_config())


def test_definition_error_is_a_type_error_and_library_error():
    with pytest.raises(TypeError):
        _define()(weights_config())
    assert issubclass(QuantizerDefinitionError, TrainableInfraError)


def test_class_checks_run_once_per_class(monkeypatch):
    from trainable_infra.common import base_quantizer

    calls = []
    original = base_quantizer.check_quantizer_class
    cls = _define(WEIGHTS_STE)
    monkeypatch.setattr(base_quantizer, "check_quantizer_class", lambda c: (calls.append(c), original(c)))
    for _ in range(3):
        cls(weights_config())
    assert calls == [cls]


def test_config_of_the_wrong_kind_is_refused():
    with pytest.raises(QuantizationConfigError, match="quantizes Weights and needs a TrainableQuantizerWeightsConfig"):
        NumpySTEWeightQuantizer(activation_config())
    with pytest.raises(QuantizationConfigError, match="needs a TrainableQuantizerActivationConfig"):
        NumpyPACTActivationQuantizer(weights_config())


def test_config_method_not_declared_is_refused():
    config = weights_config(
        weights_quantization_method=QuantizationMethod.UNIFORM,
        weights_quantization_params={"range_min": -1.0, "range_max": 1.0},
    )
    message = "supports quantization methods SYMMETRIC, POWER_OF_TWO, got UNIFORM"
    with pytest.raises(QuantizationConfigError, match=message):
        NumpySTEWeightQuantizer(config)


def test_freeze_quant_params_must_be_bool():
    with pytest.raises(QuantizationConfigError, match="freeze_quant_params must be a bool, got 'no'"):
        NumpySTEWeightQuantizer(weights_config(), freeze_quant_params="no")


def uniform_activation_config(**overrides):
    return activation_config(
        activation_quantization_method=QuantizationMethod.UNIFORM,
        activation_quantization_params={"range_min": 0.0, "range_max": 6.0},
        **overrides,
    )


def test_variables_are_registered_and_grouped():
    quantizer = NumpyPACTActivationQuantizer(uniform_activation_config())
    quantizer.initialize_quantization((None, 4), "act", {})
    assert quantizer.get_quantizer_variable("alpha").value == 6.0
    assert quantizer.variables_in_group(VariableGroup.WEIGHTS) == []
    assert [v.value.item() for v in quantizer.variables_in_group(VariableGroup.QPARAMS)] == [6.0, 1.0]
    assert [v.value.item() for v in quantizer.get_trainable_variables(VariableGroup.QPARAMS)] == [6.0]


def test_freeze_quant_params_hides_qparams_from_training():
    quantizer = NumpyPACTActivationQuantizer(uniform_activation_config(), freeze_quant_params=True)
    quantizer.initialize_quantization((None, 4), "act", {})
    assert quantizer.get_trainable_variables(VariableGroup.QPARAMS) == []
    assert len(quantizer.variables_in_group(VariableGroup.WEIGHTS)) == 0


def test_unknown_variable_and_bad_registration_raise_library_errors():
    quantizer = NumpyPACTActivationQuantizer(uniform_activation_config())
    quantizer.initialize_quantization((None, 4), "act", {})
    with pytest.raises(TrainableInfraError, match=r"no quantizer variable 'beta'; it has \['alpha', 'frozen'\]"):
        quantizer.get_quantizer_variable("beta")
    with pytest.raises(QuantizationConfigError, match="group must be a VariableGroup member, got 'qparams'"):
        quantizer.add_quantizer_variable("x", 1.0, "qparams")
    with pytest.raises(QuantizationConfigError, match="name must be a non-empty string, got ''"):
        quantizer.add_quantizer_variable("", 1.0)
    with pytest.raises(QuantizationConfigError, match="group must be a VariableGroup member"):
        quantizer.get_trainable_variables("weights")


def test_target_queries():
    weights = NumpySTEWeightQuantizer(weights_config())
    assert weights.weights_quantization()
    assert not weights.activation_quantization()
    activations = NumpyPACTActivationQuantizer(uniform_activation_config(enable_activation_quantization=False))
    assert not activations.activation_quantization()
    assert not activations.weights_quantization()


def test_get_config_is_json_and_from_config_rebuilds_an_equal_quantizer():
    quantizer = NumpySTEWeightQuantizer(weights_config(), scale=0.5)
    config = quantizer.get_config()
    assert config == {
        "quantization_config": weights_config().to_dict(),
        "freeze_quant_params": False,
        "scale": 0.5,
    }
    rebuilt = NumpySTEWeightQuantizer.from_config(json.loads(json.dumps(config)))
    assert rebuilt.quantization_config == quantizer.quantization_config
    assert rebuilt.scale == 0.5
    assert rebuilt.get_config() == config


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ([], "from_config expects a dict"),
        ({"freeze_quant_params": True}, "missing key 'quantization_config'"),
        ({"quantization_config": weights_config().to_dict(), "bits": 3}, r"unknown keys \['bits'\]"),
        ({"quantization_config": {"kind": "nope"}}, "'kind' must be one of"),
    ],
)
def test_from_config_rejects_bad_payload(payload, message):
    with pytest.raises(QuantizationConfigError, match=message):
        NumpySTEWeightQuantizer.from_config(payload)


def test_quantizer_works_end_to_end_and_deepcopies():
    quantizer = NumpySTEWeightQuantizer(weights_config())
    layer = {}
    quantizer.initialize_quantization((3, 2), "kernel", layer)
    x = np.array([[0.3, -5.0], [0.26, 0.9], [1.3, 7.0]], dtype=np.float32)
    out = quantizer(x, training=True)
    assert out.shape == x.shape
    assert np.all(np.abs(out) <= np.array([[0.5], [1.0], [2.0]]))
    clone = copy.deepcopy(quantizer)
    assert clone.get_config() == quantizer.get_config()
    assert TrainingMethod.STE is type(quantizer).identifier


def test_class_marked_for_the_other_target_than_its_base_is_refused():
    class WeightsOnlyBase(BaseNumpyTrainableQuantizer):
        base_quantization_target = QuantizationTarget.Weights

    marker = mark_quantizer(QuantizationTarget.Activation, [QuantizationMethod.SYMMETRIC], "x")
    cls = marker(type("Mismarked", (WeightsOnlyBase,), {
        "initialize_quantization": lambda self, shape, name, layer: None,
        "__call__": lambda self, inputs, training: inputs,
        "convert2inferable": lambda self: None,
    }))
    with pytest.raises(QuantizerDefinitionError, match="derives from a base for Weights quantizers"):
        cls(activation_config())
