"""4-stage SHIKE on torchvision ResNets (SHIKE.md §1.5; the authors never released this, so
this adaptation of DKF to four stages is ours).

    stem    conv1, bn1, relu, maxpool
    layer1  -> f_1  256 ch, H/4     (shared)
    layer2  -> f_2  512 ch, H/8     (shared)
    layer3  -> f_3 1024 ch, H/16    (shared)
    layer4  -> d_m 2048 ch, H/32    (one copy per expert)

Expert m's adapter reads f_{src(m)}, default src = [1, 2, 3] (cycling for M > 3), through
3 - src + 1 stride-2 units: 256 -> 512 -> 1024 -> 2048. ResNet-18 (basic blocks, a quarter of
the widths: 64 / 128 / 256 / 512) is the narrow trunk of smoke runs.

Weights are never downloaded: `load_pretrained` takes a torchvision state dict the user brings
(e.g. ImageNet weights for Places-LT). Without one, each expert's layer4 copy is re-initialised.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torchvision
from torch import Tensor, nn

from pipeline.models.shike import ShikeNet, Trunk

_BACKBONES: dict[str, Callable[..., torchvision.models.ResNet]] = {
    "resnet18": torchvision.models.resnet18,
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

    deep = net.fc.in_features  # 2048 for bottleneck trunks, 512 for ResNet-18
    return Trunk(
        stem=nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool),
        shared=[net.layer1, net.layer2, net.layer3],
        shared_channels=[deep // 8, deep // 4, deep // 2],
        make_deep=make_deep,
        deep_channels=deep,
    )


def _trunk_key(key: str, num_experts: int) -> list[str]:
    """Where a torchvision ResNet state-dict entry goes in a 4-stage ShikeNet."""
    head, _, rest = key.partition(".")
    if head in ("conv1", "bn1"):
        return [f"stem.{0 if head == 'conv1' else 1}.{rest}"]
    if head in ("layer1", "layer2", "layer3"):
        return [f"shared.{int(head[-1]) - 1}.{rest}"]
    if head == "layer4":  # every expert's deep stage starts from the pretrained layer4
        return [f"experts.{m}.deep.{rest}" for m in range(num_experts)]
    return []  # fc: the classifier of another label set


def load_pretrained(model: ShikeNet, state: dict[str, Tensor]) -> int:
    """Copy a torchvision ResNet state dict into `model`'s trunk and expert stages; the heads,
    adapters and DKF projections keep their init. Returns the number of tensors copied; a
    state dict of another architecture is a ValueError naming the first mismatching key."""
    own = model.state_dict()
    updates: dict[str, Tensor] = {}
    for key, value in state.items():
        for target in _trunk_key(key, model.num_experts):
            if target not in own or own[target].shape != value.shape:
                found = tuple(own[target].shape) if target in own else "no such tensor"
                raise ValueError(
                    f"pretrained weights do not fit model: {key} {tuple(value.shape)} -> "
                    f"{target} {found}"
                )
            updates[target] = value
    trunk = [k for k in own if k.startswith(("stem.", "shared.")) or ".deep." in k]
    missing = [k for k in trunk if k not in updates]
    if missing:
        raise ValueError(f"pretrained weights lack {len(missing)} trunk tensors, e.g. {missing[0]}")
    model.load_state_dict(updates, strict=False)
    return len(updates)


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
