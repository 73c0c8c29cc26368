"""Triton kernels for the CUDA fast path: one kernel per quantizer forward, one per LSQ backward.

The forward kernel computes exactly what torch's fused CUDA kernel computes, in float32 whatever the input dtype:
`(clip(nearbyint(x · (1/Δ)) + z, q_min, q_max) - z) · Δ`, and beside it the 1-byte straight-through mask
`Δ·(q_min - z) <= x <= Δ·(q_max - z)` on the *unrounded* input (DESIGN.md §4), so that the STE backward is one
select and `x` need not be kept. The LSQ backward kernel writes the masked input gradient and, per block (and
per channel), the partial sums that `lsq.py` reduces: Σ g·e, Σ (g - grad_x)·c and Σ (g - grad_x) with
c = clip(x/Δ + z, q_min, q_max) and e = round(c) - c; one torch reduction of the partials follows.

Outputs and input gradients are bit-identical to the torch path (fused CUDA kernels / the written-out CPU ops),
except for NaN inputs, which give NaN here as on the CPU path (torch's fused kernels turn them into the low
range end). The parameter gradients are the same sums added in another order: they differ from the torch path
by float32 rounding only.

The path is chosen by `applies(x)`: eager calls on CUDA when triton is importable. `TRAINABLE_INFRA_TRITON`
(or `triton_mode`) set to "off" disables it; "interpret" runs the same kernels under Triton's interpreter, also
on CPU tensors, which is how the tests check the CUDA code without a GPU.
"""

# Triton's convention names compile-time (constexpr) arguments in capitals, and branches on them are statements
# that the compiler resolves, not expressions.
# ruff: noqa: N803, SIM102, SIM108

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from trainable_infra.common.errors import QuantizationConfigError

# Imported on first use (`_import_triton`): CPU builds of torch ship without triton, and triton's LLVM aborts the
# process when it loads after TensorFlow's (seen with triton 3.9 and TensorFlow 2.21), which mct-quantizers
# imports whenever it is installed.
triton: Any = None
tl: Any = None
libdevice: Any = None
_IMPORT_TRIED = False

MODES = ("auto", "off", "interpret")
ENV = "TRAINABLE_INFRA_TRITON"
BLOCK = 1024
# CUDA limits the second grid dimension (one program row per channel).
MAX_CHANNELS = 65535
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_override: str | None = None


def _import_triton() -> bool:
    global triton, tl, libdevice, _IMPORT_TRIED
    if not _IMPORT_TRIED:
        _IMPORT_TRIED = True
        if "tensorflow" in sys.modules and "triton" not in sys.modules:
            warnings.warn(
                "trainable_infra: the Triton kernels are off because TensorFlow is loaded and triton's LLVM would "
                "abort the process if loaded after it; import triton before trainable_infra to use them",
                RuntimeWarning, stacklevel=3,
            )
            return False
        try:
            import triton as triton_module
            import triton.language as language
            from triton.language.extra import libdevice as device_library
        except ImportError:
            return False
        triton, tl, libdevice = triton_module, language, device_library
    return triton is not None


def available() -> bool:
    """Whether the Triton kernels can run here (triton importable, and not loaded after TensorFlow)."""
    return _import_triton()


def mode() -> str:
    """The Triton path's mode: `triton_mode`'s value if one is active, else `$TRAINABLE_INFRA_TRITON` or "auto"."""
    value = _override if _override is not None else os.environ.get(ENV, "auto")
    if value not in MODES:
        raise QuantizationConfigError(f"{ENV} must be one of {', '.join(MODES)}, got {value!r}")
    return value


@contextlib.contextmanager
def triton_mode(value: str) -> Iterator[None]:
    """Run the block with the Triton path in mode `value`: "auto" (CUDA, eager), "off" or "interpret".

    Example: `with triton_mode("off"): step()` times the torch path for an A/B comparison.
    """
    global _override
    if value not in MODES:
        raise QuantizationConfigError(f"triton_mode must be one of {', '.join(MODES)}, got {value!r}")
    if value == "interpret" and not _import_triton():
        raise ImportError("triton_mode('interpret') needs triton: pip install triton")
    previous, _override = _override, value
    try:
        yield
    finally:
        _override = previous


