"""Model-level QAT in Keras 3: quantize_model, calibrate, train with fit, save/reload, convert, freeze, report."""

from __future__ import annotations

import re
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn.datasets import load_digits

from tests.keras_backend.zoo import Subclassed, tiny_decoder, tiny_mobilenet, tiny_resnet, tiny_sequential
from trainable_infra import (
    QATConfig,
    QuantizationConfigError,
    QuantizationMethod,
    QuantizationTarget,
    TrainableQuantizerActivationConfig,
    TrainingMethod,
    mark_quantizer,
)
from trainable_infra.keras_backend import (
    BaseKerasActivationTrainableQuantizer,
    KerasActivationQuantizationHolder,
    KerasInferableActivationQuantizationHolder,
    KerasInferableQuantizationWrapper,
    KerasTrainableQuantizationWrapper,
    QuantizerFreezeCallback,
    STESymmetricActivationQuantizer,
    calibrate,
    convert_to_inferable,
    freeze_bn_stats,
    freeze_quantizers,
    quantization_report,
    quantize_model,
    unfreeze_bn_stats,
    unfreeze_quantizers,
)


def _digits(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `n` of scikit-learn's bundled 8x8 digits, as (N, 8, 8, 1) float32 in [0, 1] and labels."""
    data = load_digits()
    return (data.images[:n] / 16.0).astype(np.float32)[..., None], data.target[:n].astype(np.int64)


X, Y = _digits(128)
DATA = [(X[:64], Y[:64]), (X[64:], Y[64:])]
EXPECTED_HOLDERS = {
    tiny_resnet: {
        "x": True, "stem": False, "layer1_conv1": False, "layer1_conv2": True, "layer1_add": False,
        "layer2_conv1": False, "layer2_conv2": True, "layer2_shortcut": True, "layer2_add": False,
        "fc_input": False, "fc": True,
    },
    tiny_mobilenet: {
        "x": True, "stem": False, "expand": False, "depthwise": False, "project": True, "add": True,
        "branch_a": False, "branch_b_depthwise": True, "branch_b_pointwise": False, "cat": False, "head_input": False,
        "head": True,
    },
}  # holder base name -> signed (the input is signed: the holder cannot know the data is non-negative); "<layer>_input"
# quantizes the pooled features the dense head reads (QATConfig.integer_bias), unsigned where they average an
# unsigned holder's output
QUANTIZABLE = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D, keras.layers.Dense)


def rebuilt_names(layers: list[keras.layers.Layer]) -> list[str]:
    """The names `layers` have in a QAT model: a separable convolution becomes its depthwise and pointwise parts."""
    return [name for layer in layers for name in (
        [f"{layer.name}_depthwise", f"{layer.name}_pointwise"] if isinstance(layer, keras.layers.SeparableConv2D)
        else [layer.name])]


def holders(model):
    return {layer.name: layer for layer in model.layers if isinstance(layer, KerasActivationQuantizationHolder)}


def wrappers(model):
    return {layer.name: layer for layer in model.layers if isinstance(layer, KerasTrainableQuantizationWrapper)}


def thresholds(model):
    return {v.path: v for v in model.weights if v.name.endswith("_threshold")}


