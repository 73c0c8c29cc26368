"""Quantizer configs: validation at construction, JSON round trips, value equality, repr."""

import copy
import json
import re

import numpy as np
import pytest

from trainable_infra import (
    QuantizationConfigError,
    QuantizationMethod,
    TrainableQuantizerActivationConfig,
    TrainableQuantizerCandidateConfig,
    TrainableQuantizerWeightsConfig,
    config_from_dict,
)

SYM = QuantizationMethod.SYMMETRIC


def weights_config(**overrides):
    kwargs = {
        "weights_quantization_method": SYM,
        "weights_n_bits": 8,
        "weights_quantization_params": {"threshold": np.array([0.5, 1.0, 2.0])},
        "enable_weights_quantization": True,
        "weights_channels_axis": 0,
        "weights_per_channel_threshold": True,
        "min_threshold": 1e-8,
    }
    kwargs.update(overrides)
    return TrainableQuantizerWeightsConfig(**kwargs)


def activation_config(**overrides):
    kwargs = {
        "activation_quantization_method": SYM,
        "activation_n_bits": 8,
        "activation_quantization_params": {"threshold": 4.0, "is_signed": False},
        "enable_activation_quantization": True,
        "min_threshold": 1e-8,
    }
    kwargs.update(overrides)
    return TrainableQuantizerActivationConfig(**kwargs)


def json_round_trip(config):
    return config_from_dict(json.loads(json.dumps(config.to_dict())))


# --- validation -------------------------------------------------------------------------------------------

def _stable_repr(value: object) -> str:
    """repr without memory addresses, so that every process collects the same test ids."""
    return re.sub(r" at 0x[0-9a-f]+", "", repr(value))


WEIGHTS_BAD = [
    ("weights_quantization_method", "SYMMETRIC", "weights_quantization_method"),
    ("weights_quantization_method", 2, "weights_quantization_method"),
    ("weights_n_bits", 1, "weights_n_bits must be an int in 2..16, got 1"),
    ("weights_n_bits", 17, "got 17"),
    ("weights_n_bits", 8.0, "weights_n_bits must be an int"),
    ("weights_n_bits", True, "weights_n_bits must be an int"),
    ("weights_quantization_params", [("threshold", 1.0)], "weights_quantization_params must be a dict"),
    ("weights_quantization_params", {"threshold": 0.0}, "must be > 0"),
    ("weights_quantization_params", {"threshold": -1.0}, "must be > 0"),
    ("weights_quantization_params", {"threshold": float("nan")}, "must be finite"),
    ("weights_quantization_params", {"threshold": [1.0, float("inf")]}, "must be finite"),
    ("weights_quantization_params", {"threshold": "1.0"}, "must be a number or an array"),
    ("weights_quantization_params", {"threshold": []}, "non-empty array"),
    ("weights_quantization_params", {"threshold": [[1.0], [1.0, 2.0]]}, "rectangular"),
    ("weights_quantization_params", {"threshold": True}, "must be a number or an array"),
    ("weights_quantization_params", {"range_min": 1.0, "range_max": 1.0}, "range_min must be < range_max"),
    ("weights_quantization_params", {"range_min": [0.0, 2.0], "range_max": [1.0, 1.0]}, "range_min must be <"),
    ("weights_quantization_params", {"range_min": [0.0, 0.0], "range_max": [1.0, 1.0, 1.0]}, "incompatible shapes"),
    ("weights_quantization_params", {"is_signed": 1}, "is_signed'] must be a bool"),
    ("weights_quantization_params", {1: 2.0}, "keys must be strings"),
    ("weights_quantization_params", {"extra": object()}, "extra"),
    ("enable_weights_quantization", 1, "enable_weights_quantization must be a bool"),
    ("weights_channels_axis", 1.0, "weights_channels_axis must be an int"),
    ("weights_channels_axis", None, "weights_channels_axis must be an int when weights_per_channel_threshold"),
    ("weights_per_channel_threshold", "yes", "weights_per_channel_threshold must be a bool"),
    ("min_threshold", 0.0, "min_threshold must be a finite number > 0"),
    ("min_threshold", float("inf"), "min_threshold"),
    ("min_threshold", "1e-8", "min_threshold"),
    ("weights_quantization_candidates", [{"n_bits": 4}], "weights_quantization_candidates must be None or a list"),
]


