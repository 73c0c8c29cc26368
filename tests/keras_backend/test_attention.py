"""Transformers in Keras: MultiHeadAttention, EinsumDense and products of two activations are quantized, train,
convert bit-exactly, reload identically and export; `quantization_coverage` counts their multiply-accumulates.

Oracles: hand-counted multiply-accumulates, the float model's own maths (numpy / keras.ops on the quantized
weights) for calibration, the QAT model's eval output for the converted and reloaded models.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import layers

from tests.keras_backend.helpers import compiled
from tests.keras_backend.zoo_attention import tiny_swin, tiny_vit
from trainable_infra import QATConfig, QuantizationConfigError
from trainable_infra.common.digits import load_digits_split
from trainable_infra.common.einsum import einsum_macs, einsum_output_shape, kernel_channel_axis
from trainable_infra.common.report import MacRow
from trainable_infra.keras_backend import (
    KerasActivationQuantizationHolder,
    KerasInferableMultiHeadAttention,
    KerasQuantizedMultiHeadAttention,
    KerasTrainableQuantizationWrapper,
    convert_to_inferable,
    export_tflite,
    quantization_coverage,
    quantization_report,
    quantize_model,
)
from trainable_infra.keras_backend.quantize import einsum_kernel_axis

_x, _y, _, _ = load_digits_split(seed=0)
X, Y = _x[:64, ..., None], _y[:64].astype("int32")
ZOO = {"vit": tiny_vit, "swin": tiny_swin}


def _eval(model: keras.Model, x: np.ndarray = X) -> np.ndarray:
    return keras.ops.convert_to_numpy(model(x, training=False))


def _layer(model: keras.Model, name: str) -> keras.layers.Layer:
    return model.get_layer(name)


# --- the zoo: quantize -> fit -> eval -> convert -> reload -> export -> coverage --------------------------------


@pytest.fixture(scope="module", params=sorted(ZOO))
def trained(request):
    """(name, float model, QAT model calibrated on 32 digits and trained two steps)."""
    model = ZOO[request.param]()
    qat = compiled(quantize_model(model, QATConfig(), X[:32], progress=False), run_eagerly=True)
    qat.fit(X[:32], Y[:32], batch_size=16, epochs=1, shuffle=False, verbose=0)
    return request.param, model, qat


def test_zoo_trains_and_evaluates_deterministically(trained):
    _, model, qat = trained
    first = _eval(qat)
    np.testing.assert_array_equal(first, _eval(qat))
    assert np.all(np.isfinite(first))
    changed = [w for w, f in zip(qat.get_layer("mlp_fc1").layer.get_weights(), model.get_layer("mlp_fc1").get_weights(),
                                 strict=True) if not np.array_equal(w, f)]
    assert changed, "two training steps left the weights as they were"


def test_zoo_converts_bit_exactly_and_reloads_identically(trained, tmp_path):
    name, _, qat = trained
    expected = _eval(qat)
    converted = convert_to_inferable(qat)
    np.testing.assert_array_equal(_eval(converted), expected)
    qat.save(tmp_path / f"{name}.keras")
    converted.save(tmp_path / f"{name}_converted.keras")
    for file in (f"{name}.keras", f"{name}_converted.keras"):
        reloaded = keras.models.load_model(tmp_path / file, safe_mode=True)
        np.testing.assert_array_equal(_eval(reloaded), expected)


def test_zoo_exports_to_tflite(trained, tmp_path):
    name, _, qat = trained
    report = export_tflite(convert_to_inferable(qat), tmp_path / f"{name}.tflite", X[:16])
    assert report.max_abs_diff < 0.5  # float LayerNormalization / softmax / GELU in the file: not bit-exact
    assert report.argmax_identical >= 0.75


def test_zoo_every_linear_map_is_quantized_and_coverage_is_complete(trained):
    name, model, qat = trained
    dense = [layer.name for layer in model.layers if isinstance(layer, (layers.Dense, layers.EinsumDense))]
    for layer_name in dense:
        assert isinstance(qat.get_layer(layer_name), KerasTrainableQuantizationWrapper), layer_name
    for layer in qat.layers:
        if isinstance(layer, layers.MultiHeadAttention):
            assert isinstance(layer, KerasQuantizedMultiHeadAttention)
            assert set(layer.weights_quantizers) == {"query", "key", "value", "attention_output"}
    coverage = quantization_coverage(qat, X[:8])
    assert coverage.quantized_share >= 0.99
    assert all(row.quantized for row in coverage.rows), coverage.format()
    normalizations = {"norm1", "norm2", "norm"}
    expected_float = normalizations | ({"relative_position_bias"} if name == "swin" else set())
    assert set(coverage.float_layers) == expected_float


# --- MultiHeadAttention -----------------------------------------------------------------------------------------


def attention_model(seed: int = 0, **attention) -> keras.Model:
    """(8, 8) -> tokens of 8 features -> MultiHeadAttention(2 heads of 4) -> pooled dense head."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8), name="x")
    x = layers.Dense(8, name="embed")(inputs)
    y = layers.MultiHeadAttention(num_heads=2, key_dim=4, name="attn", **attention)(x, x)
    y = layers.GlobalAveragePooling1D(name="pool")(y)
    return keras.Model(inputs, layers.Dense(3, name="head")(y), name="attention_model")


