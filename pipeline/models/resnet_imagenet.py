"""4-stage SHIKE on torchvision ResNets (SHIKE.md §1.5; the authors never released this).

    stem    conv1, bn1, relu, maxpool
    layer1  -> f_1  256 ch, H/4     (shared)
    layer2  -> f_2  512 ch, H/8     (shared)
    layer3  -> f_3 1024 ch, H/16    (shared)
    layer4  -> d_m 2048 ch, H/32    (one copy per expert)

Expert m's adapter reads f_{src(m)}, default src = [1, 2, 3] (cycling for M > 3), through
3 - src + 1 stride-2 units: 256 -> 512 -> 1024 -> 2048. Weights are never downloaded.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torchvision
from torch import nn

from pipeline.models.shike import ShikeNet, Trunk

_BACKBONES: dict[str, Callable[..., torchvision.models.ResNet]] = {
    "resnet50": torchvision.models.resnet50,
    "resnext50": torchvision.models.resnext50_32x4d,
    "resnet152": torchvision.models.resnet152,
}


def _reinit_like_torchvision(module: nn.Module) -> None:
    """Torchvision's own ResNet init, so every expert's layer4 copy starts from new weights."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def torchvision_trunk(backbone: str) -> Trunk:
    if backbone not in _BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}: expected one of {sorted(_BACKBONES)}")
    net = _BACKBONES[backbone](weights=None)
    template = net.layer4  # only a template: each expert gets its own re-initialised copy

    def make_deep() -> nn.Module:
        layer4 = copy.deepcopy(template)
        _reinit_like_torchvision(layer4)
        return layer4

    # Bottleneck widths are identical across the three backbones (expansion 4).
    return Trunk(
        stem=nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool),
        shared=[net.layer1, net.layer2, net.layer3],
        shared_channels=[256, 512, 1024],
        make_deep=make_deep,
        deep_channels=2048,
    )


def shike_imagenet(
    backbone: str,
    num_classes: int,
    num_experts: int = 3,
    expert_sources: list[int] | None = None,
    dkf: bool = True,
    fusion: str = "product",
    adapter_relu: str = "code",
    head: str = "cosine",
    cosine_scale: float = 30.0,
) -> ShikeNet:
    return ShikeNet(
        torchvision_trunk(backbone),
        num_classes,
        num_experts=num_experts,
        expert_sources=expert_sources,
        dkf=dkf,
        fusion=fusion,
        adapter_relu=adapter_relu,
        head=head,
        cosine_scale=cosine_scale,
        kaiming_convs=False,  # torchvision already initialised the trunk
    )
