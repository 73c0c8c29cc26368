"""Fuzzing of config dicts and quantizer `from_config` payloads.

Each property starts from valid `to_dict()` / `get_config()` outputs, mutates them (a field replaced by junk, a key
deleted, an extra key, special numbers, nesting) and checks the one promise: the library either builds the object or
raises one of its own exceptions, and what it builds survives a strict-JSON round trip unchanged. The regression
tests at the end pin the bugs found this way and while writing these tests.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Callable
from enum import Enum
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import trainable_infra.keras_backend as kb
import trainable_infra.pytorch_backend as pb
from trainable_infra import (
    LayerOverride,
    LinearAnnealing,
    QATConfig,
    QuantizationConfigError,
    QuantizationMethod,
    QuantizationTarget,
    TrainableInfraError,
    TrainableQuantizerActivationConfig,
    TrainableQuantizerCandidateConfig,
    TrainableQuantizerWeightsConfig,
    TrainingMethod,
    config_from_dict,
    get_trainable_quantizer_class,
)

SYM, POT, UNI = QuantizationMethod.SYMMETRIC, QuantizationMethod.POWER_OF_TWO, QuantizationMethod.UNIFORM
HUGE = 10**400  # an int no float holds
# deadline=None: per-example time varies on a shared machine. Each property sets its own max_examples, so the
# default run tries 1,800 examples in all (600 + 600 + 300 + 300), whatever hypothesis profile is loaded.
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# --- valid starting points ----------------------------------------------------------------------------------------


def weights(method: QuantizationMethod, params: dict, axis: int | None = 0, per_channel: bool = True,
            **kwargs: Any) -> TrainableQuantizerWeightsConfig:
    return TrainableQuantizerWeightsConfig(method, 8, params, True, axis, per_channel, 2.0**-16, **kwargs)


def activation(method: QuantizationMethod, params: dict, n_bits: int = 8) -> TrainableQuantizerActivationConfig:
    return TrainableQuantizerActivationConfig(method, n_bits, params, True, 2.0**-16)


SYMMETRIC_WEIGHTS = weights(SYM, {"threshold": [0.5, 1.0, 2.0]})
UNIFORM_WEIGHTS = weights(UNI, {"range_min": np.full((1, 1, 1, 3), -1.0), "range_max": np.ones((1, 1, 1, 3))}, -1)
SYMMETRIC_ACTIVATION = activation(POT, {"threshold": 4.0, "is_signed": True})
UNIFORM_ACTIVATION = activation(UNI, {"range_min": -2.0, "range_max": 6.0}, n_bits=4)
CONFIGS = [
    SYMMETRIC_WEIGHTS,
    UNIFORM_WEIGHTS,
    weights(POT, {"threshold": 1.5, "note": ["a", 1, [2.0, None]]}, axis=None, per_channel=False),
    weights(SYM, {"threshold": [1.0, 1.0]}, weights_quantization_candidates=[
        TrainableQuantizerCandidateConfig(4, {"threshold": [1.0, 1.0]}),
        TrainableQuantizerCandidateConfig(2, {"threshold": 0.5}),
    ]),
    SYMMETRIC_ACTIVATION,
    UNIFORM_ACTIVATION,
    TrainableQuantizerActivationConfig(SYM, 16, {"threshold": 1.0, "is_signed": False}, False, 1e-3),
    TrainableQuantizerCandidateConfig(3, {"range_min": [-1.0, 0.0], "range_max": [1.0, 2.0]}),
]
CONFIG_SEEDS = [config.to_dict() for config in CONFIGS]


def quantizer_seeds() -> list[tuple[type, dict[str, Any]]]:
    """(class, get_config()) of each of the eight built-in quantizer classes of each backend."""
    seeds = []
    for backend in (kb, pb):
        for training in ("STE", "LSQ"):
            for kind, config in (("SymmetricWeight", SYMMETRIC_WEIGHTS), ("UniformWeight", UNIFORM_WEIGHTS),
                                 ("SymmetricActivation", SYMMETRIC_ACTIVATION),
                                 ("UniformActivation", UNIFORM_ACTIVATION)):
                cls = getattr(backend, f"{training}{kind}Quantizer")
                seeds.append((cls, cls(config, freeze_quant_params=training == "LSQ").get_config()))
    return seeds


QUANTIZER_SEEDS = quantizer_seeds()
QAT_SEEDS = [
    QATConfig().to_dict(),
    QATConfig(
        weight_training_method=TrainingMethod.LSQ, activation_training_method="PACT", weight_quantization_method=UNI,
        weight_n_bits=4, weight_per_channel=False, layer_types=["Conv2d", "Linear"], min_threshold=1e-4,
        weight_init="mse", activation_calibration="mse",
        overrides={"features.*": {"weight_n_bits": 6, "activation_quantization_method": POT}, "head": {"skip": True}},
    ).to_dict(),
]
OVERRIDE_SEEDS = [
    LayerOverride("conv*", weight_training_method=TrainingMethod.STE, weight_n_bits=3, weight_per_channel=True)
    .to_dict(),
    LayerOverride("head", skip=True, activation_quantization_method=UNI).to_dict(),
]
SCHEDULE_SEEDS = [LinearAnnealing(0, 100, 1.0, 0.0).to_dict(), LinearAnnealing(10, 2**40, -3.5, 7).to_dict()]

# --- junk -----------------------------------------------------------------------------------------------------------

SPECIAL_NUMBERS = st.sampled_from([
    math.nan, math.inf, -math.inf, 0, 0.0, -0.0, -1, -1.0, 1e308, -1e308, 5e-324, HUGE, -HUGE, 2**63, 2**64, 17, 1,
])
NUMPY_VALUES = st.sampled_from([
    np.float32(np.nan), np.float64(2.5), np.int64(4), np.bool_(True), np.array([1.0, np.nan]), np.array([]),
    np.array(["a", "b"]), np.array([[1, 2], [3, 4]]), np.ones((2, 1)),
])
NAMES = st.sampled_from([
    "SYMMETRIC", "POWER_OF_TWO", "UNIFORM", "LUT_POT_QUANTIZER", "STE", "LSQ", "weights", "activation", "candidate",
    "threshold", "is_signed", "range_min", "range_max", "max_abs", "mse", "minmax", "", "*",
])
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), SPECIAL_NUMBERS, st.text(max_size=12), NAMES,
    st.just("x" * 20_000), st.binary(max_size=8), NUMPY_VALUES,
)


def deeply_nested(depth: int, as_dict: bool) -> Any:
    value: Any = 1.0
    for _ in range(depth):
        value = {"k": value} if as_dict else [value]
    return value


DEEP = st.builds(deeply_nested, st.integers(1, 300), st.booleans())
JUNK = st.one_of(
    SCALARS,
    DEEP,
    st.recursive(
        SCALARS,
        lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.text(max_size=6), children,
                                                                                      max_size=4)),
        max_leaves=12,
    ),
)
HASHABLE_KEYS = st.one_of(NAMES, st.text(max_size=10), st.integers(), st.none(), st.booleans(), st.binary(max_size=4))


def similar(value: Any) -> st.SearchStrategy:
    """Values of the same kind as `value`, often valid ones: they keep payloads buildable, so that round trips of
    unusual but valid values are tested too."""
    if isinstance(value, bool):
        return st.booleans()
    if isinstance(value, int):
        return st.integers(0, 16)
    if isinstance(value, float):
        return st.floats(1e-30, 1e30)
    if isinstance(value, str):
        return st.sampled_from([value, "SYMMETRIC", "POWER_OF_TWO", "UNIFORM", "STE", "LSQ", "mse", "conv*"])
    if isinstance(value, list) and value and all(isinstance(v, float) for v in value):
        return st.lists(st.floats(1e-3, 1e3), min_size=len(value), max_size=len(value))
    return JUNK


def node_paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Paths (tuples of keys / indices) to every element inside `value`'s dicts and lists."""
    found = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        found.append((*prefix, key))
        found.extend(node_paths(child, (*prefix, key)))
    return found


