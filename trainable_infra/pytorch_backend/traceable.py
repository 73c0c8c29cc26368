"""Traceable forms of library modules whose forward is one opaque function in a `torch.fx` graph.

torchvision's Swin attention runs `shifted_window_attention`, which torchvision registers with `torch.fx.wrap`
because its padding and shift decisions depend on the input's size: traced, the whole attention (two linear maps,
two products) is one node whose weights and products cannot be quantized. `traceable_forwards` gives such modules,
while the model is traced, a forward that computes the same function with the size-dependent steps as opaque
helpers and the linear maps and products as graph nodes.
"""

from __future__ import annotations

import contextlib
import math
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F  # noqa: N812 - torch's own convention
from torch import fx, nn


def _geometry(input: torch.Tensor, window_size: list[int], shift_size: list[int]) -> tuple[int, int, list[int]]:
    """(padded height, padded width, shift) of a (B, H, W, C) input; no shift where a window covers the map."""
    _, height, width, _ = input.shape
    pad_h = height + (window_size[0] - height % window_size[0]) % window_size[0]
    pad_w = width + (window_size[1] - width % window_size[1]) % window_size[1]
    shift = [0 if window_size[0] >= pad_h else shift_size[0], 0 if window_size[1] >= pad_w else shift_size[1]]
    return pad_h, pad_w, shift


def window_partition(input: torch.Tensor, window_size: list[int], shift_size: list[int]) -> torch.Tensor:
    """(B, H, W, C) -> (B * windows, window tokens, C): padded with zeros, shifted, split into windows."""
    batch, height, width, channels = input.shape
    pad_h, pad_w, shift = _geometry(input, window_size, shift_size)
    x = F.pad(input, (0, 0, 0, pad_w - width, 0, pad_h - height))
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    x = x.view(batch, pad_h // window_size[0], window_size[0], pad_w // window_size[1], window_size[1], channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size[0] * window_size[1], channels)


def window_merge(x: torch.Tensor, input: torch.Tensor, window_size: list[int], shift_size: list[int]) -> torch.Tensor:
    """The inverse of `window_partition` for windows `x` of `input`'s shape."""
    batch, height, width, _ = input.shape
    pad_h, pad_w, shift = _geometry(input, window_size, shift_size)
    channels = x.shape[-1]
    x = x.view(batch, pad_h // window_size[0], pad_w // window_size[1], window_size[0], window_size[1], channels)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch, pad_h, pad_w, channels)
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    return x[:, :height, :width, :].contiguous()


def shift_mask(attn: torch.Tensor, input: torch.Tensor, window_size: list[int], shift_size: list[int]) -> torch.Tensor:
    """Attention scores (B * windows, heads, tokens, tokens) with the shifted windows' mask added (as they are
    where the windows are not shifted)."""
    pad_h, pad_w, shift = _geometry(input, window_size, shift_size)
    if sum(shift) == 0:
        return attn
    mask = attn.new_zeros((pad_h, pad_w))
    h_slices = ((0, -window_size[0]), (-window_size[0], -shift[0]), (-shift[0], None))
    w_slices = ((0, -window_size[1]), (-window_size[1], -shift[1]), (-shift[1], None))
    count = 0
    for h in h_slices:
        for w in w_slices:
            mask[h[0]:h[1], w[0]:w[1]] = count
            count += 1
    windows = (pad_h // window_size[0]) * (pad_w // window_size[1])
    mask = mask.view(pad_h // window_size[0], window_size[0], pad_w // window_size[1], window_size[1])
    mask = mask.permute(0, 2, 1, 3).reshape(windows, window_size[0] * window_size[1])
    mask = mask.unsqueeze(1) - mask.unsqueeze(2)
    mask = mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
    heads, tokens = attn.shape[1], attn.shape[2]
    attn = attn.view(attn.shape[0] // windows, windows, heads, tokens, tokens) + mask.unsqueeze(1).unsqueeze(0)
    return attn.view(-1, heads, tokens, tokens)


def _v2_qkv_bias(qkv_bias: torch.Tensor) -> torch.Tensor:
    """Swin V2's qkv bias: the key part is zero."""
    bias = qkv_bias.clone()
    length = bias.numel() // 3
    bias[length:2 * length].zero_()
    return bias


fx.wrap("window_partition")
fx.wrap("window_merge")
fx.wrap("shift_mask")
fx.wrap("_v2_qkv_bias")


def shifted_window_attention(
    input: torch.Tensor, qkv_weight: torch.Tensor, proj_weight: torch.Tensor, relative_position_bias: torch.Tensor,
    window_size: list[int], num_heads: int, head_dim: int, shift_size: list[int], attention_dropout: float = 0.0,
    dropout: float = 0.0, qkv_bias: torch.Tensor | None = None, proj_bias: torch.Tensor | None = None,
    logit_scale: torch.Tensor | None = None, training: bool = True,
) -> torch.Tensor:
    """torchvision's `shifted_window_attention` (same operations in the same order), traceable by `torch.fx`."""
    x = window_partition(input, window_size, shift_size)
    if logit_scale is not None and qkv_bias is not None:
        qkv_bias = _v2_qkv_bias(qkv_bias)
    qkv = F.linear(x, qkv_weight, qkv_bias).unflatten(-1, (3, num_heads, head_dim)).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:  # cosine attention
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * head_dim**-0.5).matmul(k.transpose(-2, -1))
    attn = shift_mask(attn + relative_position_bias, input, window_size, shift_size)
    attn = F.dropout(F.softmax(attn, dim=-1), p=attention_dropout, training=training)
    x = attn.matmul(v).transpose(1, 2).flatten(2)
    x = F.dropout(F.linear(x, proj_weight, proj_bias), p=dropout, training=training)
    return window_merge(x, input, window_size, shift_size)


def _swin_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return shifted_window_attention(
        x, self.qkv.weight, self.proj.weight, self.get_relative_position_bias(), self.window_size, self.num_heads,
        self.qkv.in_features // self.num_heads, self.shift_size, self.attention_dropout, self.dropout,
        self.qkv.bias, self.proj.bias, getattr(self, "logit_scale", None), self.training,
    )


# Classes (by module and name, so that the library does not import torchvision) -> their traceable forward.
TRACEABLE_FORWARDS = {
    ("torchvision.models.swin_transformer", "ShiftedWindowAttention"): _swin_forward,
    ("torchvision.models.swin_transformer", "ShiftedWindowAttentionV2"): _swin_forward,
}


@contextlib.contextmanager
def traceable_forwards(model: nn.Module) -> Iterator[None]:
    """Within the block, the modules of `model` listed in `TRACEABLE_FORWARDS` run their traceable forward."""
    patched = []
    for module in model.modules():
        forward = TRACEABLE_FORWARDS.get((type(module).__module__, type(module).__name__))
        if forward is not None and "forward" not in module.__dict__:
            module.forward = types.MethodType(forward, module)
            patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward
