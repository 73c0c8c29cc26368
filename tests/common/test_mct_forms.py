"""What code written for MCT's trainable infrastructure relies on, in the framework-neutral core: both
`__call__` forms, `quantizer_parameters` set as a dict, MCT's names, and a `get_config` that carries the values the
quantizer's variables hold (calibrated or trained)."""

import json

import numpy as np
import pytest

import trainable_infra
from tests.common.fake_quantizers import BaseNumpyTrainableQuantizer, NumpySTEWeightQuantizer, Variable
from tests.common.test_config import activation_config, weights_config
from trainable_infra import (
    QATConfig,
    QuantizationConfigError,
    QuantizationMethod,
    QuantizationTarget,
    QuantizerDefinitionError,
    TrainableQuantizerCandidateConfig,
    VariableGroup,
    mark_quantizer,
)
from trainable_infra.common.base_quantizer import BaseTrainableQuantizer, CallForm

ACTIVATIONS = mark_quantizer(QuantizationTarget.Activation, [QuantizationMethod.SYMMETRIC], "mct-forms")
UNIFORM_ACTIVATIONS = mark_quantizer(QuantizationTarget.Activation, [QuantizationMethod.UNIFORM], "mct-forms")


def _quantizer_class(call, initialize=None, decorator=ACTIVATIONS):
    def default_initialize(self, tensor_shape, name, layer):
        self.quantizer_parameters = {"threshold": layer.setdefault(f"{name}_threshold", Variable(4.0))}

    namespace = {
        "initialize_quantization": initialize or default_initialize,
        "__call__": call,
        "convert2inferable": lambda self: None,
    }
    return decorator(type("MCTFormQuantizer", (BaseNumpyTrainableQuantizer,), namespace))


def _calls(*arguments, **keywords):
    return {"args": arguments, "kwargs": keywords}


def test_call_without_training_flag_is_called_with_the_inputs_only():
    cls = _quantizer_class(lambda self, inputs: _calls(inputs))
    quantizer = cls(activation_config())
    assert quantizer.quantize_inputs("x", True) == _calls("x")
    assert quantizer.quantize_inputs("x", False) == _calls("x")
    assert BaseTrainableQuantizer._checked_classes[cls] is CallForm.NONE


@pytest.mark.parametrize(
    ("call", "form", "expected"),
    [
        (lambda self, inputs, training: _calls(inputs, training), CallForm.POSITIONAL, _calls("x", True)),
        (lambda self, inputs, training=False: _calls(inputs, training), CallForm.POSITIONAL, _calls("x", True)),
        (lambda self, inputs, *args: _calls(inputs, *args), CallForm.POSITIONAL, _calls("x", True)),
        (lambda self, inputs, *, training=False: _calls(inputs, training=training), CallForm.KEYWORD,
         _calls("x", training=True)),
        (lambda self, inputs, **kwargs: _calls(inputs, **kwargs), CallForm.KEYWORD, _calls("x", training=True)),
    ],
    ids=["positional", "positional-default", "var-positional", "keyword-only", "var-keyword"],
)
def test_call_with_training_flag_gets_it_as_declared(call, form, expected):
    cls = _quantizer_class(call)
    quantizer = cls(activation_config())
    assert quantizer.quantize_inputs("x", True) == expected
    assert BaseTrainableQuantizer._checked_classes[cls] is form


def test_call_form_is_decided_once_per_class(monkeypatch):
    cls = _quantizer_class(lambda self, inputs: inputs)
    first = cls(activation_config())
    # A class is inspected when its first instance is made; later instances and calls do not look again.
    monkeypatch.setattr("trainable_infra.common.base_quantizer.inspect.signature", None)
    second = cls(activation_config())
    assert first.quantize_inputs(1.0, True) == second.quantize_inputs(2.0, False) - 1.0


def test_call_without_inputs_is_refused_when_the_class_is_checked():
    cls = _quantizer_class(lambda self: None)
    with pytest.raises(QuantizerDefinitionError, match=r"__call__ must take the inputs as its first argument"):
        cls(activation_config())


