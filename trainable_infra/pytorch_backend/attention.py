"""`nn.MultiheadAttention` written as its linear maps and products, so that each of them can be quantized.

`nn.MultiheadAttention` keeps its input projection as one packed parameter and runs everything inside
`F.multi_head_attention_forward`: neither its weights nor its two activation products are visible to a graph.
`QuantizableMultiheadAttention` computes the same function from four `nn.Linear` layers and explicit products,
which `quantize_model` then quantizes like any other layer (weights) and product (inputs).
"""

from __future__ import annotations

import math
import operator
import warnings

import torch
import torch.nn.functional as F  # noqa: N812 - torch's own convention
from torch import fx, nn


def batch_first(tensor: torch.Tensor, batch_first: bool) -> torch.Tensor:
    """A (L, N, E) input as (N, L, E); batch-first and unbatched (L, E) inputs as they are."""
    return tensor if batch_first or tensor.dim() < 3 else tensor.transpose(0, 1)


def _masked_scores(
    scores: torch.Tensor, attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None
) -> torch.Tensor:
    """Attention scores (..., heads, L, S) with `nn.MultiheadAttention`'s masks applied (boolean: True is masked
    out; float: added)."""
    if attn_mask is not None:
        if attn_mask.dim() == 3:  # (N * heads, L, S)
            attn_mask = attn_mask.view(scores.shape)
        scores = scores.masked_fill(attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    if key_padding_mask is not None:  # (N, S) or (S,)
        key_padding_mask = key_padding_mask.unsqueeze(-2).unsqueeze(-2)
        if key_padding_mask.dtype == torch.bool:
            scores = scores.masked_fill(key_padding_mask, float("-inf"))
        else:
            scores = scores + key_padding_mask
    return scores


def sdpa_scale(query: torch.Tensor, scale: float | None) -> float:
    """The scale `F.scaled_dot_product_attention` applies to q @ k^T: `scale`, or 1 / sqrt(head dim)."""
    return scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])


