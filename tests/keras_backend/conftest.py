"""Fixtures of the Keras backend tests."""

import numpy as np
import pytest


@pytest.fixture(scope="session")
def digits():
    """sklearn's 8x8 digits (bundled with sklearn, no download), scaled to [0, 16] floats."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = data.images.astype(np.float32)[..., None]
    return x, data.target.astype(np.int32)