A = X[:16, ..., 0] / 16.0


def test_attention_gets_projection_quantizers_and_product_holders():
    qat = quantize_model(attention_model(), QATConfig(), A, progress=False)
    attention = qat.get_layer("attn")
    assert isinstance(attention, KerasQuantizedMultiHeadAttention)
    holders = attention.activation_holders()
    assert list(holders) == ["query", "key", "probabilities", "value", "context"]
    signed = {point: h.activation_holder_quantizer.quantization_config.activation_quantization_params["is_signed"]
              for point, h in holders.items()}
    assert signed == {"query": True, "key": True, "probabilities": False, "value": True, "context": True}
    for name in ("query", "key", "value", "attention_output"):
        wrapper = attention.projection(name)
        assert isinstance(wrapper, KerasTrainableQuantizationWrapper)
        assert wrapper.name == f"attn_{name}"
        config = wrapper.weights_quantizers["kernel"].quantization_config
        kernel = wrapper.layer.kernel
        assert config.weights_channels_axis == kernel.ndim - 1  # (features, heads, d) or (heads, d, features)
        threshold = np.asarray(config.weights_quantization_params["threshold"]).reshape(-1)
        axes = tuple(range(kernel.ndim - 1))
        np.testing.assert_allclose(threshold, np.abs(kernel.numpy()).max(axis=axes), rtol=1e-6)
    # The float model's projection weights start the quantized one.
    np.testing.assert_array_equal(attention.projection("query").layer.kernel.numpy(),
                                  attention_model().get_layer("attn").query_dense.kernel.numpy())


@pytest.mark.parametrize(("config", "points"), [
    (QATConfig(quantize_matmul_inputs=False), ["context"]),
    (QATConfig(quantize_matmul_inputs=False, integer_bias=False), []),
    (QATConfig(integer_bias=False), ["query", "key", "probabilities", "value"]),
])
def test_attention_points_follow_the_config(config, points):
    qat = quantize_model(attention_model(), config, A, progress=False)
    assert list(qat.get_layer("attn").activation_holders()) == points


@pytest.mark.parametrize("config", [
    QATConfig(layer_types=["Dense"]), QATConfig(overrides={"attn": {"skip": True}}),
], ids=["layer_types", "skip"])
def test_attention_left_float_by_the_config_is_reported_float(config):
    qat = quantize_model(attention_model(), config, A, progress=False)
    assert type(qat.get_layer("attn")) is layers.MultiHeadAttention
    coverage = quantization_coverage(qat, A)
    assert "attn" in coverage.float_layers
    assert not any(row.quantized for row in coverage.rows if row.layer.startswith("attn."))