@pytest.mark.parametrize(
    ("field", "value", "message"), WEIGHTS_BAD, ids=[f"{f}={_stable_repr(v)}" for f, v, _ in WEIGHTS_BAD]
)
def test_weights_config_rejects_bad_value_naming_it(field, value, message):
    with pytest.raises(QuantizationConfigError, match=re.escape(message)) as info:
        weights_config(**{field: value})
    assert field in str(info.value)


def test_per_tensor_weights_config_rejects_several_thresholds():
    with pytest.raises(QuantizationConfigError, match=r"one value for per-tensor.*got 3 values"):
        weights_config(weights_per_channel_threshold=False)


ACTIVATION_BAD = [
    ("activation_quantization_method", None, "activation_quantization_method"),
    ("activation_n_bits", 0, "activation_n_bits must be an int in 2..16, got 0"),
    ("activation_quantization_params", {"threshold": [1.0, 2.0]}, "one value for per-tensor"),
    ("activation_quantization_params", None, "activation_quantization_params must be a dict"),
    ("enable_activation_quantization", None, "enable_activation_quantization must be a bool"),
    ("min_threshold", -1, "min_threshold must be a finite number > 0"),
]


@pytest.mark.parametrize(
    ("field", "value", "message"), ACTIVATION_BAD, ids=[f"{f}={_stable_repr(v)}" for f, v, _ in ACTIVATION_BAD]
)
def test_activation_config_rejects_bad_value_naming_it(field, value, message):
    with pytest.raises(QuantizationConfigError, match=re.escape(message)):
        activation_config(**{field: value})


def test_candidate_config_validates_its_fields():
    with pytest.raises(QuantizationConfigError, match=r"n_bits must be an int in 2\.\.16, got 20"):
        TrainableQuantizerCandidateConfig(20, {"threshold": 1.0})
    with pytest.raises(QuantizationConfigError, match="quantization_params must be a dict"):
        TrainableQuantizerCandidateConfig(4, 1.0)


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError, match="weights_n_bits"):
        weights_config(weights_n_bits=99)


def test_per_tensor_weights_may_omit_channel_axis():
    config = weights_config(
        weights_channels_axis=None, weights_per_channel_threshold=False, weights_quantization_params={"threshold": 2.0}
    )
    assert config.weights_channels_axis is None


def test_constructor_copies_params_and_does_not_mutate_them():
    threshold = np.array([0.5, 1.0, 2.0])
    params = {"threshold": threshold, "note": [1, 2]}
    snapshot = copy.deepcopy(params)
    config = weights_config(weights_quantization_params=params)
    threshold[0] = 99.0
    params["note"].append(3)
    assert config.weights_quantization_params["threshold"][0] == 0.5
    assert config.weights_quantization_params["note"] == [1, 2]
    assert snapshot["note"] == [1, 2]


def test_scalar_params_are_stored_as_floats_and_arrays_as_float64():
    config = weights_config(
        weights_quantization_params={"threshold": [1, 2, 3], "range_min": np.float32(-1), "range_max": 2}
    )
    params = config.weights_quantization_params
    assert params["threshold"].dtype == np.float64
    assert isinstance(params["range_min"], float)
    assert isinstance(params["range_max"], float)


# --- serialization ----------------------------------------------------------------------------------------

