"""The framework-neutral base of every trainable quantizer."""

from __future__ import annotations

import inspect
from abc import ABCMeta, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

from trainable_infra.common.config import (
    TrainableQuantizerActivationConfig,
    TrainableQuantizerWeightsConfig,
    check_bool,
    config_from_dict,
)
from trainable_infra.common.enums import VariableGroup
from trainable_infra.common.errors import (
    QuantizationConfigError,
    QuantizerDefinitionError,
    TrainableInfraError,
)
from trainable_infra.common.mct import BaseInferableQuantizer, QuantizationMethod, QuantizationTarget

_CONFIG_CLASS_FOR_TARGET = {
    QuantizationTarget.Weights: TrainableQuantizerWeightsConfig,
    QuantizationTarget.Activation: TrainableQuantizerActivationConfig,
}


class QuantizerVariable(NamedTuple):
    """A variable registered by a quantizer, with the group an optimizer may treat it by."""

    variable: Any
    group: VariableGroup


def is_marked(cls: type) -> bool:
    """Whether `cls` itself (not only a parent) was decorated with `mark_quantizer` and a real target."""
    return isinstance(vars(cls).get("quantization_target"), QuantizationTarget)


def check_quantizer_class(cls: type) -> None:
    """Raise `QuantizerDefinitionError` unless `cls` is a complete, decorated trainable quantizer class."""
    name = cls.__qualname__
    if not is_marked(cls):
        raise QuantizerDefinitionError(
            f"{name} must be decorated with @mark_quantizer(quantization_target=QuantizationTarget.Weights or "
            f".Activation, quantization_method=[...], identifier=...); got quantization_target="
            f"{vars(cls).get('quantization_target')!r}"
        )
    methods = cls.quantization_method
    if (
        not isinstance(methods, (list, tuple))
        or not methods
        or not all(isinstance(m, QuantizationMethod) for m in methods)
    ):
        raise QuantizerDefinitionError(
            f"{name}: mark_quantizer's quantization_method must be a non-empty list of QuantizationMethod, "
            f"got {methods!r}"
        )
    expected_target = getattr(cls, "base_quantization_target", None)
    if expected_target is not None and cls.quantization_target is not expected_target:
        raise QuantizerDefinitionError(
            f"{name} derives from a base for {expected_target.value} quantizers but is marked with "
            f"quantization_target={cls.quantization_target!r}"
        )
    if cls.identifier is None:
        raise QuantizerDefinitionError(
            f"{name}: mark_quantizer's identifier must be a TrainingMethod, an enum member or a string, got None"
        )
    if getattr(cls, "__abstractmethods__", None):
        raise QuantizerDefinitionError(
            f"{name} does not implement the abstract methods {sorted(cls.__abstractmethods__)}"
        )
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]  # drop self
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if not parameters or parameters[0].kind not in positional:
        raise QuantizerDefinitionError(
            f"{name}.__init__ must take the quantization config as its first argument, got "
            f"{inspect.signature(cls.__init__)}"
        )
    for parameter in parameters[1:]:
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL or (
            parameter.kind is not inspect.Parameter.VAR_KEYWORD and parameter.default is inspect.Parameter.empty
        ):
            raise QuantizerDefinitionError(
                f"{name}.__init__ may take only arguments with defaults after the config, but "
                f"{parameter.name!r} has none: {inspect.signature(cls.__init__)}"
            )


