"""Mixed precision: QAT models train under torch.autocast(bfloat16) and Keras' "mixed_bfloat16" policy.

The quantizers keep float32 variables, compute the grid in float32 and return the input's dtype: a bfloat16
(float16) input gives exactly the float32 quantization of the same values, rounded to bfloat16 (float16).
Thresholds 0.7 and ranges [-0.61, 1.37] are not bfloat16 numbers, so a grid computed in bfloat16 would differ.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from trainable_infra import (
    QATConfig,
    QuantizationMethod,
    TrainableQuantizerActivationConfig,
    TrainableQuantizerWeightsConfig,
    TrainingMethod,
)

MIN_THRESHOLD = 2.0**-16
METHODS = [TrainingMethod.STE, TrainingMethod.LSQ]
PARAMS = {QuantizationMethod.SYMMETRIC: {"threshold": 0.7}, QuantizationMethod.POWER_OF_TWO: {"threshold": 0.7},
          QuantizationMethod.UNIFORM: {"range_min": -0.61, "range_max": 1.37}}


def _digits(n: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """n of sklearn's bundled 8x8 digits as (n, 8, 8) float32 in [0, 1], and their labels."""
    data = load_digits()
    return (data.images[:n] / 16.0).astype(np.float32), data.target[:n].astype(np.int64)


def _activation_config(method: QuantizationMethod) -> TrainableQuantizerActivationConfig:
    params = dict(PARAMS[method], **({} if method is QuantizationMethod.UNIFORM else {"is_signed": True}))
    return TrainableQuantizerActivationConfig(method, 8, params, True, MIN_THRESHOLD)


def _weights_config(method: QuantizationMethod, per_channel: bool, axis: int) -> TrainableQuantizerWeightsConfig:
    return TrainableQuantizerWeightsConfig(method, 8, PARAMS[method], True, axis, per_channel, MIN_THRESHOLD)


# --- PyTorch ------------------------------------------------------------------------------------------------


torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402 - after the import guard

from trainable_infra.pytorch_backend import (  # noqa: E402
    LSQSymmetricActivationQuantizer,
    LSQSymmetricWeightQuantizer,
    LSQUniformActivationQuantizer,
    LSQUniformWeightQuantizer,
    PytorchTrainableActivationQuantizationHolder,
    PytorchTrainableQuantizationWrapper,
    STESymmetricActivationQuantizer,
    STEUniformWeightQuantizer,
    quantize_model,
)


def _float_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 10),
    )


