"""get_trainable_quantizer_class: exactly one match, or an error that says what exists."""

from enum import Enum

import pytest

from tests.common.fake_quantizers import (
    BaseNumpyTrainableQuantizer,
    NumpyPACTActivationQuantizer,
    NumpySTEWeightQuantizer,
    NumpyStringIdActivationQuantizer,
    UserMethod,
)
from trainable_infra import (
    AmbiguousQuantizerError,
    BaseTrainableQuantizer,
    QuantizationConfigError,
    QuantizationMethod,
    QuantizationTarget,
    QuantizerNotFoundError,
    TrainingMethod,
    get_trainable_quantizer_class,
    mark_quantizer,
)
from trainable_infra.common.resolver import identifier_matches

W, A = QuantizationTarget.Weights, QuantizationTarget.Activation
SYM, POT, UNI = QuantizationMethod.SYMMETRIC, QuantizationMethod.POWER_OF_TWO, QuantizationMethod.UNIFORM


@pytest.mark.parametrize(
    ("target", "identifier", "method", "expected"),
    [
        (W, TrainingMethod.STE, SYM, NumpySTEWeightQuantizer),
        (W, TrainingMethod.STE, POT, NumpySTEWeightQuantizer),
        (A, UserMethod.PACT, UNI, NumpyPACTActivationQuantizer),
        (A, "PACT", UNI, NumpyPACTActivationQuantizer),
        (A, "my-string-method", SYM, NumpyStringIdActivationQuantizer),
        (W, "STE", SYM, NumpySTEWeightQuantizer),
    ],
    ids=["enum", "second-method", "user-enum", "user-enum-by-name", "string-id", "builtin-by-name"],
)
def test_resolves_the_one_matching_class(target, identifier, method, expected):
    assert get_trainable_quantizer_class(target, identifier, method, BaseNumpyTrainableQuantizer) is expected


def test_search_is_limited_to_the_given_base():
    class OtherBackendBase(BaseTrainableQuantizer):
        pass

    with pytest.raises(QuantizerNotFoundError, match="Available for Weights: none"):
        get_trainable_quantizer_class(W, TrainingMethod.STE, SYM, OtherBackendBase)


def test_not_found_lists_what_is_available_for_the_target():
    with pytest.raises(QuantizerNotFoundError) as info:
        get_trainable_quantizer_class(W, TrainingMethod.LSQ, SYM, BaseNumpyTrainableQuantizer)
    message = str(info.value)
    assert "for target Weights, identifier <TrainingMethod.LSQ: 'LSQ'>, method SYMMETRIC" in message
    assert "NumpySTEWeightQuantizer (identifier=<TrainingMethod.STE: 'STE'>, methods=[SYMMETRIC, POWER_OF_TWO])" in (
        message
    )
    assert "PACT" not in message  # activation quantizers are not listed for a weights request


def test_not_found_when_method_unsupported():
    with pytest.raises(QuantizerNotFoundError, match="method UNIFORM"):
        get_trainable_quantizer_class(W, TrainingMethod.STE, UNI, BaseNumpyTrainableQuantizer)


def test_ambiguous_lists_the_matches():
    class AmbiguityBase(BaseTrainableQuantizer):
        pass

    marker = mark_quantizer(W, [SYM], TrainingMethod.STE)
    first = marker(type("FirstSTE", (AmbiguityBase,), {}))
    second = marker(type("SecondSTE", (AmbiguityBase,), {}))
    with pytest.raises(AmbiguousQuantizerError) as info:
        get_trainable_quantizer_class(W, TrainingMethod.STE, SYM, AmbiguityBase)
    assert "2 trainable quantizers match" in str(info.value)
    assert first.__qualname__ in str(info.value)
    assert second.__qualname__ in str(info.value)


def test_a_string_matching_two_enums_by_name_is_ambiguous():
    class Mine(Enum):
        STE = "mine"

    class NameClashBase(BaseTrainableQuantizer):
        pass

    mark_quantizer(W, [SYM], TrainingMethod.STE)(type("BuiltinLike", (NameClashBase,), {}))
    mark_quantizer(W, [SYM], Mine.STE)(type("UserLike", (NameClashBase,), {}))
    with pytest.raises(AmbiguousQuantizerError):
        get_trainable_quantizer_class(W, "STE", SYM, NameClashBase)
    # An enum member only matches itself, never another enum's member of the same name.
    assert get_trainable_quantizer_class(W, Mine.STE, SYM, NameClashBase).__name__ == "UserLike"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("Weights", TrainingMethod.STE, SYM, BaseNumpyTrainableQuantizer), "quant_target must be"),
        ((W, TrainingMethod.STE, "SYMMETRIC", BaseNumpyTrainableQuantizer), "quant_method must be"),
        ((W, TrainingMethod.STE, SYM, "BaseNumpyTrainableQuantizer"), "quantizer_base_class must be a class"),
        ((W, None, SYM, BaseNumpyTrainableQuantizer), "quantizer_id must be"),
    ],
)
def test_bad_arguments_raise_config_errors(args, message):
    with pytest.raises(QuantizationConfigError, match=message):
        get_trainable_quantizer_class(*args)


def test_identifier_matching_rules():
    assert identifier_matches(TrainingMethod.STE, TrainingMethod.STE)
    assert identifier_matches(TrainingMethod.STE, "STE")
    assert identifier_matches("STE", TrainingMethod.STE)
    assert identifier_matches("custom", "custom")
    assert not identifier_matches(TrainingMethod.STE, TrainingMethod.LSQ)
    assert not identifier_matches(TrainingMethod.STE, "ste")
    assert not identifier_matches(UserMethod.PACT, "pact")  # names, not values