def container_at(payload: Any, path: tuple) -> Any:
    for key in path:
        payload = payload[key]
    return payload


def mutate(payload: Any, draw: Callable[[st.SearchStrategy], Any]) -> Any:
    """One random mutation of `payload` (changed in place where possible); returns the mutated payload."""
    paths = node_paths(payload)
    kinds = ["similar"] * 6 + ["replace", "number", "delete", "add", "nest", "root"]
    kind = draw(st.sampled_from(kinds if paths else ["root"]))
    if kind == "root":
        return draw(JUNK)
    if kind == "add":
        dicts = [()] + [p for p in paths if isinstance(container_at(payload, p), dict)]
        target = container_at(payload, draw(st.sampled_from(dicts)))
        if isinstance(target, dict):
            target[draw(HASHABLE_KEYS)] = draw(JUNK)
        return payload
    path = draw(st.sampled_from(paths))
    parent, key = container_at(payload, path[:-1]), path[-1]
    if kind == "delete":
        del parent[key]
    elif kind == "nest":
        parent[key] = draw(st.sampled_from([[parent[key]], {"value": parent[key]}, [parent[key], parent[key]]]))
    elif kind == "similar":
        parent[key] = draw(similar(parent[key]))
    else:
        parent[key] = draw(SPECIAL_NUMBERS if kind == "number" else JUNK)
    return payload