def test_attention_holders_are_calibrated_from_data():
    # The holders observe the values with quantization off; the oracle recomputes them with the quantized kernels.
    # Without integer_bias the embedding's bias is its float one (and no holder sits on the context).
    qat = quantize_model(attention_model(), QATConfig(integer_bias=False), A, progress=False)
    attention = qat.get_layer("attn")
    embed = qat.get_layer("embed")
    kernel = embed.weights_quantizers["kernel"](keras.ops.convert_to_tensor(embed.layer.kernel), False)
    x = keras.ops.convert_to_numpy(keras.ops.matmul(A, kernel) + embed.layer.bias)

    def project(name: str) -> np.ndarray:
        wrapper = attention.projection(name)
        w = wrapper.weights_quantizers["kernel"](keras.ops.convert_to_tensor(wrapper.layer.kernel), False)
        return keras.ops.convert_to_numpy(keras.ops.einsum(wrapper.layer.equation, x, w) + wrapper.layer.bias)

    query = project("query") / np.sqrt(4.0)
    scores = keras.ops.einsum(attention._dot_product_equation, project("key"), query)
    probabilities = keras.ops.convert_to_numpy(keras.ops.softmax(scores, axis=-1))
    holders = attention.activation_holders()
    threshold = {p: float(holders[p].activation_holder_quantizer.threshold.numpy()) for p in holders}
    assert threshold["query"] == pytest.approx(np.abs(query).max(), rel=1e-5)
    assert threshold["probabilities"] == pytest.approx(probabilities.max(), rel=1e-5)


@pytest.mark.parametrize("variant", ["causal_mask", "cross_attention", "gate", "dropout"])
def test_attention_variants_convert_bit_exactly(variant):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8), name="x")
    x = layers.Dense(8, name="embed")(inputs)
    if variant == "causal_mask":
        y = layers.MultiHeadAttention(2, 4, name="attn")(x, x, use_causal_mask=True)
    elif variant == "cross_attention":
        memory = layers.Dense(6, name="memory")(inputs)
        y = layers.MultiHeadAttention(2, 4, value_dim=3, name="attn")(x, memory, key=layers.Dense(5, name="k")(inputs))
    elif variant == "gate":
        y = layers.MultiHeadAttention(2, 4, use_gate=True, name="attn")(x, x)
    else:
        y = layers.MultiHeadAttention(2, 4, dropout=0.5, name="attn")(x, x)
    model = keras.Model(inputs, layers.Dense(3, name="head")(layers.GlobalAveragePooling1D(name="pool")(y)))
    qat = quantize_model(model, QATConfig(), A, progress=False)
    attention = qat.get_layer("attn")
    if variant == "gate":
        assert "gate" in attention.weights_quantizers
        assert "context" not in attention.activation_holders()
    if variant == "dropout":
        # Dropout acts in training only; the probabilities' holder sits before it.
        assert not np.array_equal(keras.ops.convert_to_numpy(qat(A, training=True)), _eval(qat, A))
    expected = _eval(qat, A)
    np.testing.assert_array_equal(_eval(qat, A), expected)
    converted = convert_to_inferable(qat)
    assert isinstance(converted.get_layer("attn"), KerasInferableMultiHeadAttention)
    np.testing.assert_array_equal(_eval(converted, A), expected)