def test_quantizer_parameters_as_a_dict_of_variables():
    quantizer = _quantizer_class(lambda self, inputs: inputs)(activation_config())
    layer = {}
    quantizer.initialize_quantization(None, "activation", layer)
    threshold = layer["activation_threshold"]
    assert quantizer.quantizer_parameters == {"threshold": threshold}  # as the user set it
    assert quantizer.get_quantizer_variable("threshold") is threshold
    assert quantizer.variables_in_group(VariableGroup.QPARAMS) == [threshold]
    assert quantizer.variables_in_group(VariableGroup.WEIGHTS) == []
    assert quantizer.get_trainable_variables(VariableGroup.QPARAMS) == [threshold]
    assert quantizer.parameter_variable("threshold") is threshold


def test_quantizer_parameters_in_mct_var_group_form():
    def initialize(self, tensor_shape, name, layer):
        self.quantizer_parameters = {
            "alpha": {"var": Variable(1.0), "group": VariableGroup.WEIGHTS},
            "threshold": Variable(2.0),
        }

    quantizer = _quantizer_class(lambda self, inputs: inputs, initialize)(activation_config())
    quantizer.initialize_quantization(None, "activation", {})
    groups = {name: entry.group for name, entry in quantizer.registered_variables().items()}
    assert groups == {"alpha": VariableGroup.WEIGHTS, "threshold": VariableGroup.QPARAMS}
    frozen = _quantizer_class(lambda self, inputs: inputs, initialize)(activation_config(), freeze_quant_params=True)
    frozen.initialize_quantization(None, "activation", {})
    assert frozen.variables_in_group(VariableGroup.QPARAMS) == []


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"threshold": None}, r"quantizer_parameters\['threshold'\] must be a variable of the quantizer's layer"),
        ({"threshold": 4.0}, r"quantizer_parameters\['threshold'\] must be a variable .* got 4.0"),
        ({"t": {"var": Variable(1.0)}}, r"quantizer_parameters\['t'\] must be .*'group': VariableGroup"),
        ({"t": {"var": Variable(1.0), "group": "qparams"}}, r"quantizer_parameters\['t'\] must be"),
        ([Variable(1.0)], r"quantizer_parameters must be a dict \{name: variable\}"),
    ],
    ids=["none", "float", "no-group", "group-not-enum", "list"],
)
def test_bad_quantizer_parameters_are_named(parameters, message):
    def initialize(self, tensor_shape, name, layer):
        self.quantizer_parameters = parameters

    quantizer = _quantizer_class(lambda self, inputs: inputs, initialize)(activation_config())
    quantizer.initialize_quantization(None, "activation", {})
    with pytest.raises(QuantizationConfigError, match=message):
        quantizer.variables_in_group(VariableGroup.QPARAMS)


def test_mct_constant_names():
    assert (trainable_infra.THRESHOLD, trainable_infra.RANGE_MIN, trainable_infra.RANGE_MAX) == (
        "threshold", "range_min", "range_max")
    assert trainable_infra.SIGNED == trainable_infra.IS_SIGNED == "is_signed"
    assert trainable_infra.MIN_THRESHOLD == 2.0**-16 == QATConfig().min_threshold


def test_mct_candidate_names_alias_ours():
    candidates = [TrainableQuantizerCandidateConfig(4, {"threshold": 1.0})]
    weights = weights_config(weights_quantization_candidates=candidates)
    assert weights.weights_bits_candidates is weights.weights_quantization_candidates
    weights.weights_bits_candidates = None
    assert weights.weights_quantization_candidates is None
    activations = activation_config(activation_quantization_candidates=candidates)
    assert activations.activation_bits_candidates == candidates
    with pytest.raises(QuantizationConfigError, match="activation_bits_candidates must be None or a list"):
        activations.activation_bits_candidates = [4, 8]
    assert activations.activation_bits_candidates == candidates  # unchanged by the refused value