def _torch_digits() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _digits()
    return torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_pytorch_qat_model_trains_under_bfloat16_autocast(method):
    x, y = _torch_digits()
    # BatchNorm kept: folded, this untrained model's BatchNorms (unit statistics) leave activations whose LSQ
    # threshold gradients (~1e-7) do not move a float32 threshold in six steps.
    config = QATConfig(weight_training_method=method, activation_training_method=method, fold_batch_norm=False)
    model = quantize_model(_float_cnn(), config, [x[:32]], progress=False)
    thresholds = {n: p for n, p in model.named_parameters() if n.endswith("threshold")}
    assert len(thresholds) == 7  # 3 weights, 4 activations (the input and each layer's output)
    learned = {n: p for n, p in thresholds.items() if p.requires_grad}
    assert len(learned) == (7 if method is TrainingMethod.LSQ else 0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for step in range(6):
        batch = slice(step % 2 * 32, step % 2 * 32 + 32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x[batch])
            loss = nn.functional.cross_entropy(out, y[batch])
        assert out.dtype == torch.bfloat16
        optimizer.zero_grad()
        loss.backward()
        for name, parameter in learned.items():
            assert parameter.grad.dtype == torch.float32, name
            assert torch.isfinite(parameter.grad).all(), name
        optimizer.step()
        losses.append(loss.item())
    assert np.all(np.isfinite(losses)), losses
    assert np.mean(losses[-2:]) < np.mean(losses[:2]), f"loss did not decrease: {losses}"  # the same two batches
    assert {p.dtype for p in thresholds.values()} == {torch.float32}
    for name, parameter in model.named_parameters():
        if name.endswith("threshold") or name.endswith("module.weight"):
            trained = name in learned or name.endswith("module.weight")
            assert torch.equal(parameter, before[name]) is not trained, f"{name}: trained {not trained}"


def test_pytorch_wrappers_and_holders_give_the_float_layers_dtypes_under_autocast():
    """Each wrapper returns what its float layer returns under autocast (bfloat16), each holder its input's dtype,
    for the model input (float32) and inside the network (bfloat16)."""
    x, _ = _torch_digits()
    float_model = _float_cnn()
    model = quantize_model(float_model, QATConfig(), [x[:32]], progress=False)
    dtypes: dict[str, tuple[torch.dtype, torch.dtype]] = {}

    def record(name):
        return lambda module, inputs, output: dtypes.__setitem__(name, (inputs[0].dtype, output.dtype))

    for prefix, root in (("float", float_model), ("qat", model)):
        for name, module in root.named_children():
            module.register_forward_hook(record(f"{prefix}:{name}"))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            root(x[:8])
    wrappers = [n for n, m in model.named_children() if isinstance(m, PytorchTrainableQuantizationWrapper)]
    holders = [n for n, m in model.named_children() if isinstance(m, PytorchTrainableActivationQuantizationHolder)]
    assert wrappers == ["0", "3", "7"]
    assert len(holders) == 4
    for name in wrappers:  # (input dtype, output dtype): float32 or bfloat16 in, bfloat16 out
        assert dtypes[f"qat:{name}"] == dtypes[f"float:{name}"], f"{name}: {dtypes[f'qat:{name}']}"
        assert dtypes[f"qat:{name}"][1] == torch.bfloat16
    seen = {dtypes[f"qat:{name}"][0] for name in holders}
    assert seen == {torch.float32, torch.bfloat16}, seen
    for name in holders:
        assert dtypes[f"qat:{name}"][1] == dtypes[f"qat:{name}"][0], f"{name}: {dtypes[f'qat:{name}']}"


TORCH_QUANTIZERS = [
    (STESymmetricActivationQuantizer, "activation", QuantizationMethod.SYMMETRIC, None),
    (LSQSymmetricActivationQuantizer, "activation", QuantizationMethod.POWER_OF_TWO, None),
    (LSQUniformActivationQuantizer, "activation", QuantizationMethod.UNIFORM, None),
    (LSQSymmetricWeightQuantizer, "weights", QuantizationMethod.SYMMETRIC, 0),
    (STEUniformWeightQuantizer, "weights", QuantizationMethod.UNIFORM, 0),
    (LSQUniformWeightQuantizer, "weights", QuantizationMethod.UNIFORM, None),
]


def _torch_quantizer(cls, target, method, axis):
    if target == "activation":
        quantizer, shape = cls(_activation_config(method)), None
    else:
        quantizer, shape = cls(_weights_config(method, axis is not None, axis or 0)), (6, 3, 5, 5)
    quantizer.initialize_quantization(shape, "q", nn.Module())
    return quantizer


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("autocast", [False, True], ids=["cast", "autocast"])
@pytest.mark.parametrize(("cls", "target", "method", "axis"), TORCH_QUANTIZERS,
                         ids=[f"{c.__name__}-{m.name}-{'per-channel' if a is not None else 'per-tensor'}"
                              for c, _, m, a in TORCH_QUANTIZERS])
def test_pytorch_quantizer_computes_in_float32_and_returns_the_input_dtype(cls, target, method, axis, autocast,
                                                                          dtype):
    """`.to(bfloat16)` / `.half()` inputs, in training and in eval, plain and under autocast: the output is the
    float32 quantization of the same values rounded to the dtype; in training the input gradient (in the input's
    dtype) is the float32 one."""
    quantizer = _torch_quantizer(cls, target, method, axis)
    x = (torch.randn(6, 3, 5, 5, generator=torch.Generator().manual_seed(1)) * 0.8).to(dtype)
    for training in (True, False):
        expected = quantizer(x.float(), training).to(dtype)
        xg = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            y = quantizer(xg, training)
        assert y.dtype == dtype
        assert torch.equal(y, expected), f"{(y != expected).sum()} outputs differ from the float32 grid"
        if training:
            (y.float() * 3.0).sum().backward()
            assert xg.grad.dtype == dtype
            x32 = x.float().requires_grad_()
            (quantizer(x32, training) * 3.0).sum().backward()
            assert torch.equal(xg.grad, x32.grad.to(dtype))


# --- Keras --------------------------------------------------------------------------------------------------


keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")
from trainable_infra import keras_backend as kb  # noqa: E402


@pytest.fixture
def mixed_bfloat16():
    """Keras' global dtype policy "mixed_bfloat16" for the test, restored afterwards whatever happens."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def _keras_cnn() -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((8, 8, 1), name="image"),
        keras.layers.Conv2D(8, 3, padding="same", name="conv"),
        keras.layers.BatchNormalization(name="bn"),
        keras.layers.ReLU(name="relu"),
        keras.layers.Flatten(name="flat"),
        keras.layers.Dense(10, name="fc"),
    ])


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_keras_qat_model_fits_and_reloads_under_mixed_bfloat16(mixed_bfloat16, method, tmp_path):
    x, y = _digits()
    x = x[..., None]
    # BatchNormalization kept, as in the PyTorch test: folded, the untrained BatchNormalization's unit statistics
    # leave the conv activation threshold's LSQ gradient too small to move it in three epochs.
    config = QATConfig(weight_training_method=method, activation_training_method=method, fold_batch_norm=False)
    model = kb.quantize_model(_keras_cnn(), config, x[:32], progress=False)
    quantized = [layer for layer in model.layers
                 if isinstance(layer, (kb.KerasTrainableQuantizationWrapper, kb.KerasActivationQuantizationHolder))]
    assert len(quantized) == 5
    variables = [v for layer in quantized for v in layer.weights if v.name.endswith("threshold")]
    assert len(variables) == 5
    assert {v.dtype for v in variables} == {"float32"}
    before = {v.path: v.numpy().copy() for v in variables}
    model.compile(optimizer=keras.optimizers.SGD(0.05),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    losses = model.fit(x, y, batch_size=32, epochs=3, shuffle=False, verbose=0).history["loss"]
    assert np.all(np.isfinite(losses)), losses
    assert losses[-1] < losses[0], losses
    assert {v.dtype for v in variables} == {"float32"}
    moved = [v.path for v in variables if not np.array_equal(v.numpy(), before[v.path])]
    assert len(moved) == (5 if method is TrainingMethod.LSQ else 0), moved
    # Holders keep their input's dtype: the model input's float32, bfloat16 after a layer; wrappers compute in bfloat16.
    dtypes = {layer.name: keras.backend.standardize_dtype(layer.output.dtype) for layer in quantized}
    assert dtypes.pop("image_activation_quantizer", None) == "float32", dtypes
    assert set(dtypes.values()) == {"bfloat16"}, dtypes
    assert str(model.predict(x[:8], verbose=0).dtype) == "bfloat16"
    # The dense wrapper's output is the float Dense layer's under the policy, run on the quantized kernel.
    wrapper = model.get_layer("fc")
    kernel = wrapper.weights_quantizers["kernel"](tf.convert_to_tensor(wrapper.layer.kernel), False)
    assert kernel.dtype == tf.float32
    dense = keras.layers.Dense(10)
    features = np.random.default_rng(0).normal(size=(4, 512)).astype(np.float32)
    dense.build((None, 512))
    dense.set_weights([kernel.numpy(), wrapper.layer.bias.numpy()])
    np.testing.assert_array_equal(wrapper(features).numpy(), dense(features).numpy())
    path = tmp_path / "qat.keras"
    model.save(path)
    reloaded = keras.models.load_model(path)
    assert reloaded.get_layer("fc").dtype_policy.name == "mixed_bfloat16"
    np.testing.assert_array_equal(reloaded.predict(x[:16], verbose=0), model.predict(x[:16], verbose=0))
    # What was trained is what is deployed: the converted model (float32 grids) gives the same bfloat16 outputs.
    converted = kb.convert_to_inferable(model)
    np.testing.assert_array_equal(converted(x[:16]).numpy(), model(x[:16], training=False).numpy())


KERAS_QUANTIZERS = [(kb.STESymmetricActivationQuantizer, QuantizationMethod.SYMMETRIC),
                    (kb.LSQSymmetricActivationQuantizer, QuantizationMethod.POWER_OF_TWO),
                    (kb.LSQUniformActivationQuantizer, QuantizationMethod.UNIFORM)]


@pytest.mark.parametrize(("cls", "method"), KERAS_QUANTIZERS, ids=[c.__name__ for c, _ in KERAS_QUANTIZERS])
def test_keras_holder_outputs_the_float32_quantization_in_bfloat16(mixed_bfloat16, cls, method):
    """A holder under the policy, given a bfloat16 tensor (the compute dtype, what a layer before it returns),
    quantizes in float32 with its float32 variables (not read in bfloat16) and returns bfloat16: the float32 output
    on the same values, rounded. A float32 input (a model input) stays float32."""
    holder = kb.KerasActivationQuantizationHolder(cls(_activation_config(method)))
    x = (np.random.default_rng(2).normal(size=(16, 40)) * 0.8).astype(np.float32)
    holder.build(x.shape)
    assert holder.compute_dtype == "bfloat16"
    assert {v.dtype for v in holder.weights} == {"float32"}
    as_bfloat16 = tf.cast(x, tf.bfloat16)
    for training in (True, False):
        y = holder(as_bfloat16, training=training)
        assert y.dtype == tf.bfloat16
        expected = tf.cast(holder.activation_holder_quantizer(tf.cast(as_bfloat16, tf.float32), training), tf.bfloat16)
        np.testing.assert_array_equal(tf.cast(y, tf.float32).numpy(), tf.cast(expected, tf.float32).numpy())
        y32 = holder(x, training=training)
        assert y32.dtype == tf.float32
        np.testing.assert_array_equal(y32.numpy(), holder.activation_holder_quantizer(tf.constant(x), training).numpy())
