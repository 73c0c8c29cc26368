"""Quantizers written as MCT's PyTorch QAT README shows them train, save / reload and convert here.

The two classes below keep the README's structure line for line: `__call__(self, inputs)` without the training
flag, `self.quantizer_parameters = {NEW_PARAM: layer.get_parameter(...)}` set (and returned) in
`initialize_quantization`, `super().__init__(quantization_config)`. The README leaves the quantization itself
(`custom_quantize`), the parameter's value and the inferable quantizer's arguments as `...`; they are filled in
here, and its `layer.register_parameter(self.new_param, requires_grad=True)` (not a signature torch has) is
written as torch takes it. Only the import lines differ from MCT's.
"""

from enum import Enum

import numpy as np
import pytest
import torch
from mct_quantizers import PytorchActivationQuantizationHolder, PytorchQuantizationWrapper
from mct_quantizers.pytorch import quantizers as qi
from torch import nn

from trainable_infra import (
    QATConfig,
    QuantizationMethod,
    QuantizationTarget,
    mark_quantizer,
)
from trainable_infra import TrainableQuantizerActivationConfig as NodeActivationQuantizationConfig
from trainable_infra import TrainableQuantizerWeightsConfig as NodeWeightsQuantizationConfig
from trainable_infra.pytorch_backend import (
    BasePytorchQATTrainableQuantizer,
    PytorchTrainableActivationQuantizationHolder,
    PytorchTrainableQuantizationWrapper,
    convert_to_inferable,
    quantize_model,
)


class TrainingMethod(Enum):
    """The user's own training methods (MCT's README assumes one added to its enum)."""

    MyQuantizerType = "mct-readme-my-quantizer-type"


NEW_PARAM = "new_param_name"


def custom_quantize(inputs: torch.Tensor, threshold: torch.Tensor, n_bits: int, signed: bool) -> torch.Tensor:
    """Symmetric fake quantization with a learned threshold (LSQ's gradients, torch's fused op)."""
    scale = threshold.abs().clamp_min(2.0**-16).reshape(1) / 2 ** (n_bits - int(signed))
    low, high = (-(2 ** (n_bits - 1)), 2 ** (n_bits - 1) - 1) if signed else (0, 2**n_bits - 1)
    zero_point = torch.zeros(1, device=inputs.device)
    return torch._fake_quantize_learnable_per_tensor_affine(inputs, scale, zero_point, low, high, 1.0)


@mark_quantizer(quantization_target=QuantizationTarget.Weights,
                quantization_method=[QuantizationMethod.SYMMETRIC],
                identifier=TrainingMethod.MyQuantizerType)
class MyWeightsTrainingQuantizer(BasePytorchQATTrainableQuantizer):
    def __init__(self, quantization_config: NodeWeightsQuantizationConfig):
        super(MyWeightsTrainingQuantizer, self).__init__(quantization_config)  # noqa: UP008 (as MCT writes it)
        # Define your new params here:
        self.new_param = NEW_PARAM
        self.threshold = float(np.max(quantization_config.weights_quantization_params["threshold"]))
        self.n_bits = quantization_config.weights_n_bits

    def initialize_quantization(self, tensor_shape, name, layer):
        # Creating new params for quantizer
        layer.register_parameter(self.new_param, nn.Parameter(torch.tensor(self.threshold), requires_grad=True))
        # Save the quantizer parameters for later calculations
        self.quantizer_parameters = {NEW_PARAM: layer.get_parameter(self.new_param)}
        return self.quantizer_parameters

    def __call__(self, inputs):
        # Your quantization logic here
        new_param = self.quantizer_parameters[NEW_PARAM]
        # Custom quantization function you need to implement
        quantized_inputs = custom_quantize(inputs, new_param, self.n_bits, signed=True)
        return quantized_inputs

    def convert2inferable(self):
        threshold = float(self.quantizer_parameters[NEW_PARAM].detach().abs())
        return qi.WeightsSymmetricInferableQuantizer(num_bits=self.n_bits, threshold=[threshold], per_channel=False)


@mark_quantizer(quantization_target=QuantizationTarget.Activation,
                quantization_method=[QuantizationMethod.SYMMETRIC],
                identifier=TrainingMethod.MyQuantizerType)
class MyActivationsTrainingQuantizer(BasePytorchQATTrainableQuantizer):
    def __init__(self, quantization_config: NodeActivationQuantizationConfig):
        super(MyActivationsTrainingQuantizer, self).__init__(quantization_config)  # noqa: UP008 (as MCT writes it)
        # Define your new params here:
        self.new_param = NEW_PARAM
        self.threshold = float(quantization_config.activation_quantization_params["threshold"])
        self.signed = bool(quantization_config.activation_quantization_params.get("is_signed", True))
        self.n_bits = quantization_config.activation_n_bits

    def initialize_quantization(self, tensor_shape, name, layer):
        # Creating new params for quantizer
        layer.register_parameter(self.new_param, nn.Parameter(torch.tensor(self.threshold), requires_grad=True))
        # Save the quantizer parameters for later calculations
        self.quantizer_parameters = {NEW_PARAM: layer.get_parameter(self.new_param)}
        return self.quantizer_parameters

    def __call__(self, inputs):
        # Your quantization logic here
        new_param = self.quantizer_parameters[NEW_PARAM]
        # Custom quantization function you need to implement
        quantized_inputs = custom_quantize(inputs, new_param, self.n_bits, self.signed)
        return quantized_inputs

    def convert2inferable(self):
        threshold = float(self.quantizer_parameters[NEW_PARAM].detach().abs())
        return qi.ActivationSymmetricInferableQuantizer(num_bits=self.n_bits, threshold=[threshold],
                                                        signed=self.signed)


