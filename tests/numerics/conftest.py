"""Fixtures of the numerics suite."""

from __future__ import annotations

import pytest

from tests.numerics.adapters import ADAPTERS


@pytest.fixture
def adapter(backend):
    """The adapter of the `backend` parameter."""
    return ADAPTERS[backend]
