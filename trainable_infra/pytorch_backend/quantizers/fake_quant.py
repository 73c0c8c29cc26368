"""Fake quantization and its straight-through gradient, on the fastest exact path of each device.

Eagerly on CUDA the fused kernels (`torch.fake_quantize_per_*_affine`) are the fast path. On the CPU the same
IEEE operations written out (multiply by 1/Δ, round half to even, add the zero point, clip, subtract it,
multiply by Δ) run 5-10x faster than the fused CPU kernel, which is not vectorized, and give the same bits: the
kernel computes exactly `(clip(nearbyint(x · (1/Δ)) + z, q_min, q_max) - z) · Δ` in float32.

Eagerly on CUDA, where triton is installed, the Triton kernels of `triton_kernels` replace both: one kernel for
the forward (which also writes the straight-through mask) and one for the backward, with the same bits.

Under torch.compile CUDA takes the written-out operations too: inductor fuses them with what surrounds the
quantizer (the fused op would stay an external kernel, which also writes a mask), and 1/Δ is taken through
float64 (`divide`), as inductor's Triton code divides float32 approximately. The quantizer's values are the eager
ones; an addition that consumes them inside the same fused CUDA kernel may become a fused multiply-add, as
anywhere in a compiled model (inductor's Triton default; TORCHINDUCTOR_EMULATE_PRECISION_CASTS=1 turns it off).
"""

from __future__ import annotations

from typing import Any

import torch

from trainable_infra.pytorch_backend.quantizers import triton_kernels


def fake_quantize(
    x: torch.Tensor,
    delta: torch.Tensor,
    zero_point: torch.Tensor,
    axis: int | None,
    view: tuple[int, ...],
    q_min: int,
    q_max: int,
) -> torch.Tensor:
    """Fake-quantize `x` with C-length `delta` / int32 `zero_point`, per-channel along `axis` or per-tensor."""
    if triton_kernels.applies(x) and triton_kernels.supported(x, axis):
        return triton_kernels.fake_quantize(x, triton_kernels.KernelGrid.given(delta, zero_point), axis, q_min,
                                            q_max)[0]
    if x.device.type != "cpu" and (eager() or x.device.type != "cuda"):
        if axis is None:
            return torch.fake_quantize_per_tensor_affine(x, delta, zero_point, q_min, q_max)
        return torch.fake_quantize_per_channel_affine(x, delta, zero_point, axis, q_min, q_max)
    d = delta.view(view)
    z = zero_point.view(view).to(torch.float32)
    # Per-tensor, Δ is a 0-dim tensor, which does not promote a float16 / bfloat16 input: compute it in float32
    # as the fused kernel does (per-channel, the C-length Δ promotes it by itself).
    work = x.float() if axis is None and x.dtype in (torch.float16, torch.bfloat16) else x
    # In place after the first product: fresh memory costs more than the arithmetic on the CPU.
    steps = (work * reciprocal(d)).round_().add_(z).clamp_(q_min, q_max).sub_(z)
    return steps.mul_(d).to(x.dtype)


def _quotient_dtype(a: torch.Tensor, b: torch.Tensor | float) -> torch.dtype:
    """torch.result_type(a, b) for floating a and b (which dynamo cannot trace): a 0-dim tensor or a number does
    not promote a tensor with dimensions."""
    if not isinstance(b, torch.Tensor) or (b.dim() == 0 and a.dim() > 0):
        return a.dtype
    if a.dim() == 0 and b.dim() > 0:
        return b.dtype
    return torch.promote_types(a.dtype, b.dtype)


def divide(a: torch.Tensor, b: torch.Tensor | float) -> torch.Tensor:
    """a / b, the IEEE quotient (round to nearest even) in torch's result dtype, eagerly and under torch.compile on
    the CPU and CUDA.

    Eagerly torch divides two tensors as IEEE does on every device (a CUDA tensor divided by a Python number is a
    product with its reciprocal instead, hence `b` becomes a tensor). Inductor's Triton code divides float32 by
    `div.full`, an approximation (up to 2 ulp) unless TORCHINDUCTOR_EMULATE_DIVISION_ROUNDING=1, and grids and
    biases must keep the bits of the inferable quantizer: compiled, the quotient is taken in float64, which
    Triton divides exactly, and rounded to the result dtype. That double rounding gives the IEEE quotient of the
    float32 (or narrower) operands, since float64 has more than 2·24 + 2 significand bits. Other devices keep
    their compiler's division (MPS has no float64).
    """
    dtype = _quotient_dtype(a, b)
    if not isinstance(b, torch.Tensor):
        # At least float32: 65535 is Inf in float16 and 511 rounds to 512 in bfloat16.
        b = torch.full_like(a, b, dtype=torch.promote_types(dtype, torch.float32))
    if torch.compiler.is_compiling() and a.device.type in ("cpu", "cuda"):
        return (a.double() / b.double()).to(dtype)
    return (a / b).to(dtype)