def sdpa_masked_scores(scores: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
    """Scores with `F.scaled_dot_product_attention`'s masks applied (boolean: True takes part; float: added)."""
    if is_causal:
        causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return scores


def attention_dropout(probabilities: torch.Tensor, p: float) -> torch.Tensor:
    """`F.scaled_dot_product_attention`'s dropout of the attention probabilities (none at p = 0, the eval value)."""
    return F.dropout(probabilities, p, training=True) if p > 0.0 else probabilities


# Shape-dependent code: each is one node of the traced graph.
fx.wrap("batch_first")
fx.wrap("_masked_scores")
_SDPA_PARAMETERS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def decompose_sdpa(gm: fx.GraphModule) -> int:
    """Replace, in place, each `F.scaled_dot_product_attention` node of `gm` by its two products and softmax, as
    torch's reference computes them ((q @ k^T)·scale, masks, softmax, dropout, @ v), so that the probabilities
    can be quantized too; returns how many were replaced. Calls with `enable_gqa=True` are left whole."""
    replaced = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not F.scaled_dot_product_attention:
            continue
        bound = dict(zip(_SDPA_PARAMETERS, node.args, strict=False))
        if set(bound) & set(node.kwargs) or set(node.kwargs) - set(_SDPA_PARAMETERS):
            continue
        bound = {**_SDPA_DEFAULTS, **bound, **node.kwargs}
        if bound["enable_gqa"] is not False or isinstance(bound["is_causal"], fx.Node):
            continue
        graph = gm.graph
        with graph.inserting_before(node):
            key_t = graph.call_method("transpose", (bound["key"], -2, -1))
            scores = graph.call_function(operator.matmul, (bound["query"], key_t))
            scale = graph.call_function(sdpa_scale, (bound["query"], bound["scale"]))
            scores = graph.call_function(operator.mul, (scores, scale))
            if bound["attn_mask"] is not None or bound["is_causal"]:
                scores = graph.call_function(sdpa_masked_scores, (scores, bound["attn_mask"], bound["is_causal"]))
            probabilities = graph.call_function(torch.softmax, (scores, -1))
            if bound["dropout_p"] != 0.0:
                probabilities = graph.call_function(attention_dropout, (probabilities, bound["dropout_p"]))
            output = graph.call_function(operator.matmul, (probabilities, bound["value"]))
        for new in (key_t, scores, output):
            new.meta["nn_module_stack"] = node.meta.get("nn_module_stack")
        node.replace_all_uses_with(output)
        graph.erase_node(node)
        replaced += 1
    if replaced:
        gm.recompile()
    return replaced


fx.wrap("sdpa_scale")
fx.wrap("sdpa_masked_scores")
fx.wrap("attention_dropout")


class QuantizableMultiheadAttention(nn.Module):
    """Multi-head attention as `q_proj`, `k_proj`, `v_proj`, `out_proj` (`nn.Linear`) and two products.

    Computes what `nn.MultiheadAttention` computes (up to float rounding: the products are separate operations),
    with the same call signature and outputs. Build it with `from_float`.
    """

    def __init__(
        self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True, kdim: int | None = None,
        vdim: int | None = None, batch_first: bool = False, device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(kdim or embed_dim, embed_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(vdim or embed_dim, embed_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)

    @classmethod
    def from_float(cls, mha: nn.MultiheadAttention) -> QuantizableMultiheadAttention | None:
        """The same attention as `mha` (weights copied, its mode kept), or None where `mha` uses `add_bias_kv` or
        `add_zero_attn`, which this form does not compute."""
        if mha.bias_k is not None or mha.add_zero_attn:
            return None
        reference = mha.out_proj.weight
        new = cls(mha.embed_dim, mha.num_heads, mha.dropout, mha.in_proj_bias is not None, mha.kdim, mha.vdim,
                  mha.batch_first, reference.device, reference.dtype)
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.chunk(3)
            trainable = [mha.in_proj_weight.requires_grad] * 3
        else:
            weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
            trainable = [w.requires_grad for w in weights]
        biases = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None)
        with torch.no_grad():
            for layer, weight, bias, grad in zip((new.q_proj, new.k_proj, new.v_proj), weights, biases, trainable,
                                                 strict=True):
                layer.weight.copy_(weight)
                layer.weight.requires_grad_(grad)
                if bias is not None:
                    layer.bias.copy_(bias)
                    layer.bias.requires_grad_(mha.in_proj_bias.requires_grad)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            new.out_proj.weight.requires_grad_(mha.out_proj.weight.requires_grad)
            if mha.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
                new.out_proj.bias.requires_grad_(mha.out_proj.bias.requires_grad)
        return new.train(mha.training)

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True, attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As `nn.MultiheadAttention.forward` (`is_causal` is a hint there too: the causal mask is `attn_mask`)."""
        query = batch_first(query, self.batch_first)
        key = batch_first(key, self.batch_first)
        value = batch_first(value, self.batch_first)
        heads = (self.num_heads, self.head_dim)
        # (..., L, E) -> (..., heads, L, head_dim)
        q = self.q_proj(query).unflatten(-1, heads).transpose(-3, -2)
        k = self.k_proj(key).unflatten(-1, heads).transpose(-3, -2)
        v = self.v_proj(value).unflatten(-1, heads).transpose(-3, -2)
        scores = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)
        if attn_mask is not None or key_padding_mask is not None:
            scores = _masked_scores(scores, attn_mask, key_padding_mask)
        attn = torch.softmax(scores, dim=-1)
        if self.dropout > 0.0:
            attn = F.dropout(attn, self.dropout, self.training)
        output = self.out_proj((attn @ v).transpose(-3, -2).flatten(-2))
        output = batch_first(output, self.batch_first)
        if not need_weights:
            return output, None
        return output, attn.mean(dim=-3) if average_attn_weights else attn

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"


def decompose_attention(model: nn.Module) -> list[str]:
    """Replace, in place, each `nn.MultiheadAttention` of `model` by a `QuantizableMultiheadAttention`; returns the
    names of those left as they are (with a warning: their weights stay float)."""
    kept = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.MultiheadAttention) or not name:
            continue
        new = QuantizableMultiheadAttention.from_float(module)
        if new is None:
            kept.append(name)
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    if kept:
        warnings.warn(
            f"nn.MultiheadAttention {kept} use add_bias_kv or add_zero_attn: their weights and products stay float",
            stacklevel=3,
        )
    return kept
