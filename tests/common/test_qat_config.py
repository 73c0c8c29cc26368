"""QATConfig and LayerOverride: defaults, validation, per-layer resolution, JSON round trip."""

import json
import re
from enum import Enum

import pytest

from trainable_infra import LayerOverride, QATConfig, QuantizationConfigError, QuantizationMethod, TrainingMethod


class MyMethod(Enum):
    PACT = "pact"


def test_defaults_follow_mct_names():
    config = QATConfig()
    assert config.weight_training_method is TrainingMethod.STE
    assert config.activation_training_method is TrainingMethod.STE
    assert config.weight_n_bits == 8
    assert config.activation_n_bits == 8
    assert config.weight_per_channel is True
    assert config.overrides == ()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weight_n_bits": 1}, "weight_n_bits must be an int in 2..16, got 1"),
        ({"activation_n_bits": "8"}, "activation_n_bits must be an int"),
        ({"weight_quantization_method": "SYMMETRIC"}, "weight_quantization_method must be one of"),
        ({"activation_quantization_method": 3}, "activation_quantization_method must be one of"),
        ({"weight_training_method": ""}, "weight_training_method must be a TrainingMethod member"),
        ({"activation_training_method": 1}, "activation_training_method must be a TrainingMethod member"),
        ({"weight_per_channel": 1}, "weight_per_channel must be a bool"),
        ({"quantize_activations": None}, "quantize_activations must be a bool"),
        ({"layer_types": "Conv2d"}, "layer_types must be None"),
        ({"layer_types": ["Conv2d", 3]}, "layer_types must be None"),
        ({"min_threshold": 0}, "min_threshold must be a finite number > 0"),
        ({"overrides": "conv*"}, "overrides must be a sequence of LayerOverride"),
        ({"overrides": {"conv*": 4}}, "overrides['conv*'] must be a dict of settings"),
        ({"overrides": {"conv*": {"bits": 4}}}, "unknown keys ['bits']"),
        ({"overrides": {"conv*": {"weight_n_bits": 40}}}, "weight_n_bits must be an int in 2..16, got 40"),
    ],
)
def test_bad_values_are_refused_naming_the_field(kwargs, message):
    with pytest.raises(QuantizationConfigError, match=re.escape(message)):
        QATConfig(**kwargs)


def test_layer_override_validates_pattern_and_skip():
    with pytest.raises(QuantizationConfigError, match="pattern must be a non-empty string"):
        LayerOverride(pattern="")
    with pytest.raises(QuantizationConfigError, match="skip must be a bool"):
        LayerOverride(pattern="x", skip="yes")


def test_for_layer_applies_matching_overrides_in_order():
    config = QATConfig(
        weight_n_bits=4,
        overrides=[
            LayerOverride("features.*", weight_n_bits=6, activation_quantization_method=QuantizationMethod.UNIFORM),
            LayerOverride("features.0", weight_n_bits=8),
            LayerOverride("head", skip=True),
        ],
    )
    first = config.for_layer("features.0")
    assert first.weight_n_bits == 8
    assert first.activation_quantization_method is QuantizationMethod.UNIFORM
    assert not first.skip
    assert config.for_layer("features.3").weight_n_bits == 6
    assert config.for_layer("classifier").weight_n_bits == 4
    assert config.for_layer("head").skip
    with pytest.raises(QuantizationConfigError, match="name must be a layer name"):
        config.for_layer(3)


def test_overrides_given_as_dict_equal_overrides_given_as_list():
    as_dict = QATConfig(overrides={"conv*": {"weight_n_bits": 4}, "fc": LayerOverride("ignored", skip=True)})
    as_list = QATConfig(overrides=[LayerOverride("conv*", weight_n_bits=4), LayerOverride("fc", skip=True)])
    assert as_dict == as_list


def test_json_round_trip():
    config = QATConfig(
        weight_training_method=TrainingMethod.LSQ,
        activation_quantization_method=QuantizationMethod.POWER_OF_TWO,
        weight_n_bits=4,
        weight_per_channel=False,
        layer_types=["Conv2d", "Linear"],
        overrides={"fc*": {"weight_n_bits": 8, "weight_training_method": "STE"}, "stem": {"skip": True}},
    )
    restored = QATConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config
    assert restored.overrides[0].weight_training_method is TrainingMethod.STE


def test_user_training_method_is_written_by_name():
    config = QATConfig(weight_training_method=MyMethod.PACT)
    data = json.loads(json.dumps(config.to_dict()))
    assert data["weight_training_method"] == "PACT"
    assert QATConfig.from_dict(data).weight_training_method == "PACT"


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ([], "QATConfig.from_dict expects a dict"),
        ({"bits": 8}, "unknown keys ['bits']"),
        ({"weight_quantization_method": "LUT"}, "weight_quantization_method must be one of"),
        ({"overrides": {"a": 1}}, "overrides must be a list of override dicts"),
        ({"overrides": [{"weight_n_bits": 4}]}, "layer override is missing 'pattern'"),
        ({"overrides": [3]}, "a layer override must be a dict"),
    ],
)
def test_from_dict_rejects_bad_payload(payload, message):
    with pytest.raises(QuantizationConfigError, match=re.escape(message)):
        QATConfig.from_dict(payload)


def test_config_is_immutable():
    config = QATConfig()
    with pytest.raises(AttributeError):
        config.weight_n_bits = 4
