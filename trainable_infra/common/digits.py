"""scikit-learn's bundled 8x8 digits (no download), split the same way for both backends' demos."""

from __future__ import annotations

import numpy as np


def load_digits_split(test_fraction: float = 0.25, seed: int = 0) -> tuple[np.ndarray, ...]:
    """(x_train, y_train, x_test, y_test): images as float32 (N, 8, 8) in [0, 1], labels as int64.

    The split is stratified by class and fixed by `seed`.
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # pragma: no cover - scikit-learn is in the dev extra
        raise ImportError("the demo uses scikit-learn's digits data: pip install scikit-learn") from exc
    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)
    labels = data.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=test_fraction, random_state=seed, stratify=labels
    )
    return x_train, y_train, x_test, y_test


def accuracy_line(kind: str, accuracy: float) -> str:
    """The demo's result line, e.g. "QAT accuracy: 97.33%"."""
    return f"{kind} accuracy: {100.0 * accuracy:.2f}%"
