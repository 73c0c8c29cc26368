"""Triton kernels for the CUDA fast path: one kernel per quantizer forward, two per LSQ backward, one per bias.

The pass kernel's forward computes exactly what torch's fused CUDA kernel computes, in float32 whatever the input
dtype: `(clip(nearbyint(x · (1/Δ)) + z, q_min, q_max) - z) · Δ`, and beside it the 1-byte straight-through mask
`Δ·(q_min - z) <= x <= Δ·(q_max - z)` on the *unrounded* input (DESIGN.md §4), so that the STE backward is one
select and `x` need not be kept. Its backward writes the masked input gradient and, per block (and per channel),
the partial sums of LSQ's gradients: Σ g·e, Σ (g - grad_x)·c and Σ (g - grad_x) with c = clip(x/Δ + z, q_min,
q_max) and e = round(c) - c; the finish kernel adds them up and applies `lsq.py`'s parameter maths.

The grid (Δ, z) is handed over (`KernelGrid.given`, the STE quantizers' kept grid) or computed by the kernel from
the quantizer's threshold or range (`kernel_grid()`, LSQ), with `grid.py`'s IEEE operations: a trained grid
costs no small torch kernels per call. The bias kernel rounds a layer's bias onto its int32 grid.

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
import dataclasses
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
# Kernels. Program (b, c) of `_pass_kernel` handles elements b·BLOCK ... of channel c (per-tensor: the one
# channel). With s the axis' stride and C its size, the j-th element of channel c in memory order is at flat
# memory index (j // s)·C·s + c·s + j % s, which holds for any dense non-overlapping layout (contiguous,
# channels-last).
# ---------------------------------------------------------------------------------------------------------------

# Where the pass kernel takes channel c's (Δ, z) from (its constexpr GRID): given vectors, or the quantizer's
# parameters, from which it computes them as `grid.py` does, in the same IEEE operations.
GIVEN, SYMMETRIC, POWER_OF_TWO, UNIFORM = 0, 1, 2, 3
# Under the interpreter (EMULATE), which has no libdevice, adding and subtracting 1.5·2^23 = 12582912 rounds
# |y| < 2^22 half-to-even exactly in float32 (numpy, no fused multiply-add), as libdevice.rint (cvt.rni) does on
# the GPU.


def _pass_kernel(x_ptr, grad_ptr, first_ptr, second_ptr, out_ptr, aux_ptr, step_ptr, per_channel, stride, channels,
                 blocks, q_min, q_max, min_threshold, divisor, BLOCK: tl.constexpr, STRIDED: tl.constexpr,
                 WIDE: tl.constexpr, GRID: tl.constexpr, BACKWARD: tl.constexpr, AUX: tl.constexpr,
                 STEP_OUT: tl.constexpr, EMULATE: tl.constexpr):
    # Forward: out = fake-quantized x, aux = the straight-through mask, step = Δ. Backward: out = the masked
    # gradient, aux = the per-block LSQ sums.
    c = tl.program_id(1)
    b = tl.program_id(0)
    if WIDE:
        c = c.to(tl.int64)
        b = b.to(tl.int64)
    if GRID == 0:
        delta = tl.load(first_ptr + c).to(tl.float32)
        z = tl.load(second_ptr + c).to(tl.float32)
    elif GRID == 3:
        # UniformGrid: the range widened to contain 0 and to min_threshold, Δ = (b - a)/K, z = clip(round(-a/Δ)).
        # Comparisons and selects keep NaN as torch's clamp and maximum do.
        range_min = tl.load(first_ptr + c).to(tl.float32)
        range_max = tl.load(second_ptr + c).to(tl.float32)
        low = tl.where(range_min > 0.0, 0.0, range_min)
        high = tl.where(range_max < 0.0, 0.0, range_max)
        least = low + min_threshold
        high = tl.where((high >= least) | (high != high), high, least)
        delta = tl.math.div_rn(high - low, divisor)
        z = tl.math.div_rn(-low, delta)
        if EMULATE:
            z = (z + 12582912.0) - 12582912.0
        else:
            z = libdevice.rint(z)
        z = tl.where(z < 0.0, 0.0, z)
        z = tl.where(z > q_max, q_max, z)
    else:
        # SymmetricGrid: Δ = max(t, min_threshold) / 2^(n-s), the threshold rounded up to a power of two first
        # for POWER_OF_TWO (exactly: the next exponent, or t itself when it is one; Inf and NaN give NaN as
        # t / frexp(t).mantissa does; `kernel_grid` keeps min_threshold normal, so no t is subnormal).
        threshold = tl.load(first_ptr + c).to(tl.float32)
        threshold = tl.where(threshold < min_threshold, min_threshold, threshold)
        if GRID == 2:
            bits = threshold.to(tl.uint32, bitcast=True)
            exponent = (bits >> 23) & 0xFF
            up = ((exponent + 1) << 23).to(tl.float32, bitcast=True)
            rounded = tl.where((bits & 0x7FFFFF) == 0, threshold, up)
            threshold = tl.where(exponent == 0xFF, threshold - threshold, rounded)
        delta = tl.math.div_rn(threshold, divisor)
        z = 0.0
    if STEP_OUT:
        tl.store(step_ptr + c, delta, mask=b == 0)
    j = b * BLOCK + tl.arange(0, BLOCK)
    if STRIDED:
        index = (j // stride) * channels * stride + c * stride + j % stride
    else:
        index = c * per_channel + j
    valid = j < per_channel
    x = tl.load(x_ptr + index, mask=valid, other=0.0).to(tl.float32)
    inv = tl.math.div_rn(1.0, delta)  # torch's kernels compute 1.0f / scale, correctly rounded
    # The straight-through range on the unrounded input, the same float32 products as `bounds()`.
    low = (q_min - z) * delta
    high = (q_max - z) * delta
    if BACKWARD:
        grad = tl.load(grad_ptr + index, mask=valid, other=0.0)
        grad_x = tl.where((x >= low) & (x <= high), grad, 0.0).to(grad.dtype)
        tl.store(out_ptr + index, grad_x, mask=valid)
        if AUX:
            # Rounded after the product, before the sum, as torch's separate kernels do (fp fusion is off).
            steps = x * inv + z
            steps = tl.where(steps < q_min, q_min, steps)
            steps = tl.where(steps > q_max, q_max, steps)
            # Lanes past the end add nothing, even where 1/Δ overflows (a subnormal Δ: 0·Inf would be NaN).
            steps = tl.where(valid, steps, 0.0)
            if EMULATE:
                error = (steps + 12582912.0) - 12582912.0 - steps
            else:
                error = libdevice.rint(steps) - steps
            g = grad.to(tl.float32)
            outside = g - grad_x.to(tl.float32)
            at = c * blocks + b
            # tl.reduce with tl.sum's own combine function rather than tl.sum: the interpreter runs the kernels
            # only through its patched builtins, and tl.sum is a jitted function of the flavour triton was
            # imported as.
            tl.store(aux_ptr + at, tl.reduce(g * error, 0, tl.standard._sum_combine))
            tl.store(aux_ptr + channels * blocks + at, tl.reduce(outside * steps, 0, tl.standard._sum_combine))
            tl.store(aux_ptr + 2 * channels * blocks + at, tl.reduce(outside, 0, tl.standard._sum_combine))
    else:
        # Clamped before rounding, which keeps |y| < 2^22 for the emulated rounding and changes no clipped result.
        # Comparisons and selects, not minimum/maximum, so that NaN stays NaN as torch.clamp keeps it.
        y = x * inv
        y_low = q_min - z - 1.0
        y_high = q_max - z + 1.0
        y = tl.where(y < y_low, y_low, y)
        y = tl.where(y > y_high, y_high, y)
        if EMULATE:
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
        if AUX:
            tl.store(aux_ptr + index, (x >= low) & (x <= high), mask=valid)


def _finish_kernel(partial_ptr, first_ptr, second_ptr, grad_first_ptr, grad_second_ptr, channels, blocks,
                   min_threshold, scale, levels, BLOCK: tl.constexpr, GRID: tl.constexpr):
    # Program c: channel c's LSQ parameter gradients from the pass kernel's per-block sums, in the operations of
    # `lsq.py`'s torch path.
    c = tl.program_id(0)
    # tl.full, not tl.zeros, and tl.reduce: builtins the interpreter patches (see the pass kernel).
    errors = tl.full([BLOCK], 0.0, tl.float32)
    clipped = tl.full([BLOCK], 0.0, tl.float32)
    outside = tl.full([BLOCK], 0.0, tl.float32)
    for start in range(0, blocks, BLOCK):
        j = start + tl.arange(0, BLOCK)
        valid = j < blocks
        at = c * blocks + j
        errors += tl.load(partial_ptr + at, mask=valid, other=0.0)
        clipped += tl.load(partial_ptr + channels * blocks + at, mask=valid, other=0.0)
        outside += tl.load(partial_ptr + 2 * channels * blocks + at, mask=valid, other=0.0)
    error_sum = tl.reduce(errors, 0, tl.standard._sum_combine)
    clipped_sum = tl.reduce(clipped, 0, tl.standard._sum_combine)
    if GRID == 3:
        outside_sum = tl.reduce(outside, 0, tl.standard._sum_combine)
        above = tl.math.div_rn(clipped_sum, levels)
        below = outside_sum - above
        rounding = tl.math.div_rn(error_sum, levels)
        range_min = tl.load(first_ptr + c).to(tl.float32)
        range_max = tl.load(second_ptr + c).to(tl.float32)
        # A range held at its narrowest width follows neither end; NaN compares false, as in torch.
        low = tl.where(range_min > 0.0, 0.0, range_min)
        high = tl.where(range_max < 0.0, 0.0, range_max)
        wide = high >= low + min_threshold
        moves_min = tl.where((range_min <= 0.0) & wide, 1.0, 0.0)
        moves_max = tl.where((range_max >= 0.0) & wide, 1.0, 0.0)
        tl.store(grad_first_ptr + c, ((below - rounding) * scale) * moves_min)
        tl.store(grad_second_ptr + c, ((above + rounding) * scale) * moves_max)
    else:
        threshold = tl.load(first_ptr + c).to(tl.float32)
        tl.store(grad_first_ptr + c,
                 ((error_sum + clipped_sum) * scale) * tl.where(threshold >= min_threshold, 1.0, 0.0))


def _bias_kernel(bias_ptr, x_step_ptr, w_step_ptr, out_ptr, n, BLOCK: tl.constexpr, PER_CHANNEL: tl.constexpr,
                 EMULATE: tl.constexpr):
    # round(b / s)·s with s = Δ_in·Δ_w, saturated at the int32 range in float32, as `integer._QuantizeBias`
    # computes it.
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = i < n
    if PER_CHANNEL:
        w_step = tl.load(w_step_ptr + i, mask=valid, other=1.0)
    else:
        w_step = tl.load(w_step_ptr)
    scale = tl.load(x_step_ptr) * w_step
    q = tl.math.div_rn(tl.load(bias_ptr + i, mask=valid, other=0.0), scale)
    if EMULATE:
        # Adding and subtracting 2^23 (with q's sign) rounds |q| < 2^23 half-to-even; larger values are integers.
        # rint keeps the sign of a value rounded to zero: so does q·0.
        magic = tl.where(q < 0.0, -8388608.0, 8388608.0)
        r = tl.where(tl.abs(q) < 8388608.0, (q + magic) - magic, q)
        q = tl.where(r == 0.0, q * 0.0, r)
    else:
        q = libdevice.rint(q)
    # torch clamps a float32 tensor at float32(INT32_MIN) = -2^31 and float32(INT32_MAX) = 2^31.
    q = tl.where(q < -2147483648.0, -2147483648.0, q)
    q = tl.where(q > 2147483648.0, 2147483648.0, q)
    tl.store(out_ptr + i, q * scale, mask=valid)


_KERNELS: dict[bool, tuple[Any, Any, Any]] = {}


def _kernels(interpret: bool) -> tuple[Any, Any, Any]:
    """The jitted (pass, finish, bias) kernels, for the interpreter or for the GPU.

    triton.jit reads TRITON_INTERPRET when it decorates: each flavour is decorated on first use with it set.
    """
    if interpret not in _KERNELS:
        previous = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
        try:
            _KERNELS[interpret] = (triton.jit(_pass_kernel), triton.jit(_finish_kernel), triton.jit(_bias_kernel))
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
    """(x in a dense layout, the pass kernel's layout arguments, its launch grid)."""
    if not _dense(x):
        x = x.contiguous()
    numel = x.numel()
    channels = 1 if axis is None else x.shape[axis]
    per_channel = numel // channels
    # A single channel is per-tensor: a size-1 axis may carry any stride.
    stride = per_channel if channels == 1 else x.stride(axis)
    blocks = triton.cdiv(per_channel, BLOCK)
    meta = {
        "per_channel": per_channel, "stride": stride, "channels": channels, "blocks": blocks,
        "STRIDED": stride * channels != numel, "WIDE": numel >= 2**31 - BLOCK,
    }
    return x, meta, (blocks, channels)


def _launch(kernel: Any, grid: tuple[int, ...], device: torch.device, *args: Any, **meta: Any) -> None:
    """Launch `kernel` on `device`; fp fusion off, so that x/Δ + z rounds after the product as torch's ops do."""
    meta = dict(meta, num_warps=4, enable_fp_fusion=False)
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):
            kernel[grid](*args, **meta)
    else:
        kernel[grid](*args, **meta)


