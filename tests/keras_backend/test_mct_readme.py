"""Quantizers written as MCT's Keras QAT README shows them train, save / reload and convert here.

The two classes keep the README's structure: `__call__(self, inputs)` without the training flag,
`self.quantizer_parameters = {NEW_PARAM: new_param}` set (and returned) in `initialize_quantization`,
`super().__init__(quantization_config)`. The README leaves the quantization itself (`custom_quantize`), the
parameter's value and the inferable quantizer's arguments as `...`; they are filled in here, and its
`layer.add_weight(NEW_PARAM, shape=len(tensor_shape), ...)` (Keras 2's signature) takes the name as `name=`, as
Keras 3 does. The README's classes are not registered with Keras: `keras_load_quantized_model` knows them.
"""

from enum import Enum

import keras
import numpy as np
import pytest
from mct_quantizers.keras import quantizers as qi

from trainable_infra import (
    QATConfig,
    QuantizationMethod,
    QuantizationTarget,
    VariableGroup,
    mark_quantizer,
)
from trainable_infra import TrainableQuantizerActivationConfig as NodeActivationQuantizationConfig
from trainable_infra import TrainableQuantizerWeightsConfig as NodeWeightsQuantizationConfig
from trainable_infra.keras_backend import (
    BaseKerasQATTrainableQuantizer,
    KerasActivationQuantizationHolder,
    KerasTrainableQuantizationWrapper,
    convert_to_inferable,
    keras_load_quantized_model,
    quantize_model,
)


class TrainingMethod(Enum):
    """The user's own training methods (MCT's README assumes one added to its enum)."""

    MyTraining = "mct-readme-keras-my-training"


NEW_PARAM = "new_param_name"


def custom_quantize(inputs, threshold, n_bits, signed):
    """Symmetric fake quantization on [-t, t - Δ] (or [0, t - Δ]) with TensorFlow's fused op, which trains t."""
    threshold = keras.ops.abs(threshold)
    step = threshold / 2 ** (n_bits - int(signed))
    low = -threshold if signed else keras.ops.zeros_like(threshold)
    return keras.quantizers.fake_quant_with_min_max_vars(inputs, low, threshold - step, num_bits=n_bits)


@mark_quantizer(quantization_target=QuantizationTarget.Weights,
                quantization_method=[QuantizationMethod.SYMMETRIC],
                identifier=TrainingMethod.MyTraining)
class MyWeightsTrainingQuantizer(BaseKerasQATTrainableQuantizer):
    def __init__(self, quantization_config: NodeWeightsQuantizationConfig):
        super(MyWeightsTrainingQuantizer, self).__init__(quantization_config)  # noqa: UP008 (as MCT writes it)
        # Define your new params here:
        self.new_param = float(np.max(quantization_config.weights_quantization_params["threshold"]))
        self.n_bits = quantization_config.weights_n_bits

    def initialize_quantization(self, tensor_shape, name, layer):
        # Creating new params for quantizer
        new_param = layer.add_weight(name=f"{name}_{NEW_PARAM}",
                                     shape=(),
                                     initializer=keras.initializers.Constant(1.0),
                                     trainable=True)
        new_param.assign(self.new_param)
        # Save the quantizer parameters for later calculations
        self.quantizer_parameters = {NEW_PARAM: new_param}
        return self.quantizer_parameters

    def __call__(self, inputs):
        # Your quantization logic here
        new_param = self.quantizer_parameters[NEW_PARAM]
        # Custom quantization function you need to implement
        quantized_inputs = custom_quantize(inputs, new_param, self.n_bits, signed=True)
        return quantized_inputs

    def convert2inferable(self):
        threshold = float(np.abs(self.quantizer_parameters[NEW_PARAM].numpy()))
        return qi.WeightsSymmetricInferableQuantizer(num_bits=self.n_bits, threshold=[threshold], per_channel=False)


@mark_quantizer(quantization_target=QuantizationTarget.Activation,
                quantization_method=[QuantizationMethod.SYMMETRIC],
                identifier=TrainingMethod.MyTraining)
class MyActivationsTrainingQuantizer(BaseKerasQATTrainableQuantizer):
    def __init__(self, quantization_config: NodeActivationQuantizationConfig):
        super(MyActivationsTrainingQuantizer, self).__init__(quantization_config)  # noqa: UP008 (as MCT writes it)
        # Define your new params here:
        self.new_param = float(quantization_config.activation_quantization_params["threshold"])
        self.signed = bool(quantization_config.activation_quantization_params.get("is_signed", True))
        self.n_bits = quantization_config.activation_n_bits

    def initialize_quantization(self, tensor_shape, name, layer):
        # Creating new params for quantizer
        new_param = layer.add_weight(name=f"{name}_{NEW_PARAM}",
                                     shape=(),
                                     initializer=keras.initializers.Constant(1.0),
                                     trainable=True)
        new_param.assign(self.new_param)
        # Save the quantizer parameters for later calculations
        self.quantizer_parameters = {NEW_PARAM: new_param}
        return self.quantizer_parameters

    def __call__(self, inputs):
        # Your quantization logic here
        new_param = self.quantizer_parameters[NEW_PARAM]
        # Custom quantization function you need to implement
        quantized_inputs = custom_quantize(inputs, new_param, self.n_bits, self.signed)
        return quantized_inputs

    def convert2inferable(self):
        threshold = float(np.abs(self.quantizer_parameters[NEW_PARAM].numpy()))
        return qi.ActivationSymmetricInferableQuantizer(num_bits=self.n_bits, threshold=[threshold],
                                                        signed=self.signed)


