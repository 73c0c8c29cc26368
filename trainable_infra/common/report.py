"""The per-layer quantization report shared by both backends: rows of plain values and their table."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class MacRow:
    """One multiply-accumulate operation of a model: a layer with weights or a product of two activations.

    `weights_quantized` is None for a product of two activations (it has no weight operand).
    """

    layer: str
    op: str
    macs: int
    weights_quantized: bool | None
    inputs_quantized: bool

    @property
    def quantized(self) -> bool:
        """Whether every operand of the operation is quantized."""
        return self.weights_quantized is not False and self.inputs_quantized


@dataclass(frozen=True)
class Coverage:
    """How much of a model's arithmetic runs on quantized operands, and which layers with weights stay float.

    `rows` has one entry per multiply-accumulate operation executed on the measured batch (a layer called twice
    appears twice); `float_layers` names every layer that holds weights and runs without a weight quantizer
    (normalizations, embeddings, skipped or unsupported layers).
    """

    rows: tuple[MacRow, ...]
    float_layers: tuple[str, ...]

    @property
    def total_macs(self) -> int:
        """Multiply-accumulates per measured batch."""
        return sum(row.macs for row in self.rows)

    @property
    def quantized_macs(self) -> int:
        """Multiply-accumulates whose operands are all quantized."""
        return sum(row.macs for row in self.rows if row.quantized)

    @property
    def quantized_share(self) -> float:
        """quantized_macs / total_macs (1.0 for a model without multiply-accumulates)."""
        total = self.total_macs
        return self.quantized_macs / total if total else 1.0

    def format(self, max_rows: int = 20) -> str:
        """A summary: the quantized share, the float operations (largest first) and the float layers."""
        share = f"{self.quantized_share:.2%} ({self.quantized_macs:,} of {self.total_macs:,} per batch)"
        lines = [f"quantized MACs: {share}"]
        unquantized = sorted((row for row in self.rows if not row.quantized), key=lambda row: -row.macs)
        for row in unquantized[:max_rows]:
            operands = "weights" if row.weights_quantized is False else ""
            if not row.inputs_quantized:
                operands = f"{operands} and inputs" if operands else "inputs"
            lines.append(f"  float {operands}: {row.layer} ({row.op}, {row.macs:,} MACs)")
        if len(unquantized) > max_rows:
            lines.append(f"  ... and {len(unquantized) - max_rows} more float operations")
        if self.float_layers:
            lines.append(f"float layers with weights: {', '.join(self.float_layers)}")
        return "\n".join(lines)
