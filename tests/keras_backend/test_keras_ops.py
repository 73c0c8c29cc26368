"""Functional models that call `keras.ops` on symbolic tensors (`x + 3.0`, `inputs + x`, `x * y`, `keras.ops.mean`):
Keras records these as stateless operations, not layers. quantize_model copies them, a sum or concatenation of two
tensors is a merge point with a holder after it (as an `Add` layer), and the trained model converts, saves, reloads
and exports.

Oracles: the trained model's eval output (conversion and reload are bit-identical to it) and the TFLite operator list
(`tflite_kernels`: `a + b` and `keras.ops.concatenate` run on int8, as `Add` and `Concatenate` layers do).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import layers

from trainable_infra import QATConfig
from trainable_infra.keras_backend import (
    KerasActivationQuantizationHolder,
    convert_to_inferable,
    export_tflite,
    quantize_model,
)
from trainable_infra.keras_backend.export import tflite_kernels

X = np.random.default_rng(0).normal(size=(16, 8, 8, 3)).astype(np.float32)


def ops_model(seed: int = 0) -> keras.Model:
    """Every kind of keras.ops call: a constant added (`x + 3.0`) and multiplied, a product of two tensors, a
    residual sum of two tensors (`inputs + x`), keras.ops.concatenate, keras.ops.mean and keras.ops.reshape."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3), name="x")
    x = layers.Conv2D(3, 3, padding="same", name="conv")(inputs)
    gate = layers.ReLU(6.0, name="relu6")(x + 3.0) * (1.0 / 6.0)
    x = x * gate
    x = inputs + x
    y = layers.Conv2D(4, 1, activation="relu", name="branch")(x)
    x = keras.ops.concatenate([x, y], axis=-1)
    x = keras.ops.mean(x, axis=(1, 2))
    x = keras.ops.reshape(x, (-1, 7))
    return keras.Model(inputs, layers.Dense(10, name="head")(x), name="ops_model")


def holders(model: keras.Model) -> dict[str, KerasActivationQuantizationHolder]:
    return {layer.name: layer for layer in model.layers if isinstance(layer, KerasActivationQuantizationHolder)}


def operation_names(model: keras.Model) -> list[str]:
    return [op.name for op in model.operations if not isinstance(op, keras.layers.Layer)]


@pytest.fixture(scope="module")
def float_and_qat():
    float_model = ops_model()
    qat = quantize_model(float_model, QATConfig(), X, progress=False)
    qat.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                run_eagerly=True)
    qat.fit(X, np.arange(16) % 10, batch_size=8, verbose=0)
    return float_model, qat


def test_quantize_copies_operations_and_leaves_the_float_model_unchanged(float_and_qat):
    float_model, qat = float_and_qat
    assert operation_names(qat) == operation_names(float_model)
    float_ops = {op.name: op for op in float_model.operations}
    for op in qat.operations:
        if not isinstance(op, keras.layers.Layer):
            assert op is not float_ops[op.name]
    # The float model's operations got no node of the QAT model.
    assert all(len(op._inbound_nodes) == 1 for op in float_model.operations if op.name in operation_names(qat))


def test_conversion_of_a_model_with_operations_is_bit_identical(float_and_qat):
    _, qat = float_and_qat
    converted = convert_to_inferable(qat)
    assert operation_names(converted) == operation_names(qat)
    np.testing.assert_array_equal(converted(X, training=False), qat(X, training=False))


@pytest.mark.parametrize("which", ["qat", "converted"])
def test_models_with_operations_reload_identical(float_and_qat, tmp_path, which):
    _, qat = float_and_qat
    model = qat if which == "qat" else convert_to_inferable(qat)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras", safe_mode=True)
    np.testing.assert_array_equal(loaded(X, training=False), qat(X, training=False))


