"""`quantize_model` and `convert_to_inferable` that fail partway leave the user's model exactly as it was, and say
which layer failed."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from trainable_infra import QATConfig, QuantizerNotFoundError

# The third quantized layer ("fc") asks for a training method no quantizer implements.
BAD_WEIGHTS = QATConfig(overrides={"fc": {"weight_training_method": "no_such_method"}})
BAD_ACTIVATIONS = QATConfig(overrides={"fc": {"activation_training_method": "no_such_method"}})


class _FailOnSecondCall:
    """Replaces `cls.convert2inferable`: the first call converts, the second raises."""

    def __init__(self, cls: type, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        original = cls.convert2inferable

        def convert2inferable(quantizer: Any) -> Any:
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("simulated failure in convert2inferable")
            return original(quantizer)

        monkeypatch.setattr(cls, "convert2inferable", convert2inferable)


def _notes(error: pytest.ExceptionInfo) -> str:
    return " ".join(getattr(error.value, "__notes__", []))


def _x() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(8, 8, 8, 1)).astype(np.float32)


# --- PyTorch --------------------------------------------------------------------------------------------------

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402 - after the import guard
from torch.nn import functional as F  # noqa: E402, N812

from trainable_infra.pytorch_backend import (  # noqa: E402
    STESymmetricWeightQuantizer,
    convert_to_inferable,
    freeze_bn_stats,
    quantize_model,
)
from trainable_infra.pytorch_backend.training import quantizers_of  # noqa: E402


class _TorchNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return self.fc(torch.flatten(F.relu(self.conv2(x)), 1))


def _torch_x() -> torch.Tensor:
    return torch.from_numpy(_x()).permute(0, 3, 1, 2).contiguous()


def _torch_snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything a failed call must leave as it was: values, module tree, modes, hooks, quantizer state."""
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "tree": [(name, type(m), m.training, len(m._forward_pre_hooks), len(m._forward_hooks))
                 for name, m in model.named_modules()],
        "parameters": [(name, id(p), p.requires_grad) for name, p in model.named_parameters()],
        "quantizers": [
            (name, type(q), q.freeze_quant_params, q.quantization_config.to_dict(),
             [id(q.get_quantizer_variable(k)) for k in q.quantizer_parameters])
            for name, q in quantizers_of(model).items()
        ],
    }


def _assert_same_torch_snapshot(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert list(before["state"]) == list(after["state"])
    for name, value in before["state"].items():
        assert torch.equal(value, after["state"][name]), name
    assert before["tree"] == after["tree"]
    assert before["parameters"] == after["parameters"]
    assert before["quantizers"] == after["quantizers"]


def test_torch_convert_failing_at_the_second_wrapper_leaves_the_model_unchanged(monkeypatch):
    torch.manual_seed(0)
    qat = quantize_model(_TorchNet(), QATConfig(), [_torch_x()], progress=False)
    qat.train()
    qat(_torch_x())
    freeze_bn_stats(qat)
    before = _torch_snapshot(qat)
    assert before["quantizers"]

    failing = _FailOnSecondCall(STESymmetricWeightQuantizer, monkeypatch)
    with pytest.raises(RuntimeError, match="simulated failure") as error:
        convert_to_inferable(qat)
    assert failing.calls == 2
    assert "'conv2'" in _notes(error)
    assert "STESymmetricWeightQuantizer" in _notes(error)
    _assert_same_torch_snapshot(before, _torch_snapshot(qat))

    monkeypatch.undo()
    converted = convert_to_inferable(qat)  # the model still converts, to what it computes
    qat.eval()
    assert torch.equal(converted(_torch_x()), qat(_torch_x()))


@pytest.mark.parametrize("config", [BAD_WEIGHTS, BAD_ACTIVATIONS], ids=["weights", "activations"])
def test_torch_quantize_failing_at_the_third_layer_leaves_the_model_unchanged(config):
    torch.manual_seed(0)
    model = _TorchNet().eval()
    before = _torch_snapshot(model)
    with pytest.raises(QuantizerNotFoundError, match="no_such_method") as error:
        quantize_model(model, config, [_torch_x()], progress=False)
    assert "'fc'" in _notes(error)
    _assert_same_torch_snapshot(before, _torch_snapshot(model))
    assert not any("activation_quantizer" in name for name, _ in model.named_modules())


# --- Keras ----------------------------------------------------------------------------------------------------

keras = pytest.importorskip("keras")

from trainable_infra.keras_backend import STESymmetricWeightQuantizer as KerasSTEWeightQuantizer  # noqa: E402
from trainable_infra.keras_backend import convert_to_inferable as keras_convert  # noqa: E402
from trainable_infra.keras_backend import quantize_model as keras_quantize_model  # noqa: E402
from trainable_infra.keras_backend.training import quantizers_of as keras_quantizers_of  # noqa: E402


def _keras_float_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1), name="image")
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.Flatten()(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="fc")(x), name="net")


def _keras_snapshot(model: keras.Model) -> dict[str, Any]:
    return {
        "weights": [(v.path, v.trainable, v.numpy().copy()) for v in model.weights],
        "variables": [id(v) for v in model.weights],
        "layers": [(layer.name, type(layer), layer.trainable, len(layer._inbound_nodes)) for layer in model.layers],
        "config": model.get_config(),
        "quantizers": [
            (name, type(q), q.freeze_quant_params, q.get_config(),
             [id(q.get_quantizer_variable(k)) for k in q.quantizer_parameters])
            for name, q in keras_quantizers_of(model).items()
        ],
        "compiled": model.compiled,
    }


def _assert_same_keras_snapshot(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert [w[:2] for w in before["weights"]] == [w[:2] for w in after["weights"]]
    for (path, _, a), (_, _, b) in zip(before["weights"], after["weights"], strict=True):
        assert np.array_equal(a, b), path
    for key in ("variables", "layers", "config", "quantizers", "compiled"):
        assert before[key] == after[key], key


def test_keras_convert_failing_at_the_second_wrapper_leaves_the_model_unchanged(monkeypatch):
    qat = keras_quantize_model(_keras_float_model(), QATConfig(), _x(), progress=False)
    qat.compile(optimizer="adam", loss="mse")
    before = _keras_snapshot(qat)
    assert before["quantizers"]
    expected = qat.predict(_x(), verbose=0)

    failing = _FailOnSecondCall(KerasSTEWeightQuantizer, monkeypatch)
    with pytest.raises(RuntimeError, match="simulated failure") as error:
        keras_convert(qat)
    assert failing.calls == 2
    assert "'conv2'" in _notes(error)
    _assert_same_keras_snapshot(before, _keras_snapshot(qat))
    np.testing.assert_array_equal(qat.predict(_x(), verbose=0), expected)

    monkeypatch.undo()
    np.testing.assert_array_equal(keras_convert(qat).predict(_x(), verbose=0), expected)


@pytest.mark.parametrize("config", [BAD_WEIGHTS, BAD_ACTIVATIONS], ids=["weights", "activations"])
def test_keras_quantize_failing_at_the_third_layer_leaves_the_model_unchanged(config):
    model = _keras_float_model()
    model.compile(optimizer="adam", loss="mse")
    before = _keras_snapshot(model)
    with pytest.raises(QuantizerNotFoundError, match="no_such_method") as error:
        keras_quantize_model(model, config, _x(), progress=False)
    assert "'fc'" in _notes(error)
    _assert_same_keras_snapshot(before, _keras_snapshot(model))
