"""Float models written here (no torchvision) for the model-level tests: small re-implementations of the
residual, inverted-residual, channel-shuffle, dense, inception, ConvNeXt, EfficientNet, ViT and Swin families."""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 - torch's own convention
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, channels: int, stride: int = 1):
        super().__init__()
        out = channels * stride
        self.conv1 = nn.Conv2d(channels, out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out)
        self.conv2 = nn.Conv2d(out, out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(channels, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))
            if stride != 1 else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class TinyResNet(nn.Module):
    """ResNet-style: stem, two basic blocks (one downsampling, with a 1x1 shortcut), pooled linear head."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = BasicBlock(8)
        self.layer2 = BasicBlock(8, stride=2)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class InvertedResidual(nn.Module):
    def __init__(self, channels: int, expand: int = 2):
        super().__init__()
        hidden = channels * expand
        self.expand = nn.Sequential(nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6())
        self.depthwise = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()
        )
        self.project = nn.Sequential(nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.depthwise(self.expand(x)))


class TinyMobileNet(nn.Module):
    """MobileNet-style: depthwise separable convolutions, an inverted residual, a concatenation of branches."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.block = InvertedResidual(8)
        self.branch_a = nn.Conv2d(8, 4, 1)
        self.branch_b = nn.Conv2d(8, 4, 3, padding=1)
        self.head = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(self.stem(x))
        x = torch.cat([F.relu(self.branch_a(x)), F.relu(self.branch_b(x))], dim=1)
        return self.head(x.mean(dim=(2, 3)))


class Untraceable(nn.Module):
    """Control flow on tensor values: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.conv(x))
        if y.mean() > 0:
            y = y + 1
        return self.fc(y.mean(dim=(2, 3)))


# Families of real architectures, written small (3x16x16 inputs, a few channels) the way torchvision writes them.


def hard_swish_conv(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out),
        nn.Hardswish(),
    )


class SqueezeExcitation(nn.Module):
    """Channel attention: global average pool -> 1x1 conv -> activation -> 1x1 conv -> gate, times the input."""

    def __init__(self, channels: int, squeezed: int, activation: type[nn.Module], gate: type[nn.Module]):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeezed, 1)
        self.fc2 = nn.Conv2d(squeezed, channels, 1)
        self.activation = activation()
        self.scale_activation = gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


class InvertedResidualSE(nn.Module):
    """MobileNetV3 block: 1x1 expand, depthwise 3x3, squeeze-excitation (hard sigmoid), 1x1 project, hard swish."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.expand = hard_swish_conv(channels, hidden, 1)
        self.depthwise = hard_swish_conv(hidden, hidden, 3, groups=hidden)
        self.se = SqueezeExcitation(hidden, 8, nn.ReLU, nn.Hardsigmoid)
        self.project = nn.Sequential(nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.se(self.depthwise(self.expand(x))))


class TinyMobileNetV3(nn.Module):
    """MobileNetV3-style: hard-swish stem, an inverted residual with SE, a classifier with dropout."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = hard_swish_conv(3, 16, 3, stride=2)
        self.block = InvertedResidualSE(16, 32)
        self.last = hard_swish_conv(16, 32, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(32, 32), nn.Hardswish(), nn.Dropout(0.2, inplace=True), nn.Linear(32, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.last(self.block(self.stem(x))))
        return self.classifier(torch.flatten(x, 1))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet's channel shuffle, as torchvision writes it (view, transpose, view)."""
    batchsize, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups
    x = x.view(batchsize, groups, channels_per_group, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batchsize, num_channels, height, width)


def conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1, relu: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit: split the channels (stride 1) or feed both branches (stride 2), concatenate, shuffle."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.stride = stride
        half = c_out // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                conv_bn(c_in, c_in, 3, stride, groups=c_in, relu=False), conv_bn(c_in, half, 1)
            )
        else:
            self.branch1 = nn.Sequential()
        branch_in = c_in if stride > 1 else half
        self.branch2 = nn.Sequential(
            conv_bn(branch_in, half, 1), conv_bn(half, half, 3, stride, groups=half, relu=False), conv_bn(half, half, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class TinyShuffleNet(nn.Module):
    """ShuffleNetV2-style: stem, max pool, a downsampling unit and a channel-split unit, 1x1 conv, linear head."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = conv_bn(3, 8, 3, stride=2)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.stage = nn.Sequential(ShuffleUnit(8, 16, 2), ShuffleUnit(16, 16, 1))
        self.conv5 = conv_bn(16, 32, 1)
        self.fc = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv5(self.stage(self.maxpool(self.conv1(x))))
        return self.fc(x.mean([2, 3]))


class DenseLayer(nn.Module):
    """DenseNet layer: concatenated features -> BN -> ReLU -> 1x1 -> BN -> ReLU -> 3x3, with functional dropout."""

    def __init__(self, c_in: int, growth: int, drop_rate: float):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, 2 * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(2 * growth)
        self.conv2 = nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False)
        self.drop_rate = drop_rate

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(features, 1)
        x = self.conv1(F.relu(self.norm1(x)))
        x = self.conv2(F.relu(self.norm2(x)))
        return F.dropout(x, p=self.drop_rate, training=self.training)


class TinyDenseNet(nn.Module):
    """DenseNet-style: a dense block (each layer reads the concatenation of all before it), a transition."""

    def __init__(self, classes: int = 10, growth: int = 4):
        super().__init__()
        self.conv0 = conv_bn(3, 8, 3, stride=2)
        self.denselayers = nn.ModuleList(DenseLayer(8 + i * growth, growth, drop_rate=0.1) for i in range(3))
        channels = 8 + 3 * growth
        self.transition = nn.Sequential(
            nn.BatchNorm2d(channels), nn.ReLU(), nn.Conv2d(channels, 8, 1, bias=False), nn.AvgPool2d(2)
        )
        self.norm5 = nn.BatchNorm2d(8)
        self.classifier = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [self.conv0(x)]
        for layer in self.denselayers:
            features.append(layer(features))
        x = F.relu(self.norm5(self.transition(torch.cat(features, 1))))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class BasicConv2d(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


class Inception(nn.Module):
    """GoogLeNet's inception module: 1x1, 1x1->3x3, 1x1->3x3->3x3 and maxpool->1x1 branches, concatenated."""

    def __init__(self, c_in: int, width: int):
        super().__init__()
        self.branch1 = BasicConv2d(c_in, width, 1)
        self.branch2 = nn.Sequential(BasicConv2d(c_in, width, 1), BasicConv2d(width, width, 3))
        self.branch3 = nn.Sequential(BasicConv2d(c_in, width, 1), BasicConv2d(width, width, 3),
                                     BasicConv2d(width, width, 3))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True), BasicConv2d(c_in, width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class TinyInception(nn.Module):
    """GoogLeNet-style: stem, two inception modules around a max pool, dropout and a linear head."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = BasicConv2d(3, 8, 3)
        self.inception3a = Inception(8, 4)
        self.maxpool = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception4a = Inception(16, 4)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inception4a(self.maxpool(self.inception3a(self.conv1(x))))
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))


def stochastic_depth(input: torch.Tensor, p: float, mode: str, training: bool = True) -> torch.Tensor:
    """Randomly zero whole residual branches ("row": per sample, "batch": all at once), as torchvision's op."""
    if p < 0.0 or p > 1.0:
        raise ValueError(f"drop probability has to be between 0 and 1, but got {p}")
    if mode not in ["batch", "row"]:
        raise ValueError(f"mode has to be either 'batch' or 'row', but got {mode}")
    if not training or p == 0.0:
        return input
    survival_rate = 1.0 - p
    size = [input.shape[0]] + [1] * (input.ndim - 1) if mode == "row" else [1] * input.ndim
    noise = torch.empty(size, dtype=input.dtype, device=input.device)
    noise = noise.bernoulli_(survival_rate)
    if survival_rate > 0.0:
        noise.div_(survival_rate)
    return input * noise


# As torchvision does: torch.fx records the call as one node, its `training` argument a constant of the trace.
torch.fx.wrap("stochastic_depth")


class StochasticDepth(nn.Module):
    def __init__(self, p: float, mode: str):
        super().__init__()
        self.p = p
        self.mode = mode

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return stochastic_depth(input, self.p, self.mode, self.training)


class Permute(nn.Module):
    def __init__(self, dims: list[int]):
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.permute(x, self.dims)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7, LayerNorm over channels (channels last), Linear-GELU-Linear, layer scale, stochastic depth."""

    def __init__(self, dim: int, layer_scale: float, sd_prob: float):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim),
            Permute([0, 2, 3, 1]),
            nn.LayerNorm(dim, eps=1e-6),
            nn.Linear(dim, 4 * dim),
            nn.GELU(),
            nn.Linear(4 * dim, dim),
            Permute([0, 3, 1, 2]),
        )
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1) * layer_scale)
        self.stochastic_depth = StochasticDepth(sd_prob, "row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.layer_scale * self.block(x)
        result = self.stochastic_depth(result)
        result += x
        return result


class TinyConvNeXt(nn.Module):
    """ConvNeXt-style: patchify stem with LayerNorm2d, two blocks, pooled LayerNorm + linear head."""

    def __init__(self, classes: int = 10, dim: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dim, 4, stride=4), LayerNorm2d(dim, eps=1e-6))
        self.stages = nn.Sequential(ConvNeXtBlock(dim, 0.1, 0.0), ConvNeXtBlock(dim, 0.1, 0.2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(LayerNorm2d(dim, eps=1e-6), nn.Flatten(1), nn.Linear(dim, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.stages(self.stem(x))))


def silu_conv(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out),
        nn.SiLU(inplace=True),
    )


class MBConv(nn.Module):
    """EfficientNet block: 1x1 expand, depthwise 3x3, SE (SiLU, sigmoid), 1x1 project, stochastic depth."""

    def __init__(self, channels: int, expand: int, sd_prob: float):
        super().__init__()
        hidden = channels * expand
        self.block = nn.Sequential(
            silu_conv(channels, hidden, 1),
            silu_conv(hidden, hidden, 3, groups=hidden),
            SqueezeExcitation(hidden, max(1, channels // 4), nn.SiLU, nn.Sigmoid),
            nn.Sequential(nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels)),
        )
        self.stochastic_depth = StochasticDepth(sd_prob, "row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.block(x)
        result = self.stochastic_depth(result)
        result += x
        return result


class TinyEfficientNet(nn.Module):
    """EfficientNet-style: SiLU stem, two MBConv blocks with stochastic depth, 1x1 head conv, functional dropout."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = silu_conv(3, 8, 3, stride=2)
        self.blocks = nn.Sequential(MBConv(8, 4, 0.2), MBConv(8, 4, 0.4))
        self.head = silu_conv(8, 32, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.head(self.blocks(self.stem(x)))), 1)
        return self.fc(F.dropout(x, 0.2, self.training))


class EncoderBlock(nn.Module):
    """Pre-norm transformer encoder block: LayerNorm, nn.MultiheadAttention, residual, LayerNorm, GELU MLP."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, dim), nn.Dropout(dropout)
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = self.ln_1(input)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = self.dropout(x) + input
        return x + self.mlp(self.ln_2(x))


class TinyViT(nn.Module):
    """ViT-style: 4x4 patch embedding conv, class token, position embedding, encoder blocks, head on the token."""

    def __init__(self, classes: int = 10, dim: int = 16, patch: int = 4, image: int = 16, depth: int = 2):
        super().__init__()
        self.patch = patch
        self.conv_proj = nn.Conv2d(3, dim, patch, stride=patch)
        tokens = (image // patch) ** 2 + 1
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.empty(1, tokens, dim).normal_(std=0.02))
        self.dropout = nn.Dropout(0.1)
        self.layers = nn.Sequential(*(EncoderBlock(dim, 2, 2 * dim, 0.1) for _ in range(depth)))
        self.ln = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.ln(self.layers(self.dropout(x + self.pos_embedding)))
        return self.head(x[:, 0])


class TinyCrossAttention(nn.Module):
    """Cross-attention with separate projections: queries of width 16, keys of width 8, values of width 12
    (nn.MultiheadAttention with kdim / vdim != embed_dim keeps q / k / v projection weights apart)."""

    def __init__(self, classes: int = 10, dim: int = 16):
        super().__init__()
        self.query_embed = nn.Conv2d(3, dim, 4, stride=4)
        self.key_embed = nn.Conv2d(3, 8, 4, stride=4)
        self.value_embed = nn.Conv2d(3, 12, 4, stride=4)
        self.attention = nn.MultiheadAttention(dim, 2, batch_first=True, kdim=8, vdim=12)
        self.ln = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.query_embed(x).flatten(2).transpose(1, 2)
        k = self.key_embed(x).flatten(2).transpose(1, 2)
        v = self.value_embed(x).flatten(2).transpose(1, 2)
        y, _ = self.attention(q, k, v, need_weights=False)
        y = y + q
        y = y + self.mlp(self.ln(y))
        return self.head(y.mean(dim=1))


def window_mask(resolution: int, window: int, shift: int) -> torch.Tensor:
    """Swin's attention mask for shifted windows: -100 between tokens that came from different regions."""
    regions = torch.zeros(resolution, resolution)
    bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    count = 0
    for h in bounds:
        for w in bounds:
            regions[h, w] = count
            count += 1
    windows = regions.view(resolution // window, window, resolution // window, window).permute(0, 2, 1, 3)
    windows = windows.reshape(-1, window * window)
    mask = windows.unsqueeze(1) - windows.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


class WindowAttention(nn.Module):
    """Swin's (shifted) window attention on (B, H, W, C): windows by view / permute, torch.roll for the shift,
    qkv and proj weights used through F.linear, q @ k^T plus a relative position bias gathered by an index buffer,
    an attention mask between shifted regions, softmax, attn @ v, windows merged back."""

    def __init__(self, dim: int, heads: int, window: int, shift: int, resolution: int):
        super().__init__()
        self.dim, self.heads, self.window, self.shift, self.resolution = dim, heads, window, shift, resolution
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
        relative[:, :, 0] *= 2 * window - 1
        self.register_buffer("relative_position_index", relative.sum(-1).flatten(), persistent=False)
        self.register_buffer("attn_mask", window_mask(resolution, window, shift) if shift else None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size, w, c, heads = self.resolution, self.window, self.dim, self.heads
        tokens = w * w
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        x = x.view(-1, size // w, w, size // w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, tokens, c)
        qkv = F.linear(x, self.qkv.weight, self.qkv.bias)
        qkv = qkv.reshape(-1, tokens, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index]
        attn = attn + bias.view(tokens, tokens, -1).permute(2, 0, 1).contiguous().unsqueeze(0)
        if self.attn_mask is not None:
            windows = self.attn_mask.shape[0]
            attn = attn.view(-1, windows, heads, tokens, tokens) + self.attn_mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, heads, tokens, tokens)
        attn = F.softmax(attn, dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(-1, tokens, c)
        x = F.linear(x, self.proj.weight, self.proj.bias)
        x = x.view(-1, size // w, size // w, w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, size, size, c)
        if self.shift:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        return x


class SwinBlock(nn.Module):
    def __init__(self, dim: int, heads: int, window: int, shift: int, resolution: int, sd_prob: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, window, shift, resolution)
        self.stochastic_depth = StochasticDepth(sd_prob, "row")
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(0.0), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.stochastic_depth(self.attn(self.norm1(x)))
        return x + self.stochastic_depth(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """Swin's downsampling: the four pixels of each 2x2 cell side by side in channels, LayerNorm, linear."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :], x[..., 0::2, 1::2, :], x[..., 1::2, 1::2, :]], -1)
        return self.reduction(self.norm(x))


class TinySwin(nn.Module):
    """Swin-style: 2x2 patch embedding to an 8x8 grid, a regular and a shifted window block (4x4 windows),
    patch merging, LayerNorm, pooled linear head."""

    def __init__(self, classes: int = 10, dim: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, dim, 2, stride=2), Permute([0, 2, 3, 1]), nn.LayerNorm(dim),
            SwinBlock(dim, 2, 4, 0, 8, 0.1), SwinBlock(dim, 2, 4, 2, 8, 0.2), PatchMerging(dim),
        )
        self.norm = nn.LayerNorm(2 * dim)
        self.head = nn.Linear(2 * dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.features(x))
        return self.head(x.mean(dim=(1, 2)))


class SDPABlock(nn.Module):
    """Attention through F.scaled_dot_product_attention, with attention dropout only while training."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, dim = x.shape[1], x.shape[2]
        q, k, v = self.qkv(self.norm(x)).split(dim, dim=2)
        q, k, v = (t.view(-1, tokens, self.heads, dim // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(-1, tokens, dim))
        return x + self.mlp(self.norm2(x))


class TinySDPATransformer(nn.Module):
    """A causal transformer over the rows of the image: a linear embedding of each row, two SDPA blocks."""

    def __init__(self, classes: int = 10, dim: int = 16):
        super().__init__()
        self.embed = nn.Linear(3 * 16, dim)
        self.blocks = nn.Sequential(SDPABlock(dim, 2, 0.1), SDPABlock(dim, 2, 0.1))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x.permute(0, 2, 1, 3).flatten(2))
        return self.head(self.norm(self.blocks(x))[:, -1])