@dataclasses.dataclass(frozen=True)
class KernelGrid:
    """Where the kernels take the grid (Δ, z) from: given C-length vectors, or a quantizer's parameters.

    Built by `KernelGrid.given(delta, zero_point)`, or by a quantizer's `kernel_grid()` from its threshold / range,
    which the kernels turn into (Δ, z) per channel with `grid.py`'s operations: no small torch kernels per call.
    """

    kind: int
    first: torch.Tensor  # Δ, the threshold, or range_min
    second: torch.Tensor  # the zero point, the threshold again, or range_max
    min_threshold: float = 0.0
    divisor: float = 1.0  # 2^(n - s) (symmetric), K = 2^n - 1 (uniform)

    @classmethod
    def given(cls, delta: torch.Tensor, zero_point: torch.Tensor) -> KernelGrid:
        """Δ (float32) and the zero point (int32), C-length."""
        return cls(GIVEN, delta.float().contiguous(), zero_point.to(torch.int32).contiguous())

    def _arguments(self) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        return self.first, self.second, float(self.min_threshold), float(self.divisor)


def supported(x: torch.Tensor, axis: int | None) -> bool:
    """Whether the kernels take `x` quantized along `axis` (None: per-tensor)."""
    return axis is None or x.shape[axis] <= MAX_CHANNELS


