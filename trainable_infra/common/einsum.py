"""Einsum equations read as both backends need them: the channel axis of a kernel, output shapes, and MACs.

An equation is numpy's: comma-separated operand subscripts, "->", the output subscripts; letters are axes, "..."
stands for the leading (broadcast) axes an operand's letters do not name.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from trainable_infra.common.errors import QuantizationConfigError

_ELLIPSIS = "..."


def parse_equation(equation: str, operands: int | None = None) -> tuple[list[str], str]:
    """(operand subscripts, output subscripts) of an explicit einsum equation (with "->").

    Raises `QuantizationConfigError` for an equation without "->", with characters other than letters and "...",
    or with a number of operands other than `operands` (when given).
    """
    if not isinstance(equation, str) or equation.count("->") != 1:
        raise QuantizationConfigError(
            f"equation must be an explicit einsum equation such as 'ab,bc->ac', got {equation!r}"
        )
    left, output = (part.replace(" ", "") for part in equation.split("->"))
    inputs = left.split(",")
    for subscripts in [*inputs, output]:
        letters = subscripts.replace(_ELLIPSIS, "", 1)
        if not letters.isalpha() and letters:
            raise QuantizationConfigError(
                f"equation {equation!r}: subscripts {subscripts!r} may hold letters and one '...' only"
            )
    if operands is not None and len(inputs) != operands:
        raise QuantizationConfigError(
            f"equation {equation!r} has {len(inputs)} operand(s), expected {operands}"
        )
    return inputs, output


def kernel_channel_axis(equation: str) -> int | None:
    """The axis of the second operand (an `EinsumDense` kernel) along which per-channel parameters go.

    It is the last kernel axis whose letter names an output axis (the one that varies fastest in the output, as a
    Dense kernel's last axis does): "ab,bc->ac" gives 1; a kernel with several output axes, such as the
    (features, heads, head_dim) kernel of "abc,cde->abde", gets one parameter per entry of the last (head_dim),
    shared by the others. None if no kernel axis reaches the output.
    """
    inputs, output = parse_equation(equation, operands=2)
    kernel = inputs[1]
    if _ELLIPSIS in kernel:
        raise QuantizationConfigError(f"equation {equation!r}: the kernel's subscripts {kernel!r} must name every axis")
    axes = [axis for axis, letter in enumerate(kernel) if letter in output]
    return axes[-1] if axes else None


def _sizes(equation: str, shapes: Sequence[Sequence[int | None]]) -> tuple[dict[str, int | None], list]:
    """{letter: size} over all operands, and the broadcast shape of their "..." axes."""
    inputs, _ = parse_equation(equation, operands=len(shapes))
    sizes: dict[str, int | None] = {}
    broadcast: list[int | None] = []
    for subscripts, shape in zip(inputs, shapes, strict=True):
        shape = list(shape)
        before, _, after = subscripts.partition(_ELLIPSIS)
        if _ELLIPSIS not in subscripts:
            before, after = subscripts, ""
        named = len(before) + len(after)
        if len(shape) < named or (_ELLIPSIS not in subscripts and len(shape) != named):
            raise QuantizationConfigError(
                f"equation {equation!r}: operand {subscripts!r} does not fit a tensor of shape {tuple(shape)}"
            )
        middle = shape[len(before):len(shape) - len(after)]
        for letter, size in zip(before + after, shape[:len(before)] + shape[len(shape) - len(after):], strict=True):
            if sizes.get(letter) in (None, 1):  # a size of 1 broadcasts against the other operand's
                sizes[letter] = size
        # Right-aligned broadcasting of the "..." axes, as numpy does.
        width = max(len(broadcast), len(middle))
        padded = [1] * (width - len(broadcast)) + broadcast
        other = [1] * (width - len(middle)) + list(middle)
        broadcast = [b if o == 1 else o if b in (1, None) else b for b, o in zip(padded, other, strict=True)]
    return sizes, broadcast


def einsum_output_shape(equation: str, *shapes: Sequence[int | None]) -> tuple[int | None, ...]:
    """The shape of the einsum's result on operands of the given shapes (None for an unknown size)."""
    _, output = parse_equation(equation, operands=len(shapes))
    sizes, broadcast = _sizes(equation, shapes)
    before, _, after = output.partition(_ELLIPSIS)
    if _ELLIPSIS not in output:
        before, after, broadcast = output, "", []
    return tuple([sizes[c] for c in before] + broadcast + [sizes[c] for c in after])


def einsum_macs(equation: str, *shapes: Sequence[int]) -> int:
    """Multiply-accumulates of an einsum of two operands of known shapes: one per combination of all the axes it
    names (output and summed ones) and of the broadcast "..." axes."""
    if len(shapes) != 2:
        raise QuantizationConfigError(f"einsum_macs counts products of two operands, got {len(shapes)}")
    sizes, broadcast = _sizes(equation, shapes)
    dims = [*sizes.values(), *broadcast]
    if any(d is None for d in dims):
        raise QuantizationConfigError(f"einsum_macs needs known shapes, got {[tuple(s) for s in shapes]}")
    return math.prod(int(d) for d in dims)


def matmul_macs(shape_a: Sequence[int], output_shape: Sequence[int]) -> int:
    """Multiply-accumulates of a (batched) matrix product: one per output value and entry of the summed axis (the
    last axis of the first operand)."""
    return math.prod(int(d) for d in output_shape) * int(shape_a[-1])