# --- get_config carries the variables' values -------------------------------------------------------------


def _calibrated_weights_quantizer(**config_overrides):
    quantizer = NumpySTEWeightQuantizer(weights_config(**config_overrides))
    layer = {}
    quantizer.initialize_quantization((3, 2), "kernel", layer)
    return quantizer, layer["kernel_threshold"]


def test_get_config_holds_the_values_the_variables_hold():
    quantizer, threshold = _calibrated_weights_quantizer()
    assert quantizer.get_config()["quantization_config"] == quantizer.quantization_config.to_dict()  # unmoved
    threshold.value = np.array([0.25, 3.0, 1.5], dtype=np.float32)
    config = json.loads(json.dumps(quantizer.get_config()))
    assert config["quantization_config"]["weights_quantization_params"]["threshold"] == [0.25, 3.0, 1.5]
    rebuilt = NumpySTEWeightQuantizer.from_config(config)
    layer = {}
    rebuilt.initialize_quantization((3, 2), "kernel", layer)
    np.testing.assert_array_equal(layer["kernel_threshold"].value, threshold.value)
    x = np.linspace(-4, 4, 6, dtype=np.float32).reshape(3, 2)
    np.testing.assert_array_equal(rebuilt(x, False), quantizer(x, False))
    # The quantizer's own config is what it was built with until `calibrate` writes the new values back.
    assert quantizer.quantization_config == weights_config()


def test_get_config_keeps_the_broadcast_shape_the_config_was_given_in():
    quantizer, threshold = _calibrated_weights_quantizer(
        weights_quantization_params={"threshold": np.array([[0.5], [1.0], [2.0]])})
    threshold.value = np.array([1.0, 1.0, 1.0], dtype=np.float32)
    params = quantizer.current_quantization_config().weights_quantization_params
    np.testing.assert_array_equal(params["threshold"], [[1.0], [1.0], [1.0]])


def test_get_config_writes_a_threshold_under_min_threshold_as_min_threshold():
    quantizer, threshold = _calibrated_weights_quantizer(min_threshold=0.125)
    threshold.value = np.array([-1.0, 0.0, 2.0], dtype=np.float32)  # training went below the smallest threshold
    params = quantizer.current_quantization_config().weights_quantization_params
    np.testing.assert_array_equal(params["threshold"], [0.125, 0.125, 2.0])


def test_get_config_leaves_non_finite_values_out():
    quantizer, threshold = _calibrated_weights_quantizer()
    threshold.value = np.array([np.nan, 1.0, 2.0], dtype=np.float32)
    assert quantizer.current_quantization_config() is quantizer.quantization_config


def _uniform_activation_quantizer(low, high):
    def initialize(self, tensor_shape, name, layer):
        self.add_quantizer_variable("range_min", Variable(low), VariableGroup.QPARAMS)
        self.add_quantizer_variable("range_max", Variable(high), VariableGroup.QPARAMS)

    cls = _quantizer_class(lambda self, inputs: inputs, initialize, UNIFORM_ACTIVATIONS)
    quantizer = cls(activation_config(
        activation_quantization_method=QuantizationMethod.UNIFORM,
        activation_quantization_params={"range_min": -1.0, "range_max": 1.0},
        min_threshold=0.5,
    ))
    quantizer.initialize_quantization(None, "activation", {})
    return quantizer


def test_get_config_writes_a_range_training_inverted_as_the_range_the_grid_spans():
    moved = _uniform_activation_quantizer(-2.0, 3.0).current_quantization_config().activation_quantization_params
    assert (moved["range_min"], moved["range_max"]) == (-2.0, 3.0)
    inverted = _uniform_activation_quantizer(0.25, -0.5).current_quantization_config()
    params = inverted.activation_quantization_params
    # The grid widens the range to contain 0 and to at least min_threshold (DESIGN.md §4).
    assert (params["range_min"], params["range_max"]) == (0.0, 0.5)