def fake_quantize(x: torch.Tensor, grid: KernelGrid, axis: int | None, q_min: int, q_max: int,
                  with_mask: bool = False, with_step: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Fake-quantize `x` in one kernel; optionally also the straight-through mask and the step Δ it used.

    Args:
        x: float32 / float16 / bfloat16 input, computed in float32 and returned in its dtype.
        grid: the grid (`KernelGrid`), C channels (C = 1 per-tensor).
        axis: the channel axis, or None for per-tensor.
        q_min, q_max: the integer range.
        with_mask: whether to return where Δ·(q_min - z) <= x <= Δ·(q_max - z) (bool, x's layout).
        with_step: whether to return Δ (float32, C-length), as `grid()` computes it.

    Returns:
        (output, mask or None, Δ or None).
    """
    x, meta, launch_grid = _layout(x, axis)
    out = torch.empty_like(x)
    mask = torch.empty_like(x, dtype=torch.bool) if with_mask else out
    step = torch.empty(meta["channels"], dtype=torch.float32, device=x.device) if with_step else out
    interpret = _interpreting()
    first, second, min_threshold, divisor = grid._arguments()
    _launch(_kernels(interpret)[0], launch_grid, x.device, x, x, first, second, out, mask, step,
            q_min=float(q_min), q_max=float(q_max), min_threshold=min_threshold, divisor=divisor, BLOCK=BLOCK,
            GRID=grid.kind, BACKWARD=False, AUX=with_mask, STEP_OUT=with_step, EMULATE=interpret, **meta)
    return out, (mask if with_mask else None), (step if with_step else None)


def lsq_backward(x: torch.Tensor, grad: torch.Tensor, grid: KernelGrid, axis: int | None, q_min: int, q_max: int,
                 sums: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The straight-through input gradient and, with `sums`, the per-block partial LSQ sums, in one pass over x.

    With c = clip(x/Δ + z, q_min, q_max), e = round(c) - c and g the upstream gradient in float32, the partials
    are (Σ g·e, Σ (g - grad_x)·c, Σ (g - grad_x)) per channel and block, a float32 tensor (3, C, blocks) that
    `lsq_parameter_grads` finishes (or `.sum(dim=2)` adds up).

    Returns:
        (grad_x in grad's dtype and x's layout, the partial sums or None).
    """
    x, meta, launch_grid = _layout(x, axis)
    if grad.shape != x.shape or grad.stride() != x.stride():
        grad = torch.empty_like(x, dtype=grad.dtype).copy_(grad)  # the kernel walks both in x's memory order
    grad_x = torch.empty_like(grad)
    blocks, channels = launch_grid
    partials = torch.empty((3, channels, blocks), dtype=torch.float32, device=x.device) if sums else grad_x
    interpret = _interpreting()
    first, second, min_threshold, divisor = grid._arguments()
    _launch(_kernels(interpret)[0], launch_grid, x.device, x, grad, first, second, grad_x, partials, grad_x,
            q_min=float(q_min), q_max=float(q_max), min_threshold=min_threshold, divisor=divisor, BLOCK=BLOCK,
            GRID=grid.kind, BACKWARD=True, AUX=sums, STEP_OUT=False, EMULATE=interpret, **meta)
    return grad_x, (partials if sums else None)


def lsq_parameter_grads(partials: torch.Tensor, parameters: tuple[torch.Tensor, ...], min_threshold: float,
                        scale: float, levels: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """LSQ's parameter gradients from `lsq_backward`'s partial sums, in one kernel.

    `parameters` is (threshold,) for symmetric / power-of-two grids: its gradient is (Σ g·e + Σ (g - grad_x)·c)
    ·scale, 0 where the threshold is below `min_threshold`. For uniform grids it is (range_min, range_max), with
    `levels` = K. The parameters are read as the forward pass saw them; the gradients have their shapes, in float32.

    Returns:
        (threshold's or range_min's gradient, range_max's gradient or None).
    """
    _, channels, blocks = partials.shape
    uniform = len(parameters) == 2
    first = parameters[0].detach().contiguous()
    second = parameters[-1].detach().contiguous()
    grad_first = torch.empty(first.shape, dtype=torch.float32, device=first.device)
    grad_second = torch.empty(second.shape, dtype=torch.float32, device=second.device) if uniform else grad_first
    _launch(_kernels(_interpreting())[1], (channels,), partials.device, partials, first, second, grad_first,
            grad_second, channels, blocks, float(min_threshold), float(scale), float(levels), BLOCK=BLOCK,
            GRID=UNIFORM if uniform else SYMMETRIC)
    return grad_first, (grad_second if uniform else None)


def quantize_bias(bias: torch.Tensor, x_step: torch.Tensor, w_step: torch.Tensor) -> torch.Tensor:
    """round(bias / s)·s with s = Δ_in·Δ_w in one kernel, saturated at the int32 range.

    `bias` float32 (C), `x_step` float32 (one value), `w_step` float32 (C values or one).
    """
    bias = bias.contiguous()
    w_step = w_step.contiguous()
    out = torch.empty_like(bias)
    n = bias.numel()
    interpret = _interpreting()
    _launch(_kernels(interpret)[2], (triton.cdiv(n, BLOCK),), bias.device, bias, x_step, w_step, out, n,
            BLOCK=BLOCK, PER_CHANNEL=w_step.numel() != 1, EMULATE=interpret)
    return out


def ste_backward(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The straight-through input gradient from the forward kernel's mask: one select."""
    return torch.where(mask, grad, 0.0)


__all__ = [
    "ENV", "MODES", "KernelGrid", "applies", "available", "fake_quantize", "force_interpreter", "lsq_backward",
    "lsq_parameter_grads", "mode", "quantize_bias", "ste_backward", "supported", "triton_mode",
]