CONFIG = QATConfig(
    weight_training_method=TrainingMethod.MyTraining,
    activation_training_method=TrainingMethod.MyTraining,
    weight_quantization_method=QuantizationMethod.SYMMETRIC,
    activation_quantization_method=QuantizationMethod.SYMMETRIC,
    weight_per_channel=False,
)
X = np.random.default_rng(1).normal(size=(32, 8, 8, 1)).astype("float32")
Y = np.arange(32) % 3


def float_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1), name="image")
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inputs)
    outputs = keras.layers.Dense(3, name="fc")(keras.layers.Flatten(name="flat")(x))
    return keras.Model(inputs, outputs)


def readme_params(model: keras.Model) -> dict[str, float]:
    return {v.path: float(v.numpy()) for v in model.weights if v.path.endswith(NEW_PARAM)}


def compiled(model: keras.Model) -> keras.Model:
    # Adam moves every parameter by about the learning rate per step, the thresholds' small gradients too.
    model.compile(optimizer=keras.optimizers.Adam(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


@pytest.fixture
def qat_model() -> keras.Model:
    with pytest.warns(UserWarning, match="registers no threshold, range_min or range_max"):
        return compiled(quantize_model(float_model(), CONFIG, [X], progress=False))


def test_readme_quantizers_are_built_by_quantize_model(qat_model):
    wrappers = {layer.name: layer for layer in qat_model.layers if isinstance(layer, KerasTrainableQuantizationWrapper)}
    holders = [layer for layer in qat_model.layers if isinstance(layer, KerasActivationQuantizationHolder)]
    assert sorted(wrappers) == ["conv", "fc"]
    assert {type(w.weights_quantizers["kernel"]) for w in wrappers.values()} == {MyWeightsTrainingQuantizer}
    assert len(holders) == 3
    assert {type(h.activation_holder_quantizer) for h in holders} == {MyActivationsTrainingQuantizer}
    quantizer = wrappers["conv"].weights_quantizers["kernel"]
    variable = quantizer.quantizer_parameters[NEW_PARAM]
    assert any(variable is w for w in wrappers["conv"].weights)  # the layer's own variable
    assert quantizer.variables_in_group(VariableGroup.QPARAMS) == [variable]
    # MCT's tests read the weights as they are quantized, and the candidates under MCT's name.
    kernel = wrappers["conv"].layer.kernel
    expected = custom_quantize(kernel, variable, 8, True)
    np.testing.assert_array_equal(wrappers["conv"].get_quantized_weights()["kernel"], expected)
    assert quantizer.quantization_config.weights_bits_candidates is None


def test_readme_quantizers_train(qat_model):
    before = readme_params(qat_model)
    qat_model.fit(X, Y, epochs=3, batch_size=8, verbose=0)
    after = readme_params(qat_model)
    assert sorted(before) == sorted(after)
    assert len(before) == 5  # two weights, three activations
    trainable = {v.path for v in qat_model.trainable_weights}
    assert set(before) <= trainable
    # TensorFlow's op gives a threshold gradients from the values it clips; the activations' placeholder
    # threshold (8, not calibrated: the README's name is not `threshold`) clips none of these.
    moved = {path for path in before if before[path] != after[path]}
    assert moved == {"conv/kernel_new_param_name", "fc/kernel_new_param_name"}


def test_readme_quantizers_save_and_reload(qat_model, tmp_path):
    qat_model.fit(X, Y, epochs=2, batch_size=8, verbose=0)
    path = tmp_path / "qat.keras"
    qat_model.save(path)
    reloaded = keras_load_quantized_model(path)
    assert readme_params(reloaded) == readme_params(qat_model)
    np.testing.assert_array_equal(reloaded.predict(X, verbose=0), qat_model.predict(X, verbose=0))
    # Training goes on from the reloaded values.
    loaded = readme_params(reloaded)
    reloaded.fit(X, Y, epochs=1, batch_size=8, verbose=0)
    assert all(loaded[path] != readme_params(reloaded)[path] for path in ("conv/kernel_new_param_name",
                                                                          "fc/kernel_new_param_name"))


def test_readme_quantizers_convert(qat_model):
    qat_model.fit(X, Y, epochs=2, batch_size=8, verbose=0)
    inference = convert_to_inferable(qat_model)
    threshold = abs(float(qat_model.get_layer("conv").weights_quantizers["kernel"].quantizer_parameters[
        NEW_PARAM].numpy()))
    assert inference.get_layer("conv").weights_quantizers["kernel"].get_config()["threshold"] == [threshold]
    # The filled-in quantizer computes on the grid of the inferable quantizers: the converted model is exact.
    np.testing.assert_array_equal(inference.predict(X, verbose=0), qat_model.predict(X, verbose=0))
