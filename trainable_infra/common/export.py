"""What the backends' exporters share: the report they return, atomic writing and the output comparison."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import shutil
from collections.abc import Iterator, Sequence

import numpy as np

from trainable_infra.common.errors import ExportValidationError, QuantizationConfigError


@dataclasses.dataclass(frozen=True)
class ExportReport:
    """The file an exporter wrote and how closely its runtime reproduced the model on the example inputs.

    The report is path-like (`os.fspath(report)` and `str(report)` are the path), so it can be handed to
    `onnx.load`, `onnxruntime.InferenceSession` or `open` directly.

    Attributes:
        path: the file written.
        format: the format written, e.g. "custom_ops", "qcdq" or "tflite".
        max_abs_diff: the largest absolute difference between the runtime's outputs and the model's.
        runtime: the runtime that ran the check, with its version.
        identical: the fraction of output values the runtime reproduced bit for bit (1.0: all of them).
        argmax_identical: the fraction of rows (the last axis of each output of rank >= 2 with more than one
            value per row, e.g. the logits of a classifier) whose argmax agrees; None when no output has rows.
    """

    path: str
    format: str
    max_abs_diff: float
    runtime: str
    identical: float = 1.0
    argmax_identical: float | None = None

    def __fspath__(self) -> str:
        return self.path

    def __str__(self) -> str:
        return self.path


def check_output_path(path: str | os.PathLike) -> str:
    """Return `path` as an absolute file name whose directory exists, or raise."""
    if not isinstance(path, (str, os.PathLike)):
        raise QuantizationConfigError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    target = os.path.abspath(os.fspath(path))
    if os.path.isdir(target):
        raise QuantizationConfigError(f"path {os.fspath(path)!r} is a directory; give the name of the file to write")
    directory = os.path.dirname(target)
    if not os.path.isdir(directory):
        raise QuantizationConfigError(f"path {os.fspath(path)!r} is in {directory!r}, which is not a directory")
    return target


def _create_temporary_beside(target: str) -> str:
    directory, name = os.path.split(target)
    while True:
        candidate = os.path.join(directory, f".{name}.{secrets.token_hex(6)}.tmp")
        try:
            # Created exclusively with the usual 0o666 & ~umask permissions (tempfile would make it 0o600).
            os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return candidate


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary file name in `path`'s directory; move it to `path` when the block succeeds.

    If the block raises, the temporary file is removed and whatever was at `path` is left as it was. A file
    that is replaced keeps its permissions.
    """
    target = check_output_path(path)
    temporary = _create_temporary_beside(target)
    try:
        yield temporary
        if os.path.isfile(target):
            shutil.copymode(target, temporary)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


def max_abs_difference(expected: Sequence[np.ndarray], actual: Sequence[np.ndarray]) -> float:
    """The largest |expected - actual| over all outputs; values that are equal (NaN included) differ by 0.

    Raises `ExportValidationError` if the outputs differ in number or shape.
    """
    if len(expected) != len(actual):
        raise ExportValidationError(f"the model has {len(expected)} outputs, the exported file {len(actual)}")
    largest = 0.0
    for index, (want, got) in enumerate(zip(expected, actual, strict=True)):
        want, got = np.asarray(want, dtype=np.float64), np.asarray(got, dtype=np.float64)
        if want.shape != got.shape:
            raise ExportValidationError(
                f"output {index} has shape {want.shape} in the model and {got.shape} in the exported file"
            )
        same = (want == got) | (np.isnan(want) & np.isnan(got))
        with np.errstate(invalid="ignore"):
            difference = np.where(same, 0.0, np.abs(want - got))
        difference = np.where(np.isnan(difference), np.inf, difference)  # NaN on one side only, or inf - inf
        largest = max(largest, float(difference.max(initial=0.0)))
    return largest


def output_agreement(expected: Sequence[np.ndarray], actual: Sequence[np.ndarray]) -> tuple[float, float | None]:
    """(fraction of identical values, fraction of rows with the same argmax or None) over all outputs.

    Values that are equal, NaN included, are identical. Call after `max_abs_difference`, which checks the shapes.
    """
    same = total = 0
    rows_same = rows = 0
    for want, got in zip(expected, actual, strict=True):
        want, got = np.asarray(want, dtype=np.float64), np.asarray(got, dtype=np.float64)
        same += int(((want == got) | (np.isnan(want) & np.isnan(got))).sum())
        total += want.size
        if want.ndim >= 2 and want.shape[-1] > 1 and want.size:
            rows_same += int((want.argmax(-1) == got.argmax(-1)).sum())
            rows += want.size // want.shape[-1]
    return (same / total if total else 1.0), (rows_same / rows if rows else None)


def check_agreement(
    expected: Sequence[np.ndarray], actual: Sequence[np.ndarray], atol: float | None, require_identical: float | None
) -> tuple[float, float, float | None]:
    """(max_abs_diff, identical, argmax_identical) of the runtime's outputs; raises `ExportValidationError` when
    they differ by more than `atol` or fewer than `require_identical` of the values are identical."""
    difference = max_abs_difference(expected, actual)
    identical, argmax_identical = output_agreement(expected, actual)
    if atol is not None and difference > atol:
        raise ExportValidationError(
            f"the runtime's outputs differ from the model's by up to {difference:.6g}, more than atol={atol}"
        )
    if require_identical is not None and identical < require_identical:
        raise ExportValidationError(
            f"the runtime reproduces {identical:.4%} of the model's output values bit for bit, fewer than "
            f"require_identical={require_identical}"
        )
    return difference, identical, argmax_identical


def check_require_identical(value: object) -> float | None:
    """`value` if it is None or a fraction in [0, 1], else raise `QuantizationConfigError`."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise QuantizationConfigError(
            f"require_identical must be None or a fraction of identical outputs in [0, 1], got {value!r}"
        )
    return float(value)
