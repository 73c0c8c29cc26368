"""TFLite export of a converted Keras model, checked in the TFLite interpreter before it is put in place.

The model goes through Keras 3's own SavedModel export (`model.export`) to `tf.lite.TFLiteConverter`, which
turns each mct-quantizers fake-quant op into a QUANTIZE -> DEQUANTIZE pair around float kernels. The check runs
the LiteRT interpreter (`ai-edge-litert`) when it is installed, else `tf.lite.Interpreter`.

Two limits of the converter, measured with TensorFlow 2.21: below 8 bits it stores the integers as UINT4 /
UINT2 tensors, which neither `tf.lite.Interpreter` (its DEQUANTIZE kernel refuses them) nor ai-edge-litert 2.3
(its QUANTIZE kernel refuses them) runs, so the check fails; and it re-quantizes the output of an average
pooling (MEAN) to the grid of the quantizer before it, which the Keras model does not do.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import tempfile
import warnings
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from trainable_infra.common.errors import ExportValidationError, QuantizationConfigError
from trainable_infra.common.export import (
    ExportReport,
    atomic_output,
    check_agreement,
    check_output_path,
    check_require_identical,
)
from trainable_infra.keras_backend.calibrate import all_layers
from trainable_infra.keras_backend.inferable_wrappers import (
    KerasInferableActivationQuantizationHolder,
    KerasInferableQuantizationWrapper,
)


def _quantizers(model: keras.Model) -> list[Any]:
    found = []
    for layer in all_layers(model):
        if isinstance(layer, KerasInferableQuantizationWrapper):
            found.extend(layer.weights_quantizers.values())
        elif isinstance(layer, KerasInferableActivationQuantizationHolder):
            found.append(layer.activation_quantizer)
    return found


def _check_inputs(model: keras.Model, representative_inputs: Any) -> list[np.ndarray]:
    given = list(representative_inputs) if isinstance(representative_inputs, (list, tuple)) else [representative_inputs]
    if len(given) != len(model.inputs):
        raise QuantizationConfigError(
            f"representative_inputs must hold one array per model input ({len(model.inputs)}), got {len(given)}"
        )
    arrays = []
    for value, spec in zip(given, model.inputs, strict=True):
        try:
            array = value if isinstance(value, np.ndarray) else keras.ops.convert_to_numpy(value)
        except (TypeError, ValueError) as exc:
            raise QuantizationConfigError(
                f"representative_inputs must be arrays or tensors, got {type(value).__name__}"
            ) from exc
        if array.dtype.kind not in "fiu" or array.ndim != len(spec.shape) or array.shape[0] == 0:
            raise QuantizationConfigError(
                f"representative_inputs must be non-empty numeric arrays shaped like the model input {spec.shape} "
                f"(batch first), got {array.dtype} of shape {array.shape}"
            )
        arrays.append(array.astype(np.float32))  # the inferable quantizers run on float32
    return arrays


def _interpreter() -> tuple[type, str]:
    """The TFLite interpreter class to check with, and its name and version."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        return tf.lite.Interpreter, f"tf.lite.Interpreter (TensorFlow {tf.__version__})"
    return Interpreter, f"ai-edge-litert {importlib.metadata.version('ai-edge-litert')}"


def _run_tflite(path: str, model: keras.Model, inputs: list[np.ndarray]) -> tuple[list[np.ndarray], str]:
    interpreter_class, runtime = _interpreter()
    with warnings.catch_warnings():
        # tf.lite.Interpreter announces its move to ai-edge-litert; it is the fallback when that is not installed.
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated", category=UserWarning)
        runner = interpreter_class(model_path=path).get_signature_runner()
    names = list(runner.get_input_details())
    if len(names) == 1:
        feeds = {names[0]: inputs[0]}
    else:
        keras_names = [spec.name for spec in model.inputs]
        if sorted(keras_names) != sorted(names):
            raise ExportValidationError(f"the TFLite inputs {names} do not match the model's {keras_names}")
        feeds = dict(zip(keras_names, inputs, strict=True))
    results = runner(**feeds)
    # The serving signature names its outputs output_0, output_1, ... in the model's order.
    order = sorted(results, key=lambda name: int(re.sub(r"\D", "", name) or 0))
    return [results[name] for name in order], runtime


