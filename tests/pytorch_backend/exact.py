"""Bit-for-bit comparison of float tensors for the PyTorch backend tests."""

from __future__ import annotations

import torch


def same_bits(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Elementwise: equal values with equal signs (+0.0 and -0.0 differ), or NaN on both sides (a NaN's sign and
    payload carry nothing)."""
    both_nan = torch.isnan(actual) & torch.isnan(expected)
    return both_nan | (torch.eq(actual, expected) & (torch.signbit(actual) == torch.signbit(expected)))


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Assert equal dtypes and `same_bits` everywhere, naming the first element that differs."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} vs {expected.dtype}"
    same = same_bits(actual, expected)
    if not bool(same.all()):
        index = tuple(int(i) for i in torch.nonzero(~same)[0])
        raise AssertionError(f"{what}: {int((~same).sum())} of {same.numel()} differ; first at {index}: "
                             f"{actual[index].item()!r} vs {expected[index].item()!r}")