def force_interpreter() -> contextlib.AbstractContextManager[None]:
    """Run the Triton kernels under Triton's interpreter, on CPU tensors too (the code CUDA runs, on numpy)."""
    return triton_mode("interpret")


def applies(x: torch.Tensor) -> bool:
    """Whether fake-quantizing `x` takes the Triton path (eager only: compiled graphs keep the torch ops)."""
    if x.dtype not in _DTYPES or x.numel() == 0 or torch.compiler.is_compiling():
        return False
    current = mode()
    if current == "off" or not (x.device.type == "cuda" or (current == "interpret" and x.device.type == "cpu")):
        return False
    return _import_triton()


def _interpreting() -> bool:
    return mode() == "interpret" or os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---------------------------------------------------------------------------------------------------------------
# Kernels. Program (b, c) handles elements b·BLOCK ... of channel c (per-tensor: the one channel). With s the
# axis' stride and C its size, the j-th element of channel c in memory order is at flat memory index
# (j // s)·C·s + c·s + j % s, which holds for any dense non-overlapping layout (contiguous, channels-last).
# ---------------------------------------------------------------------------------------------------------------


def _forward_kernel(x_ptr, delta_ptr, zero_point_ptr, out_ptr, mask_ptr, per_channel, stride, channels, q_min, q_max,
                    BLOCK: tl.constexpr, STRIDED: tl.constexpr, WIDE: tl.constexpr, WRITE_MASK: tl.constexpr,
                    EMULATE: tl.constexpr):
    c = tl.program_id(1)
    b = tl.program_id(0)
    if WIDE:
        c = c.to(tl.int64)
        b = b.to(tl.int64)
    j = b * BLOCK + tl.arange(0, BLOCK)
    if STRIDED:
        index = (j // stride) * channels * stride + c * stride + j % stride
    else:
        index = c * per_channel + j
    valid = j < per_channel
    delta = tl.load(delta_ptr + c)
    z = tl.load(zero_point_ptr + c).to(tl.float32)
    inv = tl.math.div_rn(1.0, delta)  # torch's kernels compute 1.0f / scale, correctly rounded
    x = tl.load(x_ptr + index, mask=valid, other=0.0).to(tl.float32)
    # Clamped before rounding, which keeps |y| < 2^22 for the emulated rounding and changes no clipped result.
    # Comparisons and selects, not minimum/maximum, so that NaN stays NaN as torch.clamp keeps it.
    y = x * inv
    y_low = q_min - z - 1.0
    y_high = q_max - z + 1.0
    y = tl.where(y < y_low, y_low, y)
    y = tl.where(y > y_high, y_high, y)
    if EMULATE:
        # The interpreter has no libdevice. Adding and subtracting 1.5·2^23 rounds half-to-even exactly in
        # float32 (numpy, no fused multiply-add), as libdevice.rint (cvt.rni) does on the GPU.
        k = (y + 12582912.0) - 12582912.0 + z
    else:
        k = libdevice.rint(y) + z
    k = tl.where(k < q_min, q_min, k)
    k = tl.where(k > q_max, q_max, k)
    out = (k - z) * delta
    if EMULATE:
        if out_ptr.dtype.element_ty == tl.bfloat16:
            # The interpreter's float32 -> bfloat16 cast does not round to nearest even as the GPU's does.
            bits = out.to(tl.uint32, bitcast=True)
            bits = bits + (0x7FFF + ((bits >> 16) & 1))
            out = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    tl.store(out_ptr + index, out.to(out_ptr.dtype.element_ty), mask=valid)
    if WRITE_MASK:
        low = (q_min - z) * delta
        high = (q_max - z) * delta
        tl.store(mask_ptr + index, (x >= low) & (x <= high), mask=valid)


def _backward_kernel(x_ptr, grad_ptr, delta_ptr, zero_point_ptr, grad_x_ptr, partial_ptr, per_channel, stride,
                     channels, blocks, q_min, q_max, BLOCK: tl.constexpr, STRIDED: tl.constexpr, WIDE: tl.constexpr,
                     SUMS: tl.constexpr, EMULATE: tl.constexpr):
    c = tl.program_id(1)
    b = tl.program_id(0)
    if WIDE:
        c = c.to(tl.int64)
        b = b.to(tl.int64)
    j = b * BLOCK + tl.arange(0, BLOCK)
    if STRIDED:
        index = (j // stride) * channels * stride + c * stride + j % stride
    else:
        index = c * per_channel + j
    valid = j < per_channel
    delta = tl.load(delta_ptr + c)
    z = tl.load(zero_point_ptr + c).to(tl.float32)
    low = (q_min - z) * delta
    high = (q_max - z) * delta
    x = tl.load(x_ptr + index, mask=valid, other=0.0).to(tl.float32)
    grad = tl.load(grad_ptr + index, mask=valid, other=0.0)
    grad_x = tl.where((x >= low) & (x <= high), grad, 0.0).to(grad.dtype)
    tl.store(grad_x_ptr + index, grad_x, mask=valid)
    if SUMS:
        inv = tl.math.div_rn(1.0, delta)
        # Rounded after the product, before the sum, as torch's separate kernels do (fp fusion is off at launch).
        steps = x * inv + z
        steps = tl.where(steps < q_min, q_min, steps)
        steps = tl.where(steps > q_max, q_max, steps)
        if EMULATE:
            error = (steps + 12582912.0) - 12582912.0 - steps
        else:
            error = libdevice.rint(steps) - steps
        g = grad.to(tl.float32)
        outside = g - grad_x.to(tl.float32)
        at = c * blocks + b
        # tl.reduce with tl.sum's own combine function rather than tl.sum: the interpreter runs the kernels only
        # through its patched builtins, and tl.sum is a jitted function of the flavour triton was imported as.
        tl.store(partial_ptr + at, tl.reduce(g * error, 0, tl.standard._sum_combine))
        tl.store(partial_ptr + channels * blocks + at, tl.reduce(outside * steps, 0, tl.standard._sum_combine))
        tl.store(partial_ptr + 2 * channels * blocks + at, tl.reduce(outside, 0, tl.standard._sum_combine))


_KERNELS: dict[bool, tuple[Any, Any]] = {}


def _kernels(interpret: bool) -> tuple[Any, Any]:
    """The jitted (forward, backward) kernels, for the interpreter or for the GPU.

    triton.jit reads TRITON_INTERPRET when it decorates: each flavour is decorated on first use with it set.
    """
    if interpret not in _KERNELS:
        previous = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
        try:
            _KERNELS[interpret] = (triton.jit(_forward_kernel), triton.jit(_backward_kernel))
        finally:
            if previous is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = previous
    return _KERNELS[interpret]


def _dense(t: torch.Tensor) -> bool:
    """Whether `t` is dense and non-overlapping (its elements fill numel() consecutive memory slots)."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride(), strict=True) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _layout(x: torch.Tensor, axis: int | None) -> tuple[torch.Tensor, dict[str, Any], tuple[int, int]]:
    """(x in a dense layout, the kernels' layout arguments, the grid)."""
    if not _dense(x):
        x = x.contiguous()
    numel = x.numel()
    channels = 1 if axis is None else x.shape[axis]
    per_channel = numel // channels
    # A single channel is per-tensor: a size-1 axis may carry any stride.
    stride = per_channel if channels == 1 else x.stride(axis)
    blocks = triton.cdiv(per_channel, BLOCK)
    meta = {
        "per_channel": per_channel, "stride": stride, "channels": channels,
        "STRIDED": stride * channels != numel, "WIDE": numel >= 2**31 - BLOCK,
    }
    return x, meta, (blocks, channels)


def _launch(kernel: Any, grid: tuple[int, int], device: torch.device, *args: Any, **meta: Any) -> None:
    """Launch `kernel` on `device`; fp fusion off, so that x/Δ + z rounds after the product as torch's ops do."""
    interpret = _interpreting()
    meta = dict(meta, BLOCK=BLOCK, EMULATE=interpret, num_warps=4, enable_fp_fusion=False)
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):
            kernel[grid](*args, **meta)
    else:
        kernel[grid](*args, **meta)


def supported(x: torch.Tensor, axis: int | None) -> bool:
    """Whether the kernels take `x` quantized along `axis` (None: per-tensor)."""
    return axis is None or x.shape[axis] <= MAX_CHANNELS


def fake_quantize(x: torch.Tensor, delta: torch.Tensor, zero_point: torch.Tensor, axis: int | None, q_min: int,
                  q_max: int, with_mask: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fake-quantize `x` in one kernel; with `with_mask`, also the straight-through mask (bool, x's layout).

    Args:
        x: float32 / float16 / bfloat16 input, computed in float32 and returned in its dtype.
        delta, zero_point: C-length float32 / int32 grid (C = 1 per-tensor).
        axis: the channel axis, or None for per-tensor.
        q_min, q_max: the integer range.
        with_mask: whether to return where Δ·(q_min - z) <= x <= Δ·(q_max - z).

    Returns:
        (output, mask or None).
    """
    x, meta, grid = _layout(x, axis)
    out = torch.empty_like(x)
    mask = torch.empty_like(x, dtype=torch.bool) if with_mask else out
    forward, _ = _kernels(_interpreting())
    _launch(forward, grid, x.device, x, delta.float().contiguous(), zero_point.to(torch.int32).contiguous(), out,
            mask, q_min=float(q_min), q_max=float(q_max), WRITE_MASK=with_mask, **meta)
    return out, (mask if with_mask else None)


def lsq_backward(x: torch.Tensor, grad: torch.Tensor, delta: torch.Tensor, zero_point: torch.Tensor,
                 axis: int | None, q_min: int, q_max: int, sums: bool
                 ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
    """The straight-through input gradient and, with `sums`, LSQ's three C-length sums, in one pass over x.

    The sums, with c = clip(x/Δ + z, q_min, q_max), e = round(c) - c and g the upstream gradient in float32, are
    (Σ g·e, Σ (g - grad_x)·c, Σ (g - grad_x)) per channel. Each block adds its elements, then one torch
    reduction adds the blocks: the same terms as `lsq.py`'s torch path in another order, so equal up to float32
    rounding.

    Returns:
        (grad_x in grad's dtype and x's layout, the three sums as float32 C-length vectors, or None).
    """
    x, meta, grid = _layout(x, axis)
    if grad.shape != x.shape or grad.stride() != x.stride():
        grad = torch.empty_like(x, dtype=grad.dtype).copy_(grad)  # the kernel walks both in x's memory order
    grad_x = torch.empty_like(grad)
    blocks, channels = grid
    partials = torch.empty((3, channels, blocks), dtype=torch.float32, device=x.device) if sums else grad_x
    _, backward = _kernels(_interpreting())
    _launch(backward, grid, x.device, x, grad, delta.float().contiguous(), zero_point.to(torch.int32).contiguous(),
            grad_x, partials, blocks=blocks, q_min=float(q_min), q_max=float(q_max), SUMS=sums, **meta)
    if not sums:
        return grad_x, None
    total = partials.sum(dim=2)
    return grad_x, (total[0], total[1], total[2])


def ste_backward(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The straight-through input gradient from the forward kernel's mask: one select."""
    return torch.where(mask, grad, 0.0)


__all__ = [
    "ENV", "MODES", "applies", "available", "fake_quantize", "force_interpreter", "lsq_backward", "mode",
    "ste_backward", "supported", "triton_mode",
]
