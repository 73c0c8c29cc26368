"""The per-layer quantization report shared by both backends: rows of plain values and their table."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

COLUMNS = ("layer", "kind", "bits", "method", "training", "parameters", "sqnr_db")


def sqnr_db(reference: np.ndarray, quantized: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when the quantization error is zero)."""
    reference = np.asarray(reference, dtype=np.float64)
    noise = float(np.sum((reference - np.asarray(quantized, dtype=np.float64)) ** 2))
    signal = float(np.sum(reference**2))
    if noise == 0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


def describe_params(values: dict[str, np.ndarray]) -> str:
    """A short text of a quantizer's parameters, e.g. "threshold 0.25..1.5 (16 ch)"."""
    parts = []
    for name, value in values.items():
        value = np.asarray(value, dtype=np.float64).reshape(-1)
        if value.size == 1:
            parts.append(f"{name} {value[0]:.4g}")
        else:
            parts.append(f"{name} {value.min():.4g}..{value.max():.4g} ({value.size} ch)")
    return ", ".join(parts)


def report_row(layer: str, kind: str, bits: int, method: Any, training: Any, params: dict, sqnr: float | None) -> dict:
    """One report row of plain values."""
    return {
        "layer": layer,
        "kind": kind,
        "bits": bits,
        "method": getattr(method, "name", str(method)),
        "training": getattr(training, "name", str(training)),
        "parameters": describe_params(params),
        "sqnr_db": sqnr,
    }


def format_report(rows: Sequence[dict]) -> str:
    """The rows as an aligned text table."""
    header = ["layer", "kind", "bits", "method", "training", "parameters", "SQNR dB"]
    body = [
        [str(r["layer"]), r["kind"], str(r["bits"]), r["method"], r["training"], r["parameters"],
         "-" if r["sqnr_db"] is None else f"{r['sqnr_db']:.1f}"]
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
             for line in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