def test_attention_subclass_stays_float_with_a_warning():
    class MyAttention(layers.MultiHeadAttention):
        pass

    inputs = keras.Input((8, 8), name="x")
    y = MyAttention(2, 4, name="mine")(inputs, inputs)
    model = keras.Model(inputs, layers.Dense(3, name="head")(layers.Flatten(name="flat")(y)))
    with pytest.warns(UserWarning, match="'mine' is a MyAttention, a subclass of MultiHeadAttention"):
        qat = quantize_model(model, QATConfig(), A, progress=False)
    assert type(qat.get_layer("mine")) is MyAttention


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"weights_quantizers": {"querry": None}}, r"weights_quantizers has unknown keys \['querry'\]"),
    ({"activation_quantizers": {"scores": None}}, r"activation_quantizers has unknown keys \['scores'\]"),
    ({"activation_quantizers": {"query": "threshold"}}, "activation_quantizer must be a Keras activation"),
    ({"weights_quantizers": {"gate": None}}, "has no gate projection"),
    ({"use_gate": True, "activation_quantizers": {"context": None}}, "multiplies the context by its gate"),
])
def test_bad_attention_arguments_are_refused(kwargs, message):
    with pytest.raises(QuantizationConfigError, match=message):
        KerasQuantizedMultiHeadAttention(num_heads=2, key_dim=4, **kwargs)


# --- EinsumDense --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("equation", "axis"), [
    ("ab,bc->ac", 1),  # Dense
    ("ab,cb->ac", 0),  # a (out, in) kernel, as torch stores Linear weights
    ("abc,cde->abde", 2),  # an attention projection: (features, heads, d), the last output axis
    ("abcd,cde->abe", 2),  # the attention output: (heads, d, features)
    ("...b,bc->...c", 1),
    ("ab,b->a", None),  # no kernel axis reaches the output
])
def test_einsum_kernel_channel_axis_is_the_last_kernel_axis_in_the_output(equation, axis):
    assert kernel_channel_axis(equation) == axis


def test_einsum_dense_is_quantized_along_its_output_axis_and_converts(tmp_path):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8), name="x")
    y = layers.EinsumDense("abc,dc->abd", output_shape=(8, 5), bias_axes="d", name="rows")(inputs)
    y = layers.EinsumDense("abd,de->abe", output_shape=(8, 4), bias_axes="e", activation="relu", name="proj")(y)
    model = keras.Model(inputs, layers.Flatten(name="flat")(y))
    qat = quantize_model(model, QATConfig(), A, progress=False)
    for name, axis in (("rows", 0), ("proj", 1)):
        wrapper = qat.get_layer(name)
        config = wrapper.weights_quantizers["kernel"].quantization_config
        assert config.weights_channels_axis == axis
        assert einsum_kernel_axis(model.get_layer(name)) == axis - 2
        kernel = model.get_layer(name).kernel.numpy()
        np.testing.assert_allclose(np.asarray(config.weights_quantization_params["threshold"]).reshape(-1),
                                   np.abs(kernel).max(axis=1 - axis), rtol=1e-6)
    # The bias of "rows" lies along "d", the kernel's channel axis 0, the output's last: rounded on Δ_in·Δ_w.
    assert qat.get_layer("rows").input_holder == "x_activation_quantizer"
    expected = _eval(qat, A)
    converted = convert_to_inferable(qat)
    np.testing.assert_array_equal(_eval(converted, A), expected)
    # "rows" is quantized along a kernel axis TFLite cannot carry: it stays a float layer in the file.
    report = export_tflite(converted, tmp_path / "einsum.tflite", A)
    assert report.max_abs_diff < 0.5


# --- products of two activations in Functional graphs --------------------------------------------------------------