def mutated(seeds: list[Any]) -> st.SearchStrategy:
    """A seed from `seeds`, deep-copied and mutated one to three times."""

    @st.composite
    def build(draw: Callable) -> Any:
        payload = copy.deepcopy(draw(st.sampled_from(seeds)))
        for _ in range(draw(st.integers(1, 3))):
            payload = mutate(payload, draw)
        return payload

    return build()


# --- the properties ---------------------------------------------------------------------------------------------------


def strict_json(value: Any) -> Any:
    """`value` through JSON without NaN or Infinity (what another tool or language would read)."""
    return json.loads(json.dumps(value, allow_nan=False))


def built_or_refused(build: Callable[[Any], Any], payload: Any) -> Any | None:
    """`build(payload)`, or None when it raises a library error; any other exception fails the test."""
    try:
        built = build(payload)
    except TrainableInfraError as error:
        event(f"refused: {type(error).__name__}")
        return None
    event("built")
    return built


@settings(FUZZ, max_examples=600)
@given(mutated(CONFIG_SEEDS))
def test_config_dicts_build_a_config_that_round_trips_or_are_refused(payload):
    config = built_or_refused(config_from_dict, payload)
    if config is None:
        return
    first = config.to_dict()
    again = config_from_dict(strict_json(first))
    assert again == config
    assert again.to_dict() == first
    assert type(config).from_dict(first) == config


@settings(FUZZ, max_examples=600)
@given(st.sampled_from(QUANTIZER_SEEDS).flatmap(lambda seed: st.tuples(st.just(seed[0]), mutated([seed[1]]))))
def test_quantizer_payloads_build_a_quantizer_that_round_trips_or_are_refused(case):
    cls, payload = case
    quantizer = built_or_refused(cls.from_config, payload)
    if quantizer is None:
        return
    first = quantizer.get_config()
    again = cls.from_config(strict_json(first))
    assert again.get_config() == first
    assert again.quantization_config == quantizer.quantization_config
    assert again.freeze_quant_params == quantizer.freeze_quant_params


@settings(FUZZ, max_examples=300)
@given(mutated(QAT_SEEDS))
def test_qat_config_dicts_build_a_config_that_round_trips_or_are_refused(payload):
    config = built_or_refused(QATConfig.from_dict, payload)
    if config is None:
        return
    first = config.to_dict()
    again = QATConfig.from_dict(strict_json(first))
    assert again == config
    assert again.to_dict() == first


@settings(FUZZ, max_examples=300)
@given(st.one_of(
    st.tuples(st.just(LayerOverride.from_dict), mutated(OVERRIDE_SEEDS)),
    st.tuples(st.just(LinearAnnealing.from_dict), mutated(SCHEDULE_SEEDS)),
))
def test_override_and_schedule_dicts_round_trip_or_are_refused(case):
    from_dict, payload = case
    built = built_or_refused(from_dict, payload)
    if built is None:
        return
    first = built.to_dict()
    again = from_dict(strict_json(first))
    assert again == built
    assert again.to_dict() == first


def test_the_seeds_cover_every_built_in_quantizer_class_of_both_backends():
    names = ["STESymmetricWeightQuantizer", "STEUniformWeightQuantizer", "STESymmetricActivationQuantizer",
             "STEUniformActivationQuantizer", "LSQSymmetricWeightQuantizer", "LSQUniformWeightQuantizer",
             "LSQSymmetricActivationQuantizer", "LSQUniformActivationQuantizer"]
    expected = {getattr(backend, name) for backend in (kb, pb) for name in names}
    assert {cls for cls, _ in QUANTIZER_SEEDS} == expected
    # The seeds themselves are valid: each builds and equals its source.
    for cls, config in QUANTIZER_SEEDS:
        assert cls.from_config(strict_json(config)).get_config() == config


# --- regression tests of what the fuzzing found ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: weights(SYM, {"threshold": HUGE}), "weights_quantization_params['threshold'] must be finite"),
        (lambda: weights(UNI, {"range_min": -1.0, "range_max": HUGE}),
         "weights_quantization_params['range_max'] must be finite"),
        (lambda: TrainableQuantizerActivationConfig(SYM, 8, {"threshold": 1.0, "is_signed": True}, True, HUGE),
         "min_threshold must be a finite number > 0"),
        (lambda: QATConfig(min_threshold=HUGE), "min_threshold must be a finite number > 0"),
        (lambda: LinearAnnealing(0, 10, -HUGE, 0.0), "initial_value must be a finite number"),
    ],
    ids=["threshold", "range-max", "min-threshold", "qat-min-threshold", "schedule-value"],
)
def test_int_too_large_for_a_float_is_refused_not_an_overflow_error(build, message):
    with pytest.raises(QuantizationConfigError, match="^" + re.escape(message)):
        build()


@pytest.mark.parametrize("value", [math.nan, math.inf, np.float32(-np.inf), np.array([1.0, np.nan])],
                         ids=["nan", "inf", "numpy-minus-inf", "array-with-nan"])