class BaseTrainableQuantizer(BaseInferableQuantizer, metaclass=ABCMeta):
    """Base of all trainable quantizers, in both backends.

    A subclass is decorated with `mark_quantizer(quantization_target=..., quantization_method=[...],
    identifier=...)`, takes its quantization config as the first `__init__` argument followed only by
    arguments with defaults, creates its variables in `initialize_quantization` (registering each with
    `add_quantizer_variable`), fake-quantizes in `__call__(inputs, training)` and returns an mct-quantizers
    inferable quantizer from `convert2inferable()`.

    Args:
        quantization_config: a `TrainableQuantizerWeightsConfig` or `TrainableQuantizerActivationConfig`
            matching the class's quantization target, with a method the class declares.
        freeze_quant_params: if True, the quantization parameters (group `VariableGroup.QPARAMS`) are not
            returned by `get_trainable_variables` and so are not trained.
    """

    # Set by a backend's weight / activation base class: its subclasses must be marked for that target.
    base_quantization_target: ClassVar[QuantizationTarget | None] = None
    # Classes whose definition was checked; the checks run once per class, not per instance.
    _checked_classes: ClassVar[set[type]] = set()

    def __new__(cls, *args: Any, **kwargs: Any) -> BaseTrainableQuantizer:
        if cls not in BaseTrainableQuantizer._checked_classes:
            check_quantizer_class(cls)
            BaseTrainableQuantizer._checked_classes.add(cls)
        instance = super().__new__(cls)
        # Remember the constructor arguments so `get_config` can describe any subclass without help.
        try:
            bound = inspect.signature(cls.__init__).bind(instance, *args, **kwargs)
        except TypeError:
            bound = None  # e.g. copy.deepcopy, which calls __new__ without arguments and copies __dict__
        if bound is not None:
            bound.apply_defaults()
            arguments = dict(bound.arguments)
            arguments.pop(next(iter(arguments)))  # self
            instance._init_arguments = arguments
        return instance

    def __init__(self, quantization_config: Any, freeze_quant_params: bool = False):
        super().__init__()
        expected = _CONFIG_CLASS_FOR_TARGET[self.quantization_target]
        if not isinstance(quantization_config, expected):
            raise QuantizationConfigError(
                f"{type(self).__name__} quantizes {self.quantization_target.value} and needs a "
                f"{expected.__name__} as quantization_config, got {quantization_config!r}"
            )
        method = (
            quantization_config.weights_quantization_method
            if isinstance(quantization_config, TrainableQuantizerWeightsConfig)
            else quantization_config.activation_quantization_method
        )
        if method not in self.quantization_method:
            allowed = ", ".join(m.name for m in self.quantization_method)
            raise QuantizationConfigError(
                f"{type(self).__name__} supports quantization methods {allowed}, got {method.name} in "
                f"quantization_config"
            )
        self.quantization_config = quantization_config
        self.freeze_quant_params = check_bool("freeze_quant_params", freeze_quant_params)
        self.quantizer_parameters: dict[str, QuantizerVariable] = {}

    # --- what a subclass implements ----------------------------------------------------------------------

    @abstractmethod
    def initialize_quantization(self, tensor_shape: Any, name: str, layer: Any) -> None:
        """Create the quantizer's variables on `layer` and register them with `add_quantizer_variable`."""

    @abstractmethod
    def __call__(self, inputs: Any, training: bool) -> Any:
        """Fake-quantize `inputs`; `training` selects the training-mode (gradient) behaviour."""

    @abstractmethod
    def convert2inferable(self) -> BaseInferableQuantizer:
        """Return the mct-quantizers inferable quantizer with this quantizer's current parameters."""

    @abstractmethod
    def get_trainable_variables(self, group: VariableGroup) -> list[Any]:
        """Return the variables of `group` that are trained (honouring `freeze_quant_params`)."""

    # --- shared behaviour ----------------------------------------------------------------------------------

    def add_quantizer_variable(self, name: str, variable: Any, group: VariableGroup = VariableGroup.WEIGHTS) -> None:
        """Register `variable` under `name` in `group`."""
        if not isinstance(name, str) or not name:
            raise QuantizationConfigError(f"name must be a non-empty string, got {name!r}")
        if not isinstance(group, VariableGroup):
            raise QuantizationConfigError(f"group must be a VariableGroup member, got {group!r}")
        self.quantizer_parameters[name] = QuantizerVariable(variable, group)

    def get_quantizer_variable(self, name: str) -> Any:
        """Return the variable registered under `name`."""
        try:
            return self.quantizer_parameters[name].variable
        except KeyError:
            raise TrainableInfraError(
                f"{type(self).__name__} has no quantizer variable {name!r}; it has "
                f"{sorted(self.quantizer_parameters)}"
            ) from None

    def variables_in_group(self, group: VariableGroup) -> list[Any]:
        """Registered variables of `group`, empty for `QPARAMS` when `freeze_quant_params` is set."""
        if not isinstance(group, VariableGroup):
            raise QuantizationConfigError(f"group must be a VariableGroup member, got {group!r}")
        if group is VariableGroup.QPARAMS and self.freeze_quant_params:
            return []
        names = [name for name, entry in self.quantizer_parameters.items() if entry.group is group]
        return [self.get_quantizer_variable(name) for name in names]

    def weights_quantization(self) -> bool:
        """Whether this quantizer quantizes weights (and that quantization is enabled)."""
        config = self.quantization_config
        return isinstance(config, TrainableQuantizerWeightsConfig) and config.enable_weights_quantization

    def activation_quantization(self) -> bool:
        """Whether this quantizer quantizes activations (and that quantization is enabled)."""
        config = self.quantization_config
        return isinstance(config, TrainableQuantizerActivationConfig) and config.enable_activation_quantization

    def get_config(self) -> dict[str, Any]:
        """Return the constructor arguments as a JSON-serializable dict (the config via its `to_dict`)."""
        arguments = dict(self._init_arguments)
        first = next(iter(arguments))
        arguments[first] = self.quantization_config.to_dict()
        if "freeze_quant_params" in arguments:
            # The validated value: the argument as given may be e.g. a numpy bool, which JSON cannot hold.
            arguments["freeze_quant_params"] = self.freeze_quant_params
        return arguments

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> BaseTrainableQuantizer:
        """Build a quantizer from a dict made by `get_config`."""
        if not isinstance(config, Mapping):
            raise QuantizationConfigError(
                f"{cls.__name__}.from_config expects a dict, got {config!r} of type {type(config).__name__}"
            )
        parameters = list(inspect.signature(cls.__init__).parameters)[1:]
        arguments = dict(config)
        first = parameters[0] if parameters else "quantization_config"
        if first not in arguments:
            raise QuantizationConfigError(f"{cls.__name__}.from_config: missing key {first!r} in {config!r}")
        quantization_config = arguments[first]
        if not isinstance(quantization_config, (Mapping, TrainableQuantizerWeightsConfig,
                                                TrainableQuantizerActivationConfig)):
            raise QuantizationConfigError(
                f"{cls.__name__}.from_config: {first!r} must be a config dict made by to_dict() (or a config), got "
                f"{quantization_config!r} of type {type(quantization_config).__name__}"
            )
        if isinstance(quantization_config, Mapping):
            arguments[first] = config_from_dict(quantization_config)
        unknown = sorted(str(k) for k in arguments if k not in parameters)
        if unknown and not any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(cls.__init__).parameters.values()
        ):
            raise QuantizationConfigError(
                f"{cls.__name__}.from_config got unknown keys {unknown}; allowed keys are {parameters}"
            )
        return cls(**arguments)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.quantization_config!r})"