def reciprocal(t: torch.Tensor) -> torch.Tensor:
    """1 / t, the IEEE quotient eagerly and under torch.compile (see `divide`)."""
    return divide(torch.ones_like(t), t) if torch.compiler.is_compiling() else torch.reciprocal(t)


def ste_input_grad(
    grad: torch.Tensor, x: torch.Tensor, low: torch.Tensor, high: torch.Tensor, eager: bool
) -> torch.Tensor:
    """`grad` where low <= x <= high (inclusive, on the unrounded input), 0 elsewhere.

    `eager` is what `eager()` said in the forward pass (outside torch.compile): only then may
    the bounds be read into Python numbers.
    """
    if eager and x.device.type == "cpu" and low.numel() == 1 and x.dtype == low.dtype:
        # One fused CPU kernel instead of comparisons and a select on bool tensors (about 20x slower here).
        # hardtanh's backward keeps the open interval (low, high): widen it by one ulp to include the ends.
        below = torch.nextafter(low, torch.full_like(low, -torch.inf)).item()
        above = torch.nextafter(high, torch.full_like(high, torch.inf)).item()
        return torch.ops.aten.hardtanh_backward(grad, x, below, above)
    if x.dtype in (torch.float16, torch.bfloat16):
        # A 0-dim (per-tensor) float32 bound would be rounded to the input's dtype for the comparison, passing the
        # gradient to inputs just beyond the range end: compare in float32, as the forward computes.
        x = x.float()
    return torch.where((x >= low) & (x <= high), grad, 0.0)


def _ste_input_grad_dense(grad: torch.Tensor, x: torch.Tensor, low: torch.Tensor, high: torch.Tensor
                          ) -> torch.Tensor:
    out = ste_input_grad(grad, x, low, high, eager=True)
    # The graph was built with the fake result's layout (grad's).
    return out if out.stride() == grad.stride() else torch.empty_like(grad).copy_(out)


# Compiled on the CPU, the straight-through gradient is this op, which inductor cannot look into: the backward
# then needs x itself, which the ReLU before a quantizer reads too, so the forward saves x. Written out, the
# partitioner saves the range mask and the ReLU's mask as bool tensors instead, and inductor's C++ code stores
# bool slowly (relu + fake-quant with a bool mask: 6.5 ms for 2M elements, 0.9 ms with a float mask, 0.2 ms
# without): `cnn7` STE compiled 1.46x-1.57x of float with them, 1.05x without. torch.library.custom_op is
# torch >= 2.4; before it the compiled CPU backward keeps the written-out form.
_opaque_ste_input_grad = None
if hasattr(torch.library, "custom_op"):
    _opaque_ste_input_grad = torch.library.custom_op("trainable_infra::ste_input_grad", mutates_args=())(
        _ste_input_grad_dense)

    @_opaque_ste_input_grad.register_fake
    def _(grad: torch.Tensor, x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(grad)


def eager() -> bool:
    """Whether the calling forward pass runs eagerly (not traced by torch.compile)."""
    return not torch.compiler.is_compiling()


class STEFakeQuantize(torch.autograd.Function):
    """Fake quantization whose input gradient is the clipped straight-through estimator.

    torch's fused kernels mask the gradient on the *rounded* input, which lets through inputs up to half a step
    beyond the range; DESIGN.md §4 passes the gradient exactly on [Δ·q_min, Δ·q_max] (uniform: [a', b']).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, delta: torch.Tensor, zero_point: torch.Tensor, low: torch.Tensor,
                high: torch.Tensor, axis: int | None, view: tuple[int, ...], q_min: int, q_max: int) -> torch.Tensor:
        ctx.triton = triton_kernels.applies(x) and triton_kernels.supported(x, axis)
        if ctx.triton:
            # The kernel's mask is [Δ·(q_min - z), Δ·(q_max - z)], the same float32 products as `low` and `high`.
            grid = triton_kernels.KernelGrid.given(delta, zero_point)
            out, mask, _ = triton_kernels.fake_quantize(x, grid, axis, q_min, q_max, with_mask=True)
            ctx.save_for_backward(mask)
            return out
        ctx.save_for_backward(x, low, high)
        ctx.eager = eager()
        return fake_quantize(x, delta, zero_point, axis, view, q_min, q_max)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        if ctx.triton:
            (mask,) = ctx.saved_tensors
            return triton_kernels.ste_backward(grad, mask), None, None, None, None, None, None, None, None
        x, low, high = ctx.saved_tensors
        if not ctx.eager and x.device.type == "cpu" and _opaque_ste_input_grad is not None:
            grad_x = _opaque_ste_input_grad(grad, x, low, high)
        else:
            grad_x = ste_input_grad(grad, x, low, high, ctx.eager)
        return grad_x, None, None, None, None, None, None, None, None