CONFIGS = {
    "weights_per_channel": lambda: weights_config(),
    "weights_mct_broadcast_shape": lambda: weights_config(
        weights_quantization_params={"threshold": np.ones((3, 1, 1, 1))}
    ),
    "weights_uniform": lambda: weights_config(
        weights_quantization_method=QuantizationMethod.UNIFORM,
        weights_quantization_params={"range_min": [-1.0, -2.0, 0.0], "range_max": [1.0, 0.5, 3.0]},
    ),
    "weights_with_candidates": lambda: weights_config(
        weights_quantization_candidates=[
            TrainableQuantizerCandidateConfig(4, {"threshold": np.array([1.0, 2.0, 3.0])}),
            TrainableQuantizerCandidateConfig(2, {"threshold": 1.5}),
        ]
    ),
    "activation_pot": lambda: activation_config(activation_quantization_method=QuantizationMethod.POWER_OF_TWO),
    "activation_uniform_extra_key": lambda: activation_config(
        activation_quantization_method=QuantizationMethod.UNIFORM,
        activation_quantization_params={"range_min": -1.0, "range_max": 6.0, "note": "relu6"},
    ),
    "candidate": lambda: TrainableQuantizerCandidateConfig(3, {"threshold": [0.25], "is_signed": True}),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_json_round_trip_gives_an_equal_config(name):
    config = CONFIGS[name]()
    restored = json_round_trip(config)
    assert type(restored) is type(config)
    assert restored == config
    assert restored.to_dict() == config.to_dict()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_to_dict_is_plain_json_with_enums_by_name(name):
    d = CONFIGS[name]().to_dict()
    text = json.dumps(d)  # raises on numpy arrays or enums
    assert "QuantizationMethod" not in text
    method_keys = [k for k in d if k.endswith("quantization_method")]
    for key in method_keys:
        assert d[key] in QuantizationMethod.__members__


def test_from_dict_of_each_class_and_config_from_dict_agree():
    config = weights_config()
    assert TrainableQuantizerWeightsConfig.from_dict(config.to_dict()) == config_from_dict(config.to_dict())


def test_equality_compares_arrays_elementwise_and_shape():
    assert weights_config() == weights_config()
    assert weights_config() != weights_config(weights_quantization_params={"threshold": np.array([0.5, 1.0, 2.5])})
    assert weights_config() != weights_config(weights_quantization_params={"threshold": np.array([[0.5, 1.0, 2.0]])})
    assert weights_config() != activation_config()


def test_repr_names_class_and_every_field():
    text = repr(weights_config())
    assert text.startswith("TrainableQuantizerWeightsConfig(")
    assert "QuantizationMethod.SYMMETRIC" in text
    assert "'threshold': array([0.5, 1.0, 2.0])" in text
    for field in TrainableQuantizerWeightsConfig._FIELDS:
        assert f"{field}=" in text


FROM_DICT_BAD = [
    ("not a dict", [1, 2], "expects a dict"),
    ("unknown kind", {"kind": "bias"}, "'kind' must be one of"),
    ("missing kind", {"activation_n_bits": 8}, "'kind' must be one of"),
    ("unknown key", {**activation_config().to_dict(), "bits": 8}, "unknown keys ['bits']"),
    ("missing key", {"kind": "activation", "activation_n_bits": 8}, "missing keys"),
    ("method name", {**activation_config().to_dict(), "activation_quantization_method": "LSQ"}, "'LSQ'"),
    ("candidates not list", {**weights_config().to_dict(), "weights_quantization_candidates": 3}, "candidate"),
    (
        "nested junk",
        {**weights_config().to_dict(), "weights_quantization_params": {"threshold": [[1], 2]}},
        "rectangular",
    ),
]


@pytest.mark.parametrize(("case", "payload", "message"), FROM_DICT_BAD, ids=[c for c, _, _ in FROM_DICT_BAD])
def test_config_from_dict_rejects_bad_payload(case, payload, message):
    with pytest.raises(QuantizationConfigError, match=re.escape(message)):
        config_from_dict(payload)


def test_class_from_dict_rejects_other_kind():
    with pytest.raises(QuantizationConfigError, match="expects kind 'weights', got kind 'activation'"):
        TrainableQuantizerWeightsConfig.from_dict(activation_config().to_dict())