def _outputs(value: Any) -> list[np.ndarray]:
    return [keras.ops.convert_to_numpy(t) for t in keras.tree.flatten(value)]


def export_tflite(
    model: keras.Model,
    path: str | os.PathLike,
    representative_inputs: Any,
    atol: float | None = None,
    require_identical: float | None = None,
) -> ExportReport:
    """Convert a model made by `convert_to_inferable` to TFLite and check the file in the TFLite interpreter.

    The quantizers become QUANTIZE -> DEQUANTIZE pairs around float kernels. The file is run on
    `representative_inputs` and compared with `model` before it replaces `path`; if anything fails, `path`
    is left as it was. `model` is not changed.

    The converter re-quantizes the output of an average pooling to the grid of the quantizer before it, and
    TFLite rounds ties away from zero where TensorFlow's fake-quant op rounds them up, so the outputs are
    close but not identical: on the demo's W8A8 model (TensorFlow 2.21) they differ by at most two steps of
    the output quantizer, on about 30% of the logits, and the predicted classes agree on 98.7-100% of the
    images. Quantizers below 8 bits are stored as UINT4 / UINT2 tensors that the TFLite interpreters do not
    run (TensorFlow 2.21, ai-edge-litert 2.3): the check fails and nothing is written.

    Args:
        model: a converted Keras model (its quantizers are mct-quantizers Keras inferable quantizers).
        path: where to write the `.tflite` file.
        representative_inputs: an array (or one per model input) to check the file with, batch first.
        atol: if given, the largest absolute difference from the model's outputs that the check accepts.
        require_identical: if given, the smallest fraction of output values the interpreter must reproduce bit
            for bit (e.g. 1.0 or 0.999).

    Returns:
        An `ExportReport` (path-like: it stands for the path written) with the largest absolute difference
        between the interpreter's outputs and the model's, the fraction of identical output values and of rows
        with the same argmax.

    Raises:
        ExportValidationError: the conversion failed, the interpreter could not run the file, the outputs
            differ by more than `atol` or fewer than `require_identical` of them are identical.
    """
    if not isinstance(model, keras.Model):
        raise QuantizationConfigError(f"model must be a Keras 3 model, got {type(model).__name__}")
    quantizers = _quantizers(model)
    if not quantizers:
        raise QuantizationConfigError(
            "model holds no mct-quantizers inferable quantizer; pass the model returned by convert_to_inferable"
        )
    inputs = _check_inputs(model, representative_inputs)
    if atol is not None and (isinstance(atol, bool) or not isinstance(atol, (int, float)) or not atol >= 0):
        raise QuantizationConfigError(f"atol must be None or a number >= 0, got {atol!r}")
    require_identical = check_require_identical(require_identical)
    target = check_output_path(path)
    expected = _outputs(model(inputs if len(inputs) > 1 else inputs[0], training=False))
    with tempfile.TemporaryDirectory() as saved_model:
        try:
            model.export(saved_model, format="tf_saved_model", verbose=False)
            content = tf.lite.TFLiteConverter.from_saved_model(saved_model).convert()
        except Exception as exc:
            raise ExportValidationError(f"TFLiteConverter could not convert the model: {exc}") from exc
    with atomic_output(target) as temporary:
        with open(temporary, "wb") as file:
            file.write(content)
        try:
            outputs, runtime = _run_tflite(temporary, model, inputs)
        except ExportValidationError:
            raise
        except Exception as exc:
            low_bits = ", ".join(str(b) for b in sorted({q.num_bits for q in quantizers if q.num_bits < 8}))
            hint = (
                f" (the model has {low_bits}-bit quantizers: TFLite's converter stores them as UINT4 / UINT2 "
                "tensors, which the TFLite QUANTIZE / DEQUANTIZE kernels do not run; export 8-bit models to TFLite)"
                if low_bits and "QUANTIZE" in str(exc) else ""
            )
            raise ExportValidationError(f"the TFLite interpreter could not run the exported file: {exc}{hint}") from exc
        difference, identical, argmax_identical = check_agreement(expected, outputs, atol, require_identical)
    return ExportReport(path=os.fspath(path), format="tflite", max_abs_diff=difference, runtime=runtime,
                        identical=identical, argmax_identical=argmax_identical)

