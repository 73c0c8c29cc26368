"""Base classes of Keras trainable quantizers."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from trainable_infra.common.base_quantizer import BaseTrainableQuantizer
from trainable_infra.common.enums import VariableGroup
from trainable_infra.common.mct import QuantizationTarget


class BaseKerasTrainableQuantizer(BaseTrainableQuantizer):
    """Base of every Keras trainable quantizer.

    A subclass creates its variables in `initialize_quantization(tensor_shape, name, layer)` with
    `layer.add_weight` (or `add_quantizer_weight`) and registers each with `add_quantizer_variable`;
    `__call__(inputs, training)` fake-quantizes a float tensor; `convert2inferable()` returns the
    mct-quantizers Keras inferable quantizer with the current parameters. Register the class with
    `keras.saving.register_keras_serializable` so that models holding it load without `custom_objects`.

    Args:
        quantization_config: a `TrainableQuantizerWeightsConfig` or `TrainableQuantizerActivationConfig`.
        freeze_quant_params: if True, the quantization parameters are not trained.
    """

    def get_trainable_variables(self, group: VariableGroup) -> list[keras.Variable]:
        """The variables of `group` that training updates: registered, trainable, and not frozen."""
        return [v for v in self.variables_in_group(group) if v.trainable]

    def variable_value(self, variable: keras.Variable) -> np.ndarray:
        """The current value of one of this quantizer's variables as a numpy array."""
        return np.asarray(variable.numpy())

    def add_quantizer_weight(
        self,
        layer: keras.layers.Layer,
        name: str,
        value: Any,
        group: VariableGroup = VariableGroup.QPARAMS,
        trainable: bool | None = None,
    ) -> keras.Variable:
        """Create a float32 variable holding `value` on `layer` and register it under `name` in `group`.

        `trainable` defaults to "not frozen": False for `QPARAMS` when `freeze_quant_params` is set.
        """
        if trainable is None:
            trainable = not (group is VariableGroup.QPARAMS and self.freeze_quant_params)
        value = np.asarray(value, dtype=np.float32)
        variable = layer.add_weight(
            name=name,
            shape=value.shape,
            initializer=keras.initializers.Constant(value),
            trainable=trainable,
            # Quantizer maths runs in float32 whatever the layer's dtype policy.
            dtype="float32",
        )
        self.add_quantizer_variable(name, variable, group)
        return variable

    def grid_step(self) -> Any:
        """The step Δ of the quantizer's uniform grid now (a float32 scalar or per-channel vector), or None if it
        has none. The integer bias (`QATConfig.integer_bias`) needs it from a layer's input and weight quantizers;
        the built-in quantizers give the step of the fused op they run."""
        return None


class BaseKerasWeightTrainableQuantizer(BaseKerasTrainableQuantizer):
    """Base of Keras quantizers of weights (`mark_quantizer(quantization_target=QuantizationTarget.Weights)`)."""

    base_quantization_target = QuantizationTarget.Weights


class BaseKerasActivationTrainableQuantizer(BaseKerasTrainableQuantizer):
    """Base of Keras quantizers of activations (`mark_quantizer(quantization_target=QuantizationTarget.Activation)`)."""

    base_quantization_target = QuantizationTarget.Activation


# MCT's names of the same classes, so that quantizers written for MCT's QAT import what they name.
BaseKerasQATTrainableQuantizer = BaseKerasTrainableQuantizer
BaseKerasQATWeightTrainableQuantizer = BaseKerasWeightTrainableQuantizer