def compiled(model, lr=0.05):
    model.compile(optimizer=keras.optimizers.SGD(lr, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def fit(model, epochs=1, **kwargs):
    return model.fit(X, Y, batch_size=32, epochs=epochs, shuffle=False, verbose=0, **kwargs)


def quiet_quantize(model, config=None):
    """quantize_model without data: the default parameters and their warning, expected here."""
    with pytest.warns(UserWarning, match="no representative_data"):
        return quantize_model(model, config)


@pytest.mark.parametrize("architecture", [tiny_resnet, tiny_mobilenet])
def test_quantize_places_wrappers_and_holders_on_layers_and_merges(architecture):
    float_model = architecture()
    qat = quantize_model(float_model, QATConfig(), DATA, progress=False)
    assert sorted(wrappers(qat)) == sorted(rebuilt_names([layer for layer in float_model.layers
                                                          if isinstance(layer, QUANTIZABLE)]))
    found = {name.removesuffix("_activation_quantizer"): holder for name, holder in holders(qat).items()}
    assert set(found) == set(EXPECTED_HOLDERS[architecture])
    signed = {name: holder.activation_holder_quantizer.params.signed for name, holder in found.items()}
    assert signed == EXPECTED_HOLDERS[architecture]
    # Every BatchNormalization of these models follows a convolution: folded into it and left out.
    assert [layer.name for layer in qat.layers if not isinstance(layer, KerasActivationQuantizationHolder)] == (
        rebuilt_names([layer for layer in float_model.layers
                       if not isinstance(layer, keras.layers.BatchNormalization)]))


def test_kernels_are_quantized_per_output_channel():
    qat = quantize_model(tiny_mobilenet(), QATConfig(), DATA, progress=False)
    found = wrappers(qat)
    # The separable convolution's parts: (3, 3, 8, 1) depthwise, per input channel (axis 2); (1, 1, 8, 4)
    # pointwise, per output channel (axis 3).
    assert found["branch_b_depthwise"].weights_quantizers["kernel"].axis == 2
    assert found["branch_b_depthwise"].weights_quantizers["kernel"].threshold.shape == (8,)
    assert found["branch_b_pointwise"].weights_quantizers["kernel"].axis == 3
    assert found["depthwise"].weights_quantizers["kernel"].axis == 2
    assert found["head"].weights_quantizers["kernel"].axis == 1
    kernel = found["stem"].layer.kernel.numpy()
    np.testing.assert_allclose(found["stem"].weights_quantizers["kernel"].threshold.numpy(),
                               np.abs(kernel).max(axis=(0, 1, 2)), rtol=1e-6)


def test_transposed_and_1d_convolutions_use_their_output_channel_axis():
    qat = quantize_model(tiny_decoder(), QATConfig(weight_n_bits=4), DATA, progress=False)
    found = wrappers(qat)
    assert sorted(found) == ["fc", "seq", "up"]
    # Conv2DTranspose kernels are (3, 3, out=6, in=1): per output channel is axis 2.
    assert found["up"].weights_quantizers["kernel"].axis == 2
    assert found["up"].weights_quantizers["kernel"].threshold.shape == (6,)
    assert found["seq"].weights_quantizers["kernel"].axis == 2
    signed = {name: h.activation_holder_quantizer.params.signed for name, h in holders(qat).items()}
    assert signed == {"x_activation_quantizer": True, "up_activation_quantizer": False,
                      "seq_activation_quantizer": True, "fc_input_activation_quantizer": True,
                      "fc_activation_quantizer": True}
    assert np.isfinite(fit(compiled(qat)).history["loss"][0])


@pytest.mark.parametrize("method", [TrainingMethod.STE, TrainingMethod.LSQ])
@pytest.mark.parametrize("architecture", [tiny_resnet, tiny_mobilenet])
def test_train_save_reload_convert(architecture, method, tmp_path):
    config = QATConfig(weight_training_method=method, activation_training_method=method, weight_n_bits=4)
    qat = compiled(quantize_model(architecture(), config, DATA, progress=False))
    assert np.isfinite(fit(qat, epochs=2).history["loss"]).all()
    expected = qat.predict(X, verbose=0)

    qat.save(tmp_path / "qat.keras")
    reloaded = keras.models.load_model(tmp_path / "qat.keras")  # safe mode, no custom_objects
    np.testing.assert_array_equal(reloaded.predict(X, verbose=0), expected)

    # A model rebuilt from the float model and config, with default parameters, takes the trained weights.
    rebuilt = quiet_quantize(architecture(seed=1), config)
    rebuilt.load_weights(tmp_path / "qat.keras")
    np.testing.assert_array_equal(rebuilt.predict(X, verbose=0), expected)

    converted = convert_to_inferable(qat)
    assert not wrappers(converted)
    assert not holders(converted)
    assert any(isinstance(layer, KerasInferableQuantizationWrapper) for layer in converted.layers)
    np.testing.assert_array_equal(converted.predict(X, verbose=0), expected)
    converted.save(tmp_path / "inferable.keras")
    loaded = keras.models.load_model(tmp_path / "inferable.keras")
    assert sum(isinstance(layer, KerasInferableActivationQuantizationHolder) for layer in loaded.layers) == (
        11 if architecture is tiny_resnet else 12)  # tiny_mobilenet's separable convolution: one between its parts
    np.testing.assert_array_equal(loaded.predict(X, verbose=0), expected)


def test_sequential_model_stays_sequential_and_keeps_its_compile_settings(tmp_path):
    float_model = tiny_sequential()
    compiled(float_model)
    qat = quantize_model(float_model, QATConfig(weight_n_bits=4), X, progress=False)
    assert isinstance(qat, keras.Sequential)
    assert [layer.name for layer in qat.layers] == [
        "image_activation_quantizer", "conv", "relu", "conv_activation_quantizer", "pool",
        "fc_input_activation_quantizer", "fc", "fc_activation_quantizer",
    ]  # bn is folded into conv; the pooled features are quantized for fc (QATConfig.integer_bias)
    assert qat.compiled
    assert qat.optimizer is not float_model.optimizer
    assert np.isfinite(fit(qat).history["loss"][0])
    qat.save(tmp_path / "sequential.keras")
    reloaded = keras.models.load_model(tmp_path / "sequential.keras")
    assert isinstance(reloaded, keras.Sequential)
    np.testing.assert_array_equal(reloaded.predict(X, verbose=0), qat.predict(X, verbose=0))


def test_input_model_is_not_mutated():
    float_model = tiny_resnet()
    before = [v.numpy().copy() for v in float_model.weights]
    layers_before = list(float_model.layers)
    qat = compiled(quantize_model(float_model, QATConfig(), DATA, progress=False))
    fit(qat)
    assert list(float_model.layers) == layers_before
    assert all(np.array_equal(b, v.numpy()) for b, v in zip(before, float_model.weights, strict=True))
    float_ids = {id(v) for v in float_model.weights}
    assert not any(id(v) in float_ids for v in qat.weights)


def test_quantized_model_starts_from_the_float_weights():
    float_model = tiny_resnet()
    qat = quantize_model(float_model, QATConfig(weight_n_bits=16, activation_n_bits=16), DATA, progress=False)
    np.testing.assert_array_equal(wrappers(qat)["fc"].layer.kernel.numpy(), float_model.get_layer("fc").kernel.numpy())
    np.testing.assert_allclose(qat.predict(X, verbose=0), float_model.predict(X, verbose=0), atol=2e-3)


def test_overrides_and_skips_apply():
    config = QATConfig(
        weight_n_bits=4,
        overrides={"fc": {"weight_n_bits": 8, "activation_n_bits": 6}, "layer2_*": {"skip": True}},
    )
    qat = quantize_model(tiny_resnet(), config, DATA, progress=False)
    wrapped = wrappers(qat)
    assert not any(name.startswith("layer2_") for name in wrapped)
    assert wrapped["fc"].weights_quantizers["kernel"].quantization_config.weights_n_bits == 8
    assert wrapped["layer1_conv1"].weights_quantizers["kernel"].quantization_config.weights_n_bits == 4
    found = holders(qat)
    assert found["fc_activation_quantizer"].activation_holder_quantizer.quantization_config.activation_n_bits == 6
    assert not any(name.startswith("layer2_") for name in found)
    assert isinstance(qat.get_layer("layer2_conv1"), keras.layers.Conv2D)


def test_weights_only_config_adds_no_holders_and_needs_no_data():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no activation quantizers: nothing to calibrate, no warning
        qat = quantize_model(tiny_mobilenet(), QATConfig(quantize_activations=False))
    assert not holders(qat)
    assert len(wrappers(qat)) == 8  # the separable convolution's two parts


def test_training_method_override_and_per_tensor_weights():
    config = QATConfig(weight_per_channel=False, overrides={"head": {"weight_training_method": TrainingMethod.LSQ}})
    qat = quantize_model(tiny_mobilenet(), config, DATA, progress=False)
    head = wrappers(qat)["head"].weights_quantizers["kernel"]
    assert type(head).__name__ == "LSQSymmetricWeightQuantizer"
    assert head.axis is None
    assert head.threshold.shape == ()
    assert type(wrappers(qat)["stem"].weights_quantizers["kernel"]).__name__ == "STESymmetricWeightQuantizer"


def test_calibration_sets_thresholds_from_data():
    qat = quantize_model(tiny_resnet(), QATConfig(), DATA, progress=False)
    input_quantizer = holders(qat)["x_activation_quantizer"].activation_holder_quantizer
    assert float(input_quantizer.threshold.numpy()) == pytest.approx(float(np.abs(X).max()))
    new = calibrate(qat, [X[:16] * 2], progress=False)
    assert set(new) == set(holders(qat))
    assert new["x_activation_quantizer"]["threshold"] == pytest.approx(float(np.abs(X[:16]).max() * 2))
    assert float(input_quantizer.threshold.numpy()) == pytest.approx(float(np.abs(X[:16]).max() * 2))


def test_calibrate_takes_arrays_batches_and_datasets_alike():
    qat = quiet_quantize(tiny_mobilenet())
    dataset = tf.data.Dataset.from_tensor_slices((X, Y)).batch(50)
    results = [calibrate(qat, data, progress=False) for data in (X, DATA, dataset, [tf.constant(X)])]
    for result in results[1:]:
        assert result.keys() == results[0].keys()
        for name in result:
            assert result[name]["threshold"] == pytest.approx(results[0][name]["threshold"], rel=1e-6), name
    limited = calibrate(qat, [X[:8], X], num_batches=1, progress=False)
    assert limited["x_activation_quantizer"]["threshold"] == pytest.approx(float(np.abs(X[:8]).max()))


def test_calibration_runs_with_quantization_off():
    # 16-bit weights keep the stem close to float; a 2-bit input quantizer, if it were on, would not.
    qat = quantize_model(tiny_resnet(), QATConfig(weight_n_bits=16, activation_n_bits=2), DATA, progress=False)
    float_model = tiny_resnet()
    probe = keras.Model(float_model.input, float_model.get_layer("stem_relu").output)
    stem = calibrate(qat, [X], progress=False)["stem_activation_quantizer"]["threshold"]
    assert stem == pytest.approx(float(probe(X).numpy().max()), rel=1e-3)


def test_uniform_activations_and_mse_init():
    config = QATConfig(
        activation_quantization_method=QuantizationMethod.UNIFORM, weight_init="mse", activation_calibration="mse"
    )
    qat = quantize_model(tiny_mobilenet(), config, DATA, progress=False)
    quantizer = holders(qat)["x_activation_quantizer"].activation_holder_quantizer
    assert float(quantizer.range_min.numpy()) <= 0 < float(quantizer.range_max.numpy()) <= float(X.max())
    assert np.isfinite(fit(compiled(qat)).history["loss"][0])


def test_lsq_quantizer_parameters_train_and_freeze_mid_training():
    config = QATConfig(weight_training_method=TrainingMethod.LSQ, activation_training_method=TrainingMethod.LSQ)
    qat = compiled(quantize_model(tiny_resnet(), config, DATA, progress=False), lr=0.01)
    learned = thresholds(qat)
    assert len(learned) == 7 + 11
    assert all(v.trainable for v in learned.values())
    before = {k: v.numpy().copy() for k, v in learned.items()}
    fit(qat)  # traces the train step with the thresholds trainable
    assert any(not np.array_equal(before[k], v.numpy()) for k, v in learned.items())

    assert freeze_quantizers(qat) == len(learned)
    assert freeze_quantizers(qat) == 0
    assert not any(v.trainable for v in learned.values())
    frozen = {k: v.numpy().copy() for k, v in learned.items()}
    fit(qat)
    assert all(np.array_equal(frozen[k], v.numpy()) for k, v in learned.items())

    assert unfreeze_quantizers(qat) == len(learned)
    fit(qat)
    assert any(not np.array_equal(frozen[k], v.numpy()) for k, v in learned.items())


def test_freezing_leaves_fixed_ste_parameters_fixed():
    qat = quantize_model(tiny_resnet(), QATConfig(), DATA, progress=False)
    assert freeze_quantizers(qat) == 0
    assert unfreeze_quantizers(qat) == 0
    assert not any(v.trainable for v in thresholds(qat).values())


def test_freeze_bn_stats_keeps_moving_statistics():
    # BatchNormalizations stay (not folded) to have statistics to freeze.
    qat = compiled(quantize_model(tiny_resnet(), QATConfig(fold_batch_norm=False), DATA, progress=False))
    batch_norm = qat.get_layer("layer1_conv1_bn")
    fit(qat)
    assert freeze_bn_stats(qat) == 6
    mean = batch_norm.moving_mean.numpy().copy()
    fit(qat)
    np.testing.assert_array_equal(batch_norm.moving_mean.numpy(), mean)
    assert unfreeze_bn_stats(qat) == 6
    fit(qat)
    assert not np.array_equal(batch_norm.moving_mean.numpy(), mean)


def test_freeze_callback_applies_from_its_epoch():
    config = QATConfig(weight_training_method=TrainingMethod.LSQ, activation_training_method=TrainingMethod.LSQ,
                       fold_batch_norm=False)  # BatchNormalizations kept, for their statistics
    qat = compiled(quantize_model(tiny_resnet(), config, DATA, progress=False), lr=0.01)
    learned = thresholds(qat)
    initial = {k: v.numpy().copy() for k, v in learned.items()}
    mean = qat.get_layer("stem_bn").moving_mean
    seen = []
    record = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: seen.append(({k: v.numpy().copy() for k, v in learned.items()},
                                                      mean.numpy().copy())))
    fit(qat, epochs=3, callbacks=[QuantizerFreezeCallback(freeze_quantizers_at=1, freeze_bn_stats_at=2), record])
    (t0, m0), (t1, m1), (t2, m2) = seen
    assert any(not np.array_equal(initial[k], t0[k]) for k in initial)
    assert all(np.array_equal(t0[k], t1[k]) and np.array_equal(t1[k], t2[k]) for k in initial)
    assert not np.array_equal(m0, m1)
    np.testing.assert_array_equal(m1, m2)


def test_quantization_report_rows_and_table(capsys):
    qat = quantize_model(tiny_mobilenet(), QATConfig(weight_n_bits=4), DATA, progress=False)
    rows = quantization_report(qat, DATA)
    table = capsys.readouterr().out
    kernels = sum(len(w.weights_quantizers) for w in wrappers(qat).values())
    assert len(rows) == kernels + len(holders(qat))
    weights = [r for r in rows if r["kind"] == "weights"]
    assert all(r["bits"] == 4 for r in weights)
    assert {r["layer"] for r in weights} >= {"branch_b_depthwise.kernel", "branch_b_pointwise.kernel"}
    assert all(np.isfinite(r["sqnr_db"]) and r["sqnr_db"] > 5 for r in rows)
    assert all(r["parameters"].startswith("threshold ") for r in rows)
    assert "SQNR dB" in table
    assert "cat_activation_quantizer" in table
    without_data = quantization_report(qat, print_table=False)
    assert all(r["sqnr_db"] is None for r in without_data if r["kind"] == "activation")


@mark_quantizer(
    quantization_target=QuantizationTarget.Activation,
    quantization_method=[QuantizationMethod.UNIFORM],
    identifier="test-model-api-fixed-zero",
)
@keras.saving.register_keras_serializable(package="tests")
class FixedZeroActivationQuantizer(BaseKerasActivationTrainableQuantizer):
    """A user's quantizer: uniform on [0, range_max], with only range_max as a variable."""

    def initialize_quantization(self, tensor_shape, name, layer):
        top = self.quantization_config.activation_quantization_params["range_max"]
        self.range_max = self.add_quantizer_weight(layer, f"{name}_range_max", top, trainable=False)

    def __call__(self, inputs, training=False):
        return keras.quantizers.fake_quant_with_min_max_vars(
            inputs, 0.0, self.range_max, num_bits=self.quantization_config.activation_n_bits)

    def convert2inferable(self):
        raise NotImplementedError("not needed by these tests")


def test_user_defined_training_method_is_resolved_and_calibrated():
    config = QATConfig(activation_training_method="test-model-api-fixed-zero",
                       activation_quantization_method=QuantizationMethod.UNIFORM)
    qat = quantize_model(tiny_sequential(), config, X, progress=False)
    found = holders(qat)
    assert all(isinstance(h.activation_holder_quantizer, FixedZeroActivationQuantizer) for h in found.values())
    assert float(found["image_activation_quantizer"].activation_holder_quantizer.range_max.numpy()) == pytest.approx(
        float(X.max()))


def test_functional_ops_nested_models_and_lambdas():
    inner = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, name="inner_conv")], name="inner")
    inputs = keras.Input((8, 8, 1), name="x")
    y = keras.layers.Lambda(lambda t: t * 2.0, name="double")(inputs)
    y = keras.ops.relu(inner(y))
    outputs = keras.layers.Dense(10, name="fc")(keras.layers.Flatten(name="flat")(y))
    model = keras.Model(inputs, outputs)
    qat = quantize_model(model, QATConfig(), DATA, progress=False)
    assert sorted(wrappers(qat)) == ["fc", "inner_conv"]  # the nested model's layers are inlined
    np.testing.assert_allclose(qat.predict(X, verbose=0), model.predict(X, verbose=0), atol=0.1)


