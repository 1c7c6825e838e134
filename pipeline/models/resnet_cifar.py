"""CIFAR ResNet-32 trunk as SHIKE's released code builds it (SHIKE.md §1.1).

    stem    3x3 conv 3->16, BN, ReLU                       16 x 32 x 32
    layer1  5 BasicBlocks, 16 ch                    -> f_1  16 x 32 x 32   (shared)
    layer2  5 BasicBlocks, 32 ch, first stride 2    -> f_2  32 x 16 x 16   (shared)
    layer3  5 BasicBlocks, 64 ch, first stride 2    -> d_m  64 x  8 x  8   (one per expert)

Shortcuts are "option B" (1x1 strided conv + BN) wherever the shape changes, unlike the
zero-padding option A of the LDAM/RIDE/SADE ResNet-32.
"""

from __future__ import annotations

from torch import Tensor, nn

from pipeline.models.shike import ShikeNet, Trunk

BLOCKS_PER_STAGE = 5  # ResNet-32 = 6 * 5 + 2


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus shortcut, then ReLU."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            # Option B projection: 1x1 strided conv + BN.
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def make_stage(
    in_channels: int, channels: int, stride: int, blocks: int = BLOCKS_PER_STAGE
) -> nn.Sequential:
    """`blocks` BasicBlocks; only the first one changes stride/width."""
    layers = [BasicBlock(in_channels, channels, stride)]
    layers += [BasicBlock(channels, channels, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def cifar_resnet32_trunk() -> Trunk:
    stem = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(inplace=True),
    )
    return Trunk(
        stem=stem,
        shared=[make_stage(16, 16, 1), make_stage(16, 32, 2)],
        shared_channels=[16, 32],
        make_deep=lambda: make_stage(32, 64, 2),
        deep_channels=64,
    )


def shike_resnet32(
    num_classes: int,
    num_experts: int = 3,
    expert_sources: list[int] | None = None,
    dkf: bool = True,
    fusion: str = "product",
    adapter_relu: str = "code",
    head: str = "cosine",
    cosine_scale: float = 30.0,
) -> ShikeNet:
    """The paper's CIFAR network: 1,277,008 parameters at 100 classes with the defaults."""
    return ShikeNet(
        cifar_resnet32_trunk(),
        num_classes,
        num_experts=num_experts,
        expert_sources=expert_sources,
        dkf=dkf,
        fusion=fusion,
        adapter_relu=adapter_relu,
        head=head,
        cosine_scale=cosine_scale,
        kaiming_convs=True,
    )


def resnet32(num_classes: int, head: str = "cosine", cosine_scale: float = 30.0) -> ShikeNet:
    """Single-expert baseline: the same trunk with one layer3, no adapter (M = 1).

    Built as a one-expert ShikeNet so the stage-2 head switch works identically.
    """
    return ShikeNet(
        cifar_resnet32_trunk(),
        num_classes,
        num_experts=1,
        dkf=False,
        head=head,
        cosine_scale=cosine_scale,
        kaiming_convs=True,
    )
