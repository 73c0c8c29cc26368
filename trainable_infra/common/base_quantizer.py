"""The framework-neutral base of every trainable quantizer."""

from __future__ import annotations

import enum
import inspect
from abc import ABCMeta, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

import numpy as np

from trainable_infra.common.config import (
    RANGE_MAX,
    RANGE_MIN,
    THRESHOLD,
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


def check_quantizer_class(cls: type) -> CallForm:
    """Raise `QuantizerDefinitionError` unless `cls` is a complete, decorated trainable quantizer class; return
    how its `__call__` takes the training flag."""
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
    return call_form(cls)


class CallForm(enum.Enum):
    """How a quantizer class's `__call__` takes the training flag."""

    POSITIONAL = "positional"  # __call__(inputs, training) - ours and MCT's built-in quantizers
    KEYWORD = "keyword"  # __call__(inputs, *, training=...)
    NONE = "none"  # __call__(inputs) - the quantizers of MCT's QAT READMEs


def call_form(cls: type) -> CallForm:
    """How `cls.__call__` takes the training flag; raise `QuantizerDefinitionError` if it cannot take inputs."""
    signature = inspect.signature(cls.__call__)
    parameters = list(signature.parameters.values())[1:]  # drop self
    kinds = [parameter.kind for parameter in parameters]
    positional = [
        parameter for parameter in parameters
        if parameter.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    if inspect.Parameter.VAR_POSITIONAL in kinds or len(positional) >= 2:
        return CallForm.POSITIONAL
    if not positional:
        raise QuantizerDefinitionError(
            f"{cls.__qualname__}.__call__ must take the inputs as its first argument, as __call__(inputs, training) "
            f"or __call__(inputs); got {signature}"
        )
    if "training" in signature.parameters or inspect.Parameter.VAR_KEYWORD in kinds:
        return CallForm.KEYWORD
    return CallForm.NONE


def registered_entry(name: str, value: Any) -> QuantizerVariable:
    """A `quantizer_parameters` value as a `QuantizerVariable`: as `add_quantizer_variable` stores it, MCT's
    `{"var": ..., "group": ...}`, or a bare variable (MCT's README form), which is a quantization parameter."""
    if isinstance(value, QuantizerVariable):
        return value
    if isinstance(value, Mapping):
        if set(value) != {"var", "group"} or not isinstance(value["group"], VariableGroup):
            raise QuantizationConfigError(
                f"quantizer_parameters[{name!r}] must be a variable, a QuantizerVariable or "
                f"{{'var': variable, 'group': VariableGroup}}, got {value!r}"
            )
        return QuantizerVariable(value["var"], value["group"])
    if value is None or isinstance(value, (str, bytes, int, float, bool)):
        raise QuantizationConfigError(
            f"quantizer_parameters[{name!r}] must be a variable of the quantizer's layer, got {value!r}"
        )
    return QuantizerVariable(value, VariableGroup.QPARAMS)


class BaseTrainableQuantizer(BaseInferableQuantizer, metaclass=ABCMeta):
    """Base of all trainable quantizers, in both backends.

    A subclass is decorated with `mark_quantizer(quantization_target=..., quantization_method=[...],
    identifier=...)`, takes its quantization config as the first `__init__` argument followed only by
    arguments with defaults, creates its variables in `initialize_quantization` (registering each with
    `add_quantizer_variable`, or, as MCT's READMEs do, setting `self.quantizer_parameters = {name: variable}`,
    whose variables are quantization parameters), fake-quantizes in `__call__(inputs, training)` (or
    `__call__(inputs)` where training makes no difference) and returns an mct-quantizers inferable quantizer from
    `convert2inferable()`.

    Args:
        quantization_config: a `TrainableQuantizerWeightsConfig` or `TrainableQuantizerActivationConfig`
            matching the class's quantization target, with a method the class declares.
        freeze_quant_params: if True, the quantization parameters (group `VariableGroup.QPARAMS`) are not
            returned by `get_trainable_variables` and so are not trained.
    """

    # Set by a backend's weight / activation base class: its subclasses must be marked for that target.
    base_quantization_target: ClassVar[QuantizationTarget | None] = None
    # Classes whose definition was checked, with their `__call__` form; the checks run once per class.
    _checked_classes: ClassVar[dict[type, CallForm]] = {}

    def __new__(cls, *args: Any, **kwargs: Any) -> BaseTrainableQuantizer:
        form = BaseTrainableQuantizer._checked_classes.get(cls)
        if form is None:
            form = BaseTrainableQuantizer._checked_classes[cls] = check_quantizer_class(cls)
        instance = super().__new__(cls)
        instance._call_form = form
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
        """Fake-quantize `inputs`; `training` selects the training-mode (gradient) behaviour.

        A quantizer that behaves the same in both modes may take the inputs only (`__call__(self, inputs)`, as in
        MCT's QAT READMEs); the wrappers call every quantizer through `quantize_inputs`, which passes the flag only
        to a `__call__` that takes it.
        """

    @abstractmethod
    def convert2inferable(self) -> BaseInferableQuantizer:
        """Return the mct-quantizers inferable quantizer with this quantizer's current parameters."""

    @abstractmethod
    def get_trainable_variables(self, group: VariableGroup) -> list[Any]:
        """Return the variables of `group` that are trained (honouring `freeze_quant_params`)."""

    # --- shared behaviour ----------------------------------------------------------------------------------

    def quantize_inputs(self, inputs: Any, training: bool) -> Any:
        """Fake-quantize `inputs` with this quantizer's `__call__`, in training mode or not."""
        form = self._call_form
        if form is CallForm.POSITIONAL:
            return self(inputs, training)
        if form is CallForm.KEYWORD:
            return self(inputs, training=training)
        return self(inputs)

    def registered_variables(self) -> dict[str, QuantizerVariable]:
        """{name: (variable, group)} of every variable in `quantizer_parameters`, whichever form it was set in."""
        parameters = self.quantizer_parameters
        if not isinstance(parameters, Mapping):
            raise QuantizationConfigError(
                f"{type(self).__name__}.quantizer_parameters must be a dict {{name: variable}}, got {parameters!r}"
            )
        return {name: registered_entry(name, value) for name, value in parameters.items()}

    def parameter_variable(self, key: str) -> Any | None:
        """The variable holding quantization parameter `key` (`THRESHOLD`, `RANGE_MIN` or `RANGE_MAX`): the one
        registered as `key` or as `<tensor>_<key>`, as the built-in quantizers name them; None if there is none."""
        for name, entry in self.registered_variables().items():
            if name == key or name.endswith(f"_{key}"):
                return entry.variable
        return None

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
            return registered_entry(name, self.quantizer_parameters[name]).variable
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
        names = [name for name, entry in self.registered_variables().items() if entry.group is group]
        return [self.get_quantizer_variable(name) for name in names]

    def variable_value(self, variable: Any) -> np.ndarray:
        """The current value of one of this quantizer's variables as a numpy array (the backend knows how)."""
        return np.asarray(variable)

    def current_quantization_config(self) -> TrainableQuantizerWeightsConfig | TrainableQuantizerActivationConfig:
        """`quantization_config` with the threshold or range the variables hold now (calibrated or trained).

        A quantizer built from it computes the same grid: a threshold below `min_threshold` is written as
        `min_threshold`, and a range that training has inverted as the range the grid spans, because a config
        holds only valid parameters. Non-finite values are left out (the config keeps its own).
        """
        config = self.quantization_config
        weights = isinstance(config, TrainableQuantizerWeightsConfig)
        field = "weights_quantization_params" if weights else "activation_quantization_params"
        params = dict(getattr(config, field))
        values = {}
        for key in (THRESHOLD, RANGE_MIN, RANGE_MAX):
            variable = self.parameter_variable(key) if key in params else None
            if variable is not None:
                value = np.asarray(self.variable_value(variable), dtype=np.float64).reshape(-1)
                if value.size == 0 or not np.all(np.isfinite(value)):
                    return config
                values[key] = value

        def moved(key: str) -> bool:
            # False while the variable holds the config's own value (in the float32 variables hold it in).
            given = np.asarray(params[key], dtype=np.float32).reshape(-1)
            return not (given.size in (1, values[key].size) and np.all(given == values[key]))

        current = {key: value for key, value in values.items() if moved(key)}
        if not current:
            return config
        if RANGE_MIN in current or RANGE_MAX in current:
            # Both ends are checked together: one end's training can invert the range against the other.
            current.update({key: values[key] for key in (RANGE_MIN, RANGE_MAX) if key in values})
        if THRESHOLD in current:
            current[THRESHOLD] = np.maximum(current[THRESHOLD], config.min_threshold)
        if RANGE_MIN in current and RANGE_MAX in current:
            low, high = current[RANGE_MIN], current[RANGE_MAX]
            if low.shape != high.shape or not np.all(low < high):
                # The grid's own widening (DESIGN.md §4), in the float32 the variables hold.
                low = np.minimum(low, 0.0).astype(np.float32)
                high = np.maximum(np.maximum(high, 0.0).astype(np.float32), low + np.float32(config.min_threshold))
                current[RANGE_MIN], current[RANGE_MAX] = low.astype(np.float64), high.astype(np.float64)
        for key, value in current.items():
            old = np.asarray(params[key])
            if old.ndim == 0 and value.size == 1:
                params[key] = float(value[0])
            else:
                # Keep the shape the config was given in (MCT's broadcast form) when the sizes agree.
                params[key] = value.reshape(old.shape) if old.size == value.size else value
        arguments = {f: getattr(config, f) for f in config._FIELDS}
        arguments[field] = params
        return type(config)(**arguments)

    def weights_quantization(self) -> bool:
        """Whether this quantizer quantizes weights (and that quantization is enabled)."""
        config = self.quantization_config
        return isinstance(config, TrainableQuantizerWeightsConfig) and config.enable_weights_quantization

    def activation_quantization(self) -> bool:
        """Whether this quantizer quantizes activations (and that quantization is enabled)."""
        config = self.quantization_config
        return isinstance(config, TrainableQuantizerActivationConfig) and config.enable_activation_quantization

    def get_config(self) -> dict[str, Any]:
        """Return the constructor arguments as a JSON-serializable dict: the config via its `to_dict`, with the
        threshold or range the quantizer holds now, so `from_config(get_config())` rebuilds this quantizer."""
        arguments = dict(self._init_arguments)
        first = next(iter(arguments))
        arguments[first] = self.current_quantization_config().to_dict()
        if "freeze_quant_params" in arguments:
            # The constructor's value, validated (a numpy bool, say, is not JSON). Not the attribute: the training
            # helpers' `freeze_quantizers` switches that while training, a state `.keras` files do not keep, and a
            # quantizer rebuilt frozen would create its variables in another order than the one it was saved in.
            arguments["freeze_quant_params"] = check_bool("freeze_quant_params", arguments["freeze_quant_params"])
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