def test_non_finite_extra_param_is_refused_as_json_and_equality_cannot_hold_it(value):
    with pytest.raises(QuantizationConfigError, match=r"weights_quantization_params\['offset'\] must"):
        weights(SYM, {"threshold": 1.0, "offset": value})


def test_finite_extra_params_round_trip_through_strict_json():
    config = weights(SYM, {"threshold": 1.0, "offset": -0.25, "counts": np.arange(3), "tags": ("a", None, True)})
    assert config_from_dict(strict_json(config.to_dict())) == config


def test_extra_param_nested_past_the_limit_is_refused_without_recursing_into_it():
    deep = deeply_nested(5000, as_dict=False)  # far past Python's recursion limit
    with pytest.raises(QuantizationConfigError, match="nests lists more than 32 deep"):
        weights(SYM, {"threshold": 1.0, "path": deep})
    assert weights(SYM, {"threshold": 1.0, "path": deeply_nested(32, as_dict=False)}).weights_quantization_params


def with_kind(kind: Any) -> dict[str, Any]:
    return {**SYMMETRIC_WEIGHTS.to_dict(), "kind": kind}


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: TrainableQuantizerWeightsConfig.from_dict(with_kind(np.array(["weights", "weights"]))),
         "expects kind 'weights', got kind array"),
        (lambda: TrainableQuantizerWeightsConfig.from_dict(with_kind(np.array(["weights"]))),
         "expects kind 'weights', got kind array"),
        (lambda: QATConfig(weight_init=np.array(["mse", "max_abs"])), "weight_init must be one of"),
        (lambda: QATConfig.from_dict({"activation_calibration": np.array(["mse"])}), "activation_calibration must be"),
    ],
    ids=["kind-array", "kind-one-element-array", "weight-init-array", "calibration-array"],
)
def test_array_where_a_name_belongs_is_refused_not_compared_element_wise(build, message):
    with pytest.raises(QuantizationConfigError, match=message):
        build()


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: weights(SYM, {"threshold": 1.0}, weights_quantization_candidates=b""),
         "weights_quantization_candidates must be None or a list"),
        (lambda: QATConfig(layer_types=b""), "layer_types must be None"),
        (lambda: QATConfig(overrides=b""), "overrides must be a sequence of LayerOverride"),
    ],
    ids=["candidates", "layer-types", "overrides"],
)
def test_empty_bytes_is_not_taken_for_an_empty_list(build, message):
    with pytest.raises(QuantizationConfigError, match=message):
        build()


def test_quantizer_get_config_holds_the_validated_freeze_flag():
    for cls in (kb.LSQSymmetricWeightQuantizer, pb.LSQSymmetricWeightQuantizer):
        config = cls(SYMMETRIC_WEIGHTS, freeze_quant_params=np.bool_(True)).get_config()
        assert type(config["freeze_quant_params"]) is bool
        assert strict_json(config)["freeze_quant_params"] is True


def test_from_config_names_the_bad_quantization_config_and_accepts_a_config_object():
    with pytest.raises(QuantizationConfigError, match="from_config: 'quantization_config' must be a config dict"):
        pb.STESymmetricWeightQuantizer.from_config({"quantization_config": [SYMMETRIC_WEIGHTS.to_dict()]})
    quantizer = kb.STESymmetricWeightQuantizer.from_config({"quantization_config": SYMMETRIC_WEIGHTS})
    assert quantizer.quantization_config == SYMMETRIC_WEIGHTS


def test_schedule_takes_numpy_numbers_and_refuses_steps_past_int64():
    schedule = LinearAnnealing(np.int64(0), np.int32(10), np.float32(1.0), np.float64(0.0))
    assert schedule.to_dict() == {"t_start": 0, "t_end": 10, "initial_value": 1.0, "target_value": 0.0}
    assert type(schedule.to_dict()["t_end"]) is int
    assert schedule(5.0) == 0.5
    with pytest.raises(QuantizationConfigError, match="t_end must be an int >= 0, got 18446744073709551616"):
        LinearAnnealing(0, 2**64, 1.0, 0.0)


def test_resolver_refuses_an_identifier_that_is_neither_enum_nor_name():
    class Other(Enum):
        STE = 1

    for identifier in (["STE"], {"STE": 1}, math.nan, ""):
        with pytest.raises(QuantizationConfigError, match="quantizer_id must be an enum member"):
            get_trainable_quantizer_class(QuantizationTarget.Weights, identifier, SYM, pb.BasePytorchTrainableQuantizer)
    with pytest.raises(QuantizationConfigError, match="quantizer_base_class must be a class derived from"):
        get_trainable_quantizer_class(QuantizationTarget.Weights, Other.STE, SYM, object)