def products_model() -> keras.Model:
    """Dot, matmul (`@`) and einsum between activations: 2 x 8 tokens of 4 features each."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8), name="x")
    a = layers.Dense(4, name="a")(inputs)
    b = layers.Dense(4, activation="tanh", name="b")(inputs)
    dot = layers.Dot(axes=2, name="dot")([a, b])  # (8, 8)
    mm = keras.ops.matmul(dot, b)  # (8, 4)
    both = keras.ops.einsum("btf,btg->bfg", mm, a)  # (4, 4)
    return keras.Model(inputs, layers.Flatten(name="flat")(both), name="products")


def _op_names(model: keras.Model) -> tuple[str, str]:
    """The names Keras gave the matmul and the einsum operations (unique in the session: "matmul_3", ...)."""
    by_kind = {type(op).__name__: op.name for op in model.operations}
    return by_kind["Matmul"], by_kind["Einsum"]


def test_product_inputs_get_holders_and_can_be_skipped():
    model = products_model()
    matmul, einsum = _op_names(model)
    qat = quantize_model(model, QATConfig(integer_bias=False), A, progress=False)
    coverage = quantization_coverage(qat, A)
    products = {row.layer: row for row in coverage.rows if row.weights_quantized is None}
    assert set(products) == {"dot", matmul, einsum}
    assert all(row.inputs_quantized for row in products.values())
    holders = [layer.name for layer in qat.layers if isinstance(layer, KerasActivationQuantizationHolder)]
    # a and b are quantized after their layers; the Dot's output gets a holder as the matmul's input, and so on.
    assert "dot_input_activation_quantizer" not in holders
    assert {f"{matmul}_input_activation_quantizer", f"{einsum}_input_activation_quantizer"} <= set(holders)
    np.testing.assert_array_equal(_eval(convert_to_inferable(qat), A), _eval(qat, A))

    config = QATConfig(integer_bias=False, overrides={matmul: {"skip": True}})
    rows = {row.layer: row for row in quantization_coverage(quantize_model(model, config, A, progress=False), A).rows}
    assert not rows[matmul].inputs_quantized
    assert rows["dot"].inputs_quantized


def test_products_stay_float_without_quantize_matmul_inputs():
    qat = quantize_model(products_model(), QATConfig(quantize_matmul_inputs=False, integer_bias=False), A,
                         progress=False)
    matmul, einsum = _op_names(qat)
    rows = {row.layer: row for row in quantization_coverage(qat, A).rows}
    assert not rows[matmul].inputs_quantized
    assert not rows[einsum].inputs_quantized


# --- coverage counted by hand ------------------------------------------------------------------------------------


def test_coverage_counts_multiply_accumulates_of_every_layer_kind():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 2), name="x")
    x = layers.Conv2D(4, 3, name="conv")(inputs)  # (4, 4, 4)
    x = layers.BatchNormalization(name="bn")(x)
    x = layers.ReLU(name="relu")(x)
    x = layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="dw")(x)  # (4, 4, 8)
    x = layers.SeparableConv2D(3, 2, name="sep")(x)  # (3, 3, 3)
    x = layers.Conv2DTranspose(2, 2, strides=2, name="up")(x)  # (6, 6, 2)
    x = layers.MaxPooling2D(name="maxpool")(x)  # (3, 3, 2)
    x = layers.Flatten(name="flat")(x)
    x = layers.Dense(5, name="fc")(x)
    model = keras.Model(inputs, layers.Dense(3, name="head")(x))
    batch = np.random.default_rng(0).normal(size=(4, 6, 6, 2)).astype("float32")
    expected = {
        "conv": 4 * (4 * 4 * 4) * (3 * 3 * 2),
        "dw": 4 * (4 * 4 * 8) * (3 * 3),
        "sep (depthwise)": 4 * (3 * 3) * (2 * 2 * 4 * 2),
        "sep (pointwise)": 4 * (3 * 3 * 3) * 8,
        "up": 4 * (3 * 3 * 3) * (2 * 2 * 2),
        "fc": 4 * 18 * 5,
        "head": 4 * 5 * 3,
    }

    def macs(coverage):
        return {row.layer + (" " + row.op.split(" ")[1] if " " in row.op else ""): row.macs for row in coverage.rows}

    float_coverage = quantization_coverage(model, batch)
    assert macs(float_coverage) == expected
    assert float_coverage.quantized_macs == 0
    qat = quantize_model(model, QATConfig(fold_batch_norm=False), batch, progress=False)
    coverage = quantization_coverage(qat, batch)
    split = {("sep_" + key[5:-1] if key.startswith("sep ") else key): value for key, value in expected.items()}
    assert macs(coverage) == split
    assert coverage.float_layers == ("bn",)
    assert coverage.quantized_share == 1.0
    # Kept whole, the pointwise half of a separable convolution reads the depthwise half's float output.
    whole = quantize_model(model, QATConfig(fold_batch_norm=False, overrides={"sep": {"skip": True}}), batch,
                           progress=False)
    coverage = quantization_coverage(whole, batch)
    assert macs(coverage) == expected
    rows = {(row.layer, row.op): row for row in coverage.rows}
    assert rows[("sep", "SeparableConv2D (pointwise)")] == MacRow(
        "sep", "SeparableConv2D (pointwise)", expected["sep (pointwise)"], False, False)


def test_coverage_counts_attention_by_hand():
    model = attention_model()  # 8 tokens of 8 features, 2 heads of 4, batch 16
    batch, tokens, features, heads, d = 16, 8, 8, 2, 4
    projection = batch * tokens * features * heads * d
    expected = {
        "embed": batch * tokens * 8 * features,
        "attn.query": projection, "attn.key": projection, "attn.value": projection,
        "attn.scores": batch * heads * tokens * tokens * d,
        "attn.context": batch * heads * tokens * tokens * d,
        "attn.attention_output": projection,
        "head": batch * features * 3,
    }
    qat = quantize_model(model, QATConfig(), A, progress=False)
    for candidate in (model, qat, convert_to_inferable(qat)):
        coverage = quantization_coverage(candidate, A)
        assert {row.layer: row.macs for row in coverage.rows} == expected
    assert quantization_coverage(qat, A).quantized_share == 1.0
    assert quantization_coverage(model, A).float_layers == ("embed", "attn", "head")


@pytest.mark.parametrize(("equation", "shapes", "macs"), [
    ("aecd,abcd->acbe", [(2, 5, 3, 4), (2, 6, 3, 4)], 2 * 5 * 3 * 4 * 6),  # attention scores: a e c d b
    ("...b,bc->...c", [(2, 3, 4), (4, 6)], 2 * 3 * 4 * 6),
    ("ab,cb->ac", [(3, 4), (5, 4)], 3 * 4 * 5),
    ("ab,ab->a", [(3, 1), (3, 7)], 3 * 7),  # a size-1 axis broadcasts
])
def test_einsum_shapes_match_numpy_and_macs_are_counted_per_axis(equation, shapes, macs):
    operands = [np.ones(s) for s in shapes]
    assert einsum_output_shape(equation, *shapes) == np.einsum(equation, *operands).shape
    assert einsum_macs(equation, *shapes) == macs


def test_report_prints_the_coverage_after_its_table(capsys):
    qat = quantize_model(attention_model(), QATConfig(), A, progress=False)
    rows = quantization_report(qat, A)
    printed = capsys.readouterr().out
    assert "attn_query.kernel" in {row["layer"] for row in rows}
    assert "attn_probabilities_activation_quantizer" in {row["layer"] for row in rows}
    assert printed.index("SQNR dB") < printed.index("quantized MACs: 100.00%")


@pytest.mark.parametrize(("build", "message"), [
    (lambda: quantization_coverage("model", A), "model must be a Keras 3 model"),
    (lambda: quantization_coverage(attention_model(), []), "data is empty"),
    (lambda: quantization_coverage(attention_model(), [[A, A]]), "holds 2 input array"),
    (lambda: kernel_channel_axis("ab,bc"), "explicit einsum equation"),
    (lambda: einsum_output_shape("ab,bc->ac", (2, 3)), r"has 2 operand\(s\), expected 1"),
    (lambda: einsum_output_shape("ab,bc->ac", (2, 3), (4, 5, 6)), "does not fit a tensor of shape"),
])
def test_bad_coverage_input_is_refused(build, message):
    with pytest.raises(QuantizationConfigError, match=message):
        build()