def test_unsigned_holder_warns_when_calibrated_on_negative_values():
    config = TrainableQuantizerActivationConfig(
        QuantizationMethod.SYMMETRIC, 8, {"threshold": 1.0, "is_signed": False}, True, 2**-16
    )
    inputs = keras.Input((8, 8, 1))
    outputs = KerasActivationQuantizationHolder(STESymmetricActivationQuantizer(config), name="unsigned")(inputs)
    model = keras.Model(inputs, outputs)
    with pytest.warns(UserWarning, match="unsigned quantizes unsigned but saw values down to -1"):
        calibrate(model, [-X], progress=False)


def _unquantizable():
    return keras.Sequential([keras.Input((4,)), keras.layers.ReLU()], name="plain")


BAD = [
    ("no quantizable layer", lambda: quantize_model(_unquantizable(), QATConfig()),
     "'plain' has no layer to quantize"),
    ("override naming no layer",
     lambda: quantize_model(tiny_resnet(), QATConfig(overrides={"classifier": {"skip": True}})),
     "override pattern 'classifier' matches no layer of the model; its layers are: x, stem, stem_bn"),
    ("data of the wrong shape", lambda: quantize_model(tiny_resnet(), QATConfig(), [np.zeros((2, 9, 9, 1))],
                                                       progress=False),
     "representative data batch 0 (input shapes [(2, 9, 9, 1)]) does not run through the model"),
    ("data of the wrong kind", lambda: quantize_model(tiny_resnet(), QATConfig(), ["images"], progress=False),
     "each batch of representative data must be an array or tensor, or an (inputs, targets) tuple, got str"),
    ("data that is not a dataset", lambda: quantize_model(tiny_resnet(), QATConfig(), 3, progress=False),
     "representative data must be an array of samples or an iterable of batches"),
    ("empty data", lambda: quantize_model(tiny_resnet(), QATConfig(), [], progress=False),
     "representative data is empty"),
    ("convert an unquantized model", lambda: convert_to_inferable(tiny_resnet()),
     "model 'tiny_resnet' has no trainable quantization wrapper or holder"),
    ("config of the wrong type", lambda: quantize_model(tiny_resnet(), {"weight_n_bits": 4}),
     "qat_config must be a QATConfig"),
    ("unsupported layer type", lambda: quantize_model(tiny_resnet(), QATConfig(layer_types=["BatchNormalization"])),
     "layer_types names ['BatchNormalization'], which the Keras backend cannot quantize"),
    ("bad batch count", lambda: quantize_model(tiny_resnet(), QATConfig(), DATA, num_calibration_batches=0),
     "num_calibration_batches must be a positive int or None"),
    ("subclassed model", lambda: quantize_model(Subclassed(), QATConfig()),
     "is a subclassed model (Subclassed), whose graph Keras does not record. Build it as a Functional model"),
    ("unbuilt sequential", lambda: quantize_model(keras.Sequential([keras.layers.Dense(3)]), QATConfig()),
     "is not built: give the Sequential model a keras.Input"),
    ("already quantized", lambda: quantize_model(quantize_model(tiny_sequential(), QATConfig()), QATConfig()),
     "model 'tiny_sequential' is already quantized (it holds image_activation_quantizer, conv, "),
    ("not a model", lambda: quantize_model(keras.layers.Dense(3), QATConfig()),
     "model must be a Keras 3 model, got Dense"),
    ("calibrate an unquantized model", lambda: calibrate(tiny_resnet(), DATA),
     "model has no trainable activation quantizers"),
    ("report of an unquantized model", lambda: quantization_report(tiny_resnet()),
     "model has no trainable quantizers"),
    ("freeze an unquantized model", lambda: freeze_quantizers(tiny_resnet()),
     "model has no trainable quantizers"),
    ("callback without an epoch", lambda: QuantizerFreezeCallback(),
     "QuantizerFreezeCallback needs freeze_quantizers_at or freeze_bn_stats_at"),
    ("callback with a negative epoch", lambda: QuantizerFreezeCallback(freeze_quantizers_at=-1),
     "freeze_quantizers_at must be an epoch index >= 0 or None (never), got -1"),
]


@pytest.mark.parametrize(("case", "build", "message"), BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_refused_clearly(case, build, message):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # no representative data in some cases: not the point here
        with pytest.raises(QuantizationConfigError, match=re.escape(message)):
            build()
