"""ONNX export of a converted model, checked in onnxruntime before it is put in place.

Two formats. "qcdq" (the default): activations are QuantizeLinear -> [Clip] -> DequantizeLinear, weights int8
initializers and biases int32 initializers behind DequantizeLinear (see `trainable_infra.pytorch_backend.qcdq`):
standard ONNX that a plain onnxruntime session turns into integer kernels (QLinearConv, QGemm), for quantizers
of up to 8 bits. "custom_ops": each quantizer is an mct-quantizers custom op (any bit width; running the file
needs onnxruntime-extensions and `mct_quantizers.get_ort_session_options()`, which hands the op its float
attributes rounded to 6 significant digits, so its outputs drift from the converted model's). torch's own
fake-quant export is not used: it accepts only 8-bit ranges.
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import Any

import numpy as np
import torch
from mct_quantizers.pytorch.quantizers import BasePyTorchInferableQuantizer
from torch import nn

from trainable_infra.common.errors import ExportValidationError, QuantizationConfigError
from trainable_infra.common.export import (
    ExportReport,
    atomic_output,
    check_agreement,
    check_output_path,
    check_require_identical,
)
from trainable_infra.pytorch_backend.calibrate import check_model
from trainable_infra.pytorch_backend.qcdq import QCDQ_MIN_OPSET, requantize_after_reshapes, use_qcdq_quantizers

ONNX_FORMATS = ("qcdq", "custom_ops")
# The TorchScript exporter is the one that honours the quantizers' `symbolic` methods (the export-based one
# needs onnxscript and a translation table instead); these are the opsets it writes.
_MIN_OPSET, _MAX_OPSET = 7, 20


def _inferable_quantizers(model: nn.Module) -> list[BasePyTorchInferableQuantizer]:
    found = []
    for module in model.modules():
        quantizers = list(getattr(module, "weights_quantizers", {}).values())
        quantizers.append(getattr(module, "activation_holder_quantizer", None))
        found.extend(q for q in quantizers if isinstance(q, BasePyTorchInferableQuantizer))
    return found


def _check_arguments(model: Any, example_inputs: Any, opset_version: Any, format: str, atol: Any) -> tuple:
    check_model(model)
    if not _inferable_quantizers(model):
        raise QuantizationConfigError(
            "model holds no mct-quantizers inferable quantizer; pass the model returned by convert_to_inferable"
        )
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise QuantizationConfigError(
            f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}"
        )
    if format not in ONNX_FORMATS:
        raise QuantizationConfigError(f"format must be one of {ONNX_FORMATS}, got {format!r}")
    low = QCDQ_MIN_OPSET if format == "qcdq" else _MIN_OPSET
    if isinstance(opset_version, bool) or not isinstance(opset_version, int) or not low <= opset_version <= _MAX_OPSET:
        raise QuantizationConfigError(
            f"opset_version must be an int in {low}..{_MAX_OPSET} for format={format!r}, got {opset_version!r}"
        )
    if atol is not None and (isinstance(atol, bool) or not isinstance(atol, (int, float)) or not atol >= 0):
        raise QuantizationConfigError(f"atol must be None or a number >= 0, got {atol!r}")
    return inputs


def _outputs(value: Any) -> list[np.ndarray]:
    if isinstance(value, torch.Tensor):
        return [value.detach().cpu().numpy()]
    if isinstance(value, (tuple, list)):
        return [array for item in value for array in _outputs(item)]
    raise QuantizationConfigError(f"the model must return a tensor or a tuple / list of tensors, got {value!r}")


def _session_options(format: str) -> Any:
    """The onnxruntime session options the format needs; raises ImportError naming what to install."""
    try:
        import onnx  # noqa: F401 - the checker
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise ImportError("export_onnx checks the file it writes with onnx and onnxruntime: "
                          "pip install onnx onnxruntime") from exc
    if format == "qcdq":
        return None
    try:
        import onnxruntime_extensions  # noqa: F401 - mct-quantizers registers its ops only when it is there
        from mct_quantizers import get_ort_session_options
    except ImportError as exc:
        raise ImportError("the mct-quantizers custom ops run with onnxruntime-extensions: "
                          "pip install onnxruntime-extensions") from exc
    return get_ort_session_options()


def _run_onnxruntime(path: str, format: str, feeds: dict[str, np.ndarray]) -> tuple[list[np.ndarray], str]:
    """Check the file with onnx's checker and run it in onnxruntime on the CPU; also return the runtime's name."""
    import onnx
    import onnxruntime as ort

    options = _session_options(format)
    try:
        onnx.checker.check_model(path)
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        outputs = session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})
    except Exception as exc:
        raise ExportValidationError(f"the exported ONNX file ({format}) failed its check: {exc}") from exc
    return outputs, f"onnxruntime {ort.__version__}"


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_inputs: Any,
    opset_version: int = 15,
    dynamic_batch: bool = True,
    format: str = "qcdq",
    atol: float | None = None,
    require_identical: float | None = None,
) -> ExportReport:
    """Export a model made by `convert_to_inferable` to ONNX and check the file in onnxruntime.

    With format="qcdq" (the default) each activation quantizer is QuantizeLinear -> [Clip] -> DequantizeLinear,
    each weight its integers (int8 / uint8) behind DequantizeLinear and, for a layer fed by an activation
    quantizer, the bias its int32 integers on the grid Δ_in·Δ_w: standard ONNX that a plain
    `onnxruntime.InferenceSession` runs as integer kernels (QLinearConv, QGemm) and computes as the converted
    model does (quantizers of up to 8 bits; symmetric, power-of-two and uniform). With format="custom_ops"
    the quantizers are mct-quantizers custom ops (any bit width); the file runs in onnxruntime with
    `mct_quantizers.get_ort_session_options()` (onnxruntime-extensions), which reads the ops' float
    parameters as text with 6 significant digits: expect outputs near, not identical to, the model's.

    The file is checked with `onnx.checker`, run in onnxruntime on `example_inputs` and compared with `model`
    before it replaces `path`; if anything fails, `path` is left as it was. `model` is not changed.

    Args:
        model: a converted model (its quantizers are mct-quantizers inferable quantizers).
        path: where to write the `.onnx` file.
        example_inputs: a tensor or a tuple of tensors to trace and check the model with.
        opset_version: the ONNX opset (13 or more for "qcdq").
        dynamic_batch: whether the first axis of the inputs and outputs is left free (named "batch").
        format: "custom_ops" or "qcdq".
        atol: if given, the largest absolute difference from the model's outputs that the check accepts.
        require_identical: if given, the smallest fraction of output values onnxruntime must reproduce bit for
            bit (e.g. 1.0 or 0.999).

    Returns:
        An `ExportReport` (path-like: it stands for the path written) with the largest absolute difference
        between onnxruntime's outputs and the model's, the fraction of identical output values and of rows with
        the same argmax. Inputs within float rounding of a quantizer's rounding tie can land one quantization
        step apart, which later layers carry on.

    Raises:
        ExportValidationError: the file failed the checker, did not run, differs by more than `atol` or
            reproduces fewer values than `require_identical`.
    """
    inputs = _check_arguments(model, example_inputs, opset_version, format, atol)
    require_identical = check_require_identical(require_identical)
    target = check_output_path(path)
    _session_options(format)  # a missing runtime fails here, before any work
    # Export works on a copy: the quantizers are switched to their export form, and tracing runs the model.
    work = copy.deepcopy(model).eval()
    with torch.no_grad():
        expected = _outputs(work(*inputs))
    if format == "qcdq":
        requantize_after_reshapes(work)
        use_qcdq_quantizers(work)
    else:
        for quantizer in _inferable_quantizers(work):
            quantizer.enable_custom_impl()
        for module in work.modules():
            # The file holds float layers between the custom quantizer ops, as onnxruntime runs them.
            if getattr(module, "integer_arithmetic", False):
                module.integer_arithmetic = False
    input_names = [f"input_{i}" for i in range(len(inputs))]
    dynamic_axes = {name: {0: "batch"} for name in [*input_names, "output"]} if dynamic_batch else None
    with atomic_output(target) as temporary:
        with warnings.catch_warnings():
            # The quantizers export through autograd functions with `symbolic`, which only the TorchScript
            # exporter supports; its deprecation notice and the tracer's notes on constant parameters are expected.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(
                work, inputs, temporary, opset_version=opset_version, dynamo=False,
                input_names=input_names, output_names=["output"], dynamic_axes=dynamic_axes,
            )
        feeds = {name: t.detach().cpu().numpy() for name, t in zip(input_names, inputs, strict=True)}
        outputs, runtime = _run_onnxruntime(temporary, format, feeds)
        difference, identical, argmax_identical = check_agreement(expected, outputs, atol, require_identical)
    return ExportReport(path=os.fspath(path), format=format, max_abs_diff=difference, runtime=runtime,
                        identical=identical, argmax_identical=argmax_identical)
