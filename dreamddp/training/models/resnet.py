"""ResNet-18 / ResNet-50 for small images.

The stem is a stride-1 3x3 convolution with no max-pool: the image task uses
8x8 digits, and the ImageNet stem (7x7 stride 2 + pool) would shrink those to
nothing before ``layer1``.  With this stem an 8x8 input reaches ``layer4`` as
1x1.  BatchNorm is used throughout because its running statistics are buffers
the synchronisation code has to handle, which is worth exercising.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dreamddp.training.models.common import require_positive_ints

_STAGES: dict[int, list[int]] = {18: [2, 2, 2, 2], 50: [3, 4, 6, 3]}


@dataclass
class ResNetConfig:
    """Hyper-parameters of :class:`ResNet`; ``width`` scales every channel count (64 = standard)."""

    depth: int = 18
    num_classes: int = 10
    in_channels: int = 1
    width: int = 64

    def __post_init__(self) -> None:
        require_positive_ints(self, ("depth", "num_classes", "in_channels", "width"))
        if self.depth not in _STAGES:
            raise ValueError(f"ResNetConfig.depth must be 18 or 50, got {self.depth!r}")


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    # No bias: every conv is followed by BatchNorm, which has its own shift.
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)


def _shortcut(c_in: int, c_out: int, stride: int) -> nn.Module:
    """Identity when shapes match, else a strided 1x1 conv + BN projection."""
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(c_out))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(c_in, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(c_in, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4) with a residual connection (ResNet-50+)."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        c_out = planes * self.expansion
        self.conv1 = nn.Conv2d(c_in, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, c_out, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(c_in, c_out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Image classifier returning logits ``[B, num_classes]`` for ``[B, C, H, W]`` inputs."""

    def __init__(self, config: ResNetConfig) -> None:
        super().__init__()
        self.config = config
        block: type[BasicBlock] | type[Bottleneck] = BasicBlock if config.depth == 18 else Bottleneck
        w = config.width
        self.conv1 = _conv3x3(config.in_channels, w)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        c_in = w
        stages = []
        for i, n_blocks in enumerate(_STAGES[config.depth]):
            planes = w * 2**i
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n_blocks):
                blocks.append(block(c_in, planes, stride if j == 0 else 1))
                c_in = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, config.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """Kaiming init for convs; zero the last BN of each residual branch.

        Zero-initialised residual branches make every block start as the
        identity, which trains more stably at the large effective batch sizes
        of data-parallel runs.
        """
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)
            elif isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"ResNet expects [B, {self.config.in_channels}, H, W] inputs, got {tuple(x.shape)}")
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))