def test_operation_merges_export_as_int8_add_and_concatenation(tmp_path):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3), name="x")
    a = layers.Conv2D(4, 3, padding="same", activation="relu", name="a")(inputs)
    b = layers.Conv2D(4, 3, padding="same", activation="relu", name="b")(inputs)
    x = keras.ops.concatenate([a + b, a], axis=-1)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    model = keras.Model(inputs, layers.Dense(10, name="head")(x))
    converted = convert_to_inferable(quantize_model(model, QATConfig(), X, progress=False))
    kernels = tflite_kernels(export_tflite(converted, tmp_path / "m.tflite", X))
    body = kernels[kernels.index(("QUANTIZE", "float32")) + 1:]
    assert all(dtype == "int8" for _, dtype in body), kernels  # int8 from the QUANTIZE to the DEQUANTIZE
    assert ("ADD", "int8") in body
    assert ("CONCATENATION", "int8") in body


def _merge_of(form: str, a, b):
    if form == "a + b":
        return a + b
    if form == "keras.ops.add":
        return keras.ops.add(a, b)
    if form == "layers.Add":
        return layers.Add(name="merge")([a, b])
    return keras.ops.concatenate([a, b], axis=-1)


def merge_model(form: str, second: str) -> keras.Model:
    """Two convolutions merged by `form`; the first has a ReLU (an unsigned holder), the second has `second` as
    its activation (relu: unsigned, None: signed)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3), name="x")
    a = layers.Conv2D(4, 3, padding="same", activation="relu", name="a")(inputs)
    b = layers.Conv2D(4, 3, padding="same", activation=second, name="b")(inputs)
    merged = _merge_of(form, a, b)
    outputs = layers.Conv2D(2, 1, name="out")(merged)
    return keras.Model(inputs, outputs, name="merge_model")


FORMS = ["a + b", "keras.ops.add", "layers.Add", "keras.ops.concatenate"]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(("second", "signed"), [("relu", False), (None, True)], ids=["unsigned", "signed"])
def test_a_merge_of_two_tensors_gets_a_holder_unsigned_when_both_inputs_are(form, second, signed):
    float_model = merge_model(form, second)
    merge = float_model.get_layer("out")._inbound_nodes[0].input_tensors[0]._keras_history.operation
    with pytest.warns(UserWarning, match="no representative_data"):
        qat = quantize_model(float_model, QATConfig())
    found = holders(qat)
    holder = found[f"{merge.name}_activation_quantizer"]
    assert holder.activation_holder_quantizer.params.signed is signed
    # The holder sits right after the merge: the last convolution reads its output.
    assert qat.get_layer("out")._inbound_nodes[0].input_tensors[0]._keras_history.operation is holder


def test_an_activation_after_a_merge_decides_its_sign():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3), name="x")
    a = layers.Conv2D(4, 3, padding="same", activation="relu", name="a")(inputs)
    b = layers.Conv2D(4, 3, padding="same", activation="relu", name="b")(inputs)
    merged = layers.Activation("log_softmax", name="log_softmax")(a + b)  # negative, although a and b are not
    model = keras.Model(inputs, layers.Conv2D(2, 1, name="out")(merged))
    with pytest.warns(UserWarning, match="no representative_data"):
        qat = quantize_model(model, QATConfig())
    holder = next(h for name, h in holders(qat).items() if name.startswith("add"))
    assert qat.get_layer("out")._inbound_nodes[0].input_tensors[0]._keras_history.operation is holder
    assert holder.activation_holder_quantizer.params.signed


def test_adding_a_constant_is_no_merge():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3), name="x")
    x = layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    y = x + 3.0
    model = keras.Model(inputs, layers.Conv2D(2, 1, name="out")(y * x))
    with pytest.warns(UserWarning, match="no representative_data"):
        qat = quantize_model(model, QATConfig())
    assert sorted(holders(qat)) == ["conv_activation_quantizer", "out_activation_quantizer",
                                    "out_input_activation_quantizer", "x_activation_quantizer"]
