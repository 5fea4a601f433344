"""Vision models of the zoo: Wide ResNet, ResNet, VGG and ViT in plain PyTorch.

Every model traces with ``torch.fx.symbolic_trace`` with the ``torch.nn`` layers as
leaves: ``forward`` branches only on attributes fixed at construction, never on tensors.
The full-size models match the published parameter counts exactly; the ``tiny`` ones are
small enough for fast tests.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, Sequence, Union

import torch
from torch import nn

from autopipe.models.spec import ModelSpec, image_inputs


def _norm2d(norm: str, channels: int) -> nn.Module:
    """``"batch"``: BatchNorm2d. ``"group"``: GroupNorm with ``gcd(32, channels)`` groups,
    that is 32 groups wherever the width is a multiple of 32 and fewer otherwise (16 for
    the 16-channel stem of a Wide ResNet)."""
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    raise ValueError(f"unknown norm {norm!r}, expected 'batch' or 'group'")


def _init_conv_net(model: nn.Module) -> None:
    """He initialisation for convolutions, unit scale for norms, zero biases."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# Wide ResNet (Zagoruyko & Komodakis, 2016), CIFAR variant.


class WideBasicBlock(nn.Module):
    """Pre-activation basic block: norm-ReLU-conv3x3, norm-ReLU-dropout-conv3x3, plus a
    shortcut. When the shape changes the shortcut is a 1x1 convolution of the activated
    input, as in the reference implementation."""

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        drop_rate: float = 0.0,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        self.in_planes = in_planes
        self.planes = planes
        self.stride = stride
        self.drop_rate = drop_rate
        self.norm = norm
        self.bn1 = _norm2d(norm, in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = _norm2d(norm, planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(x))
        identity = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.dropout(self.relu2(self.bn2(out))))
        return out + identity


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor`` for 32x32 images: a 16-channel stem, three groups of
    ``(depth - 4) / 6`` blocks of widths 16k, 32k, 64k, a final norm-ReLU, global average
    pooling and a linear classifier."""

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        num_classes: int,
        drop_rate: float = 0.0,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"depth must be 6n + 4, got {depth}")
        self.depth = depth
        self.widen_factor = widen_factor
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.norm = norm
        blocks = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.layer1 = self._make_layer(widths[0], widths[1], blocks, 1)
        self.layer2 = self._make_layer(widths[1], widths[2], blocks, 2)
        self.layer3 = self._make_layer(widths[2], widths[3], blocks, 2)
        self.bn1 = _norm2d(norm, widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(widths[3], num_classes)
        _init_conv_net(self)
        nn.init.zeros_(self.fc.bias)

    def _make_layer(self, in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            *(
                WideBasicBlock(
                    in_planes if i == 0 else planes,
                    planes,
                    stride if i == 0 else 1,
                    self.drop_rate,
                    self.norm,
                )
                for i in range(blocks)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu(self.bn1(x))
        return self.fc(self.flatten(self.avgpool(x)))


# ResNet v1.5 (He et al., 2016; stride in the 3x3 convolution of the bottleneck).


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand, each followed by BatchNorm;
    ReLU after the first two and after the residual sum."""

    expansion = 4

    def __init__(
        self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.in_planes = in_planes
        self.planes = planes
        self.stride = stride
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ImageNet bottleneck ResNet: 7x7 stem and max pool, four stages of ``layers[i]``
    blocks of ``width * 2**i`` planes, global average pooling and a linear classifier."""

    def __init__(self, layers: Sequence[int], num_classes: int = 1000, width: int = 64) -> None:
        super().__init__()
        self.layers = tuple(layers)
        self.num_classes = num_classes
        self.width = width
        self.in_planes = width
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(width, layers[0], 1)
        self.layer2 = self._make_layer(width * 2, layers[1], 2)
        self.layer3 = self._make_layer(width * 4, layers[2], 2)
        self.layer4 = self._make_layer(width * 8, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(width * 8 * Bottleneck.expansion, num_classes)
        _init_conv_net(self)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        out_planes = planes * Bottleneck.expansion
        downsample = None
        if stride != 1 or self.in_planes != out_planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.in_planes, out_planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )
        layers = [Bottleneck(self.in_planes, planes, stride, downsample)]
        self.in_planes = out_planes
        layers += [Bottleneck(out_planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.flatten(self.avgpool(x)))


# VGG with batch normalisation (Simonyan & Zisserman, 2015).

VGG16_CFG: tuple[Union[int, str], ...] = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    "M",
)


class VGG(nn.Module):
    """``features``: conv3x3-BN-ReLU for each width in ``cfg``, 2x2 max pool for each
    ``"M"``; then adaptive average pooling to ``pool_size`` and a three-layer classifier
    with dropout."""

    def __init__(
        self,
        cfg: Sequence[Union[int, str]],
        num_classes: int = 1000,
        hidden_dim: int = 4096,
        pool_size: int = 7,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.cfg = tuple(cfg)
        self.num_classes = num_classes
        self.hidden_dim = hidden_dim
        self.pool_size = pool_size
        self.dropout = dropout
        layers: list[nn.Module] = []
        channels = 3
        for v in self.cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, stride=2))
            else:
                layers += [
                    nn.Conv2d(channels, v, 3, padding=1),
                    nn.BatchNorm2d(v),
                    nn.ReLU(inplace=True),
                ]
                channels = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(pool_size)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Sequential(
            nn.Linear(channels * pool_size * pool_size, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, num_classes),
        )
        _init_conv_net(self)
        for m in self.classifier:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(self.avgpool(self.features(x)))
        return self.classifier(x)


# Vision Transformer (Dosovitskiy et al., 2021).


class SelfAttention(nn.Module):
    """Multi-head self-attention written out: one ``in_proj`` for q, k and v, softmax
    attention with dropout on the weights, ``out_proj``. Same parameters as
    ``nn.MultiheadAttention``, but every step is a node of the traced graph."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scale = self.head_dim**-0.5
        self.in_proj = nn.Linear(embed_dim, 3 * embed_dim)
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj.weight)
        nn.init.zeros_(self.in_proj.bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        qkv = self.in_proj(x).reshape(batch, -1, 3, self.num_heads, self.head_dim)
        qkv = qkv.permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = self.dropout(attn.softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(batch, -1, self.embed_dim)
        return self.out_proj(out)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(
        self,
        num_heads: int,
        hidden_dim: int,
        mlp_dim: int,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.hidden_dim = hidden_dim
        self.mlp_dim = mlp_dim
        self.ln_1 = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.self_attention = SelfAttention(hidden_dim, num_heads, attention_dropout)
        self.dropout = nn.Dropout(dropout)
        self.ln_2 = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_dim, mlp_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(mlp_dim, hidden_dim),
            nn.Dropout(dropout),
        )
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.normal_(m.bias, std=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.self_attention(self.ln_1(x)))
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    """Adds the learned position embedding, then runs the blocks and a final LayerNorm."""

    def __init__(
        self,
        seq_length: int,
        num_layers: int,
        num_heads: int,
        hidden_dim: int,
        mlp_dim: int,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.seq_length = seq_length
        self.num_layers = num_layers
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_length, hidden_dim))
        nn.init.normal_(self.pos_embedding, std=0.02)
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.Sequential(
            *(
                EncoderBlock(num_heads, hidden_dim, mlp_dim, dropout, attention_dropout)
                for _ in range(num_layers)
            )
        )
        self.ln = nn.LayerNorm(hidden_dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x + self.pos_embedding)
        return self.ln(self.layers(x))


class VisionTransformer(nn.Module):
    """ViT: non-overlapping patches embedded by a strided convolution, a class token
    prepended, the encoder, and a linear head on the class token."""

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        num_layers: int,
        num_heads: int,
        hidden_dim: int,
        mlp_dim: int,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        if image_size % patch_size != 0:
            raise ValueError(f"image_size {image_size} is not a multiple of patch {patch_size}")
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.hidden_dim = hidden_dim
        self.mlp_dim = mlp_dim
        self.dropout = dropout
        self.attention_dropout = attention_dropout
        self.num_classes = num_classes
        self.conv_proj = nn.Conv2d(3, hidden_dim, patch_size, stride=patch_size)
        self.class_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        seq_length = (image_size // patch_size) ** 2 + 1
        self.encoder = Encoder(
            seq_length, num_layers, num_heads, hidden_dim, mlp_dim, dropout, attention_dropout
        )
        self.heads = nn.Sequential()
        self.heads.add_module("head", nn.Linear(hidden_dim, num_classes))
        fan_in = 3 * patch_size * patch_size
        nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1 / fan_in))
        nn.init.zeros_(self.conv_proj.bias)
        # Zero head, as in the paper and its reference code.
        nn.init.zeros_(self.heads.head.weight)
        nn.init.zeros_(self.heads.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.encoder(x)
        return self.heads(x[:, 0])


def _spec(
    build: Callable[[], nn.Module], default_size: int, published: int | None, description: str
) -> ModelSpec:
    """A zoo entry fed with normal-noise RGB images."""
    return ModelSpec(build, image_inputs(), default_size, published, description)


MODELS: dict[str, ModelSpec] = {
    "wrn_16x4_c10": _spec(partial(WideResNet, 16, 4, 10), 32, 2_748_890, "WRN-16-4, CIFAR-10"),
    "wrn_16x4_c100": _spec(partial(WideResNet, 16, 4, 100), 32, None, "WRN-16-4, CIFAR-100"),
    "wrn_28x10_c10": _spec(partial(WideResNet, 28, 10, 10), 32, 36_479_194, "WRN-28-10, CIFAR-10"),
    "wrn_28x10_c100": _spec(
        partial(WideResNet, 28, 10, 100), 32, 36_536_884, "WRN-28-10, CIFAR-100"
    ),
    "wrn_28x10_c100_dr03": _spec(
        partial(WideResNet, 28, 10, 100, drop_rate=0.3),
        32,
        36_536_884,
        "WRN-28-10, CIFAR-100, dropout 0.3 between the convolutions of each block",
    ),
    "wrn_28x10_c100_dr03_gn": _spec(
        partial(WideResNet, 28, 10, 100, drop_rate=0.3, norm="group"),
        32,
        36_536_884,
        "WRN-28-10, CIFAR-100, dropout 0.3, GroupNorm (gcd(32, C) groups) for BatchNorm",
    ),
    "resnet50": _spec(partial(ResNet, (3, 4, 6, 3)), 224, 25_557_032, "ResNet-50 v1.5, ImageNet"),
    "resnet101": _spec(
        partial(ResNet, (3, 4, 23, 3)), 224, 44_549_160, "ResNet-101 v1.5, ImageNet"
    ),
    "vgg16_bn": _spec(partial(VGG, VGG16_CFG), 224, 138_365_992, "VGG-16 with BatchNorm, ImageNet"),
    "vit_b_16": _spec(
        partial(VisionTransformer, 224, 16, 12, 12, 768, 3072),
        224,
        86_567_656,
        "ViT-B/16, ImageNet, 224 crop",
    ),
    "resnet_tiny": _spec(
        partial(ResNet, (1, 1, 1, 1), num_classes=10, width=8),
        32,
        None,
        "bottleneck ResNet, one block per stage, base width 8",
    ),
    "vgg_tiny": _spec(
        partial(VGG, (8, "M", 16, "M", 32, "M"), num_classes=10, hidden_dim=64, pool_size=2),
        32,
        None,
        "VGG-style, three conv-BN-ReLU stages, 64-wide classifier",
    ),
    "vit_tiny": _spec(
        partial(VisionTransformer, 32, 8, 2, 4, 64, 128, num_classes=10),
        32,
        None,
        "ViT, patch 8, hidden 64, MLP 128, 2 layers, 4 heads",
    ),
}