CONFIG = QATConfig(
    weight_training_method=TrainingMethod.MyQuantizerType,
    activation_training_method=TrainingMethod.MyQuantizerType,
    weight_quantization_method=QuantizationMethod.SYMMETRIC,
    activation_quantization_method=QuantizationMethod.SYMMETRIC,
    weight_per_channel=False,
)


def float_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def data(n: int = 32) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def readme_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if name.endswith(NEW_PARAM)}


def train(model: nn.Module, steps: int = 5) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x = data()
    target = torch.arange(len(x)) % 3
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), target).backward()
        optimizer.step()


@pytest.fixture
def qat_model() -> nn.Module:
    with pytest.warns(UserWarning, match="registers no threshold, range_min or range_max"):
        return quantize_model(float_model(), CONFIG, [data()], progress=False)


def test_readme_quantizers_are_built_by_quantize_model(qat_model):
    wrappers = [m for m in qat_model.modules() if isinstance(m, PytorchTrainableQuantizationWrapper)]
    holders = [m for m in qat_model.modules() if isinstance(m, PytorchTrainableActivationQuantizationHolder)]
    assert {type(w.weights_quantizers["weight"]) for w in wrappers} == {MyWeightsTrainingQuantizer}
    assert len(holders) == 3
    assert {type(h.activation_holder_quantizer) for h in holders} == {MyActivationsTrainingQuantizer}
    quantizer = wrappers[0].weights_quantizers["weight"]
    # The README's dict holds the layer's own parameter; the library reads it as a quantization parameter.
    assert quantizer.quantizer_parameters[NEW_PARAM] is wrappers[0].get_parameter(NEW_PARAM)
    assert quantizer.get_trainable_variables(quantizer.registered_variables()[NEW_PARAM].group) == [
        wrappers[0].get_parameter(NEW_PARAM)
    ]
    # MCT's tests read the weights as they are quantized, and the candidates under MCT's name.
    quantized = wrappers[0].get_quantized_weights()["weight"]
    expected = custom_quantize(wrappers[0].module.weight, wrappers[0].get_parameter(NEW_PARAM), 8, True)
    assert torch.equal(quantized, expected)
    assert quantizer.quantization_config.weights_bits_candidates is None


def test_readme_quantizers_train(qat_model):
    before = readme_params(qat_model)
    train(qat_model)
    after = readme_params(qat_model)
    assert sorted(before) == sorted(after)
    assert len(before) == 5  # two weights, three activations
    assert all(not torch.equal(before[name], after[name]) for name in before), "thresholds get gradients"


def test_readme_quantizers_save_and_reload(qat_model, tmp_path):
    train(qat_model)
    qat_model.eval()
    x = data(8)
    expected = qat_model(x)
    torch.save(qat_model.state_dict(), tmp_path / "qat.pt")
    with pytest.warns(UserWarning, match="registers no threshold"):
        reloaded = quantize_model(float_model(), CONFIG, [data()], progress=False)
    reloaded.load_state_dict(torch.load(tmp_path / "qat.pt", weights_only=True))
    reloaded.eval()
    assert torch.equal(reloaded(x), expected)
    # The README's dict holds the parameters the state dict was loaded into (in place): training goes on.
    loaded = readme_params(reloaded)
    train(reloaded, steps=1)
    assert all(not torch.equal(loaded[name], value) for name, value in readme_params(reloaded).items())


def test_readme_quantizers_convert(qat_model):
    train(qat_model)
    qat_model.eval()
    trained = readme_params(qat_model)
    inferable = convert_to_inferable(qat_model)
    modules = dict(inferable.named_modules())
    for name, value in trained.items():
        owner = modules[name.rsplit(".", 1)[0]]
        if isinstance(owner, PytorchQuantizationWrapper):
            quantizer = owner.weights_quantizers["weight"]
        else:
            assert isinstance(owner, PytorchActivationQuantizationHolder)
            quantizer = owner.activation_holder_quantizer
        np.testing.assert_array_equal(np.ravel(quantizer.threshold_np), [abs(float(value))])
    x = data(8)
    with torch.no_grad():
        qat, converted = qat_model(x), inferable(x)
    # The filled-in quantizer computes on the grid the inferable quantizers use: the converted model is exact.
    assert torch.equal(converted, qat)
