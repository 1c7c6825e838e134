"""Unit tests for pipeline.models: SHIKE architecture facts from SHIKE.md §1."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from pipeline.config import ConfigError, ModelConfig, load_config
from pipeline.models import (
    ExpertInference,
    ImageClassifier,
    NormedLinear,
    ShallowAdapter,
    build_model,
)

C = 100


def n_params(params) -> int:
    return sum(p.numel() for p in params)


@pytest.fixture(scope="module")
def shike() -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(), C)


@pytest.fixture
def x() -> Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def capture(modules: dict[str, nn.Module]) -> tuple[dict[str, Tensor], list]:
    """Forward hooks recording each module's output (and pre-hooks' inputs under 'in:')."""
    seen: dict[str, Tensor] = {}
    handles = []
    for name, module in modules.items():
        if name.startswith("in:"):
            handles.append(
                module.register_forward_pre_hook(
                    lambda _m, args, name=name: seen.__setitem__(name, args[0].detach().clone())
                )
            )
        else:
            handles.append(
                module.register_forward_hook(
                    lambda _m, _a, out, name=name: seen.__setitem__(name, out.detach().clone())
                )
            )
    return seen, handles


# ---- size and shape --------------------------------------------------------------------------


def test_parameter_counts_match_released_code(shike):
    total = n_params(shike.parameters())
    stage2 = n_params(shike.stage2_head_parameters())
    assert total == 1_277_008
    assert total - stage2 == 1_257_808
    # The parts of SHIKE.md §1.3.
    assert n_params(shike.stem.parameters()) + n_params(shike.shared.parameters()) == 112_592
    assert [n_params(e.deep.parameters()) for e in shike.experts] == [353_664] * 3
    assert [n_params(e.adapter.parameters()) for e in shike.experts] == [23_232, 18_560, 23_232]


def test_forward_shape_and_defaults(shike, x):
    out = shike(x)
    assert out.shape == (3, 2, C)
    assert shike.num_experts == 3
    assert shike.stage == 1


def test_stage2_prefix_names_exactly_the_rt_heads(shike):
    prefix = shike.stage2_head_prefix
    by_name = {id(p) for n, p in shike.named_parameters() if n.startswith(prefix)}
    assert by_name == {id(p) for p in shike.stage2_head_parameters()}
    assert len(by_name) == 3  # one bias-free cosine weight per expert
    assert all(k.startswith(prefix) for k in shike.state_dict() if "rt_" in k)


# ---- adapters --------------------------------------------------------------------------------


def test_adapter_sources_and_depths(shike):
    assert shike.expert_sources == [1, 2, 1]
    assert shike.adapter_depths == [2, 1, 2]
    shapes = [
        [(u[0].in_channels, u[0].out_channels, u[0].stride) for u in e.adapter]
        for e in shike.experts
    ]
    assert shapes[0] == [(16, 32, (2, 2)), (32, 64, (2, 2))]
    assert shapes[1] == [(32, 64, (2, 2))]
    # Experts 0 and 2 share a source but not weights.
    assert shike.experts[0].adapter is not shike.experts[2].adapter


def _relu_flags(adapter: ShallowAdapter) -> list[bool]:
    return [any(isinstance(m, nn.ReLU) for m in unit) for unit in adapter]


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("code", [[True, False], [True], [True, False]]),
        ("on", [[True, True], [True], [True, True]]),
        ("off", [[True, False], [False], [True, False]]),
    ],
)
def test_adapter_relu_rule_structure(mode, expected):
    model = build_model(ModelConfig(adapter_final_relu=mode), 10)
    assert [_relu_flags(e.adapter) for e in model.experts] == expected


def test_adapter_outputs_sign_follows_code_rule(shike, x):
    seen, handles = capture({f"a{m}": e.adapter for m, e in enumerate(shike.experts)})
    shike(x)
    for h in handles:
        h.remove()
    assert seen["a0"].min() < 0 and seen["a2"].min() < 0  # depth 2: no ReLU on the last unit
    assert seen["a1"].min() >= 0  # depth 1: its only unit (index 0) has a ReLU
    assert seen["a0"].shape == seen["a1"].shape == (2, 64, 8, 8)


def test_custom_sources_change_depths():
    model = build_model(ModelConfig(expert_sources=[2, 2, 1]), 10)
    assert model.adapter_depths == [1, 1, 2]
    assert model(torch.randn(2, 3, 32, 32)).shape == (3, 2, 10)


# ---- DKF -------------------------------------------------------------------------------------


def _fusion_io(model: nn.Module, x: Tensor, m: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(d_m, a_m, g_m, h_m) of expert m from one forward pass."""
    e = model.experts[m]
    seen, handles = capture(
        {"d": e.deep, "a": e.adapter, "g": e.fusion, "in:h": model.classifiers[m]}
    )
    model(x)
    for h in handles:
        h.remove()
    return seen["d"], seen["a"], seen["g"], seen["in:h"]


@pytest.mark.parametrize("m", [0, 1, 2])
def test_dkf_is_elementwise_product(shike, x, m):
    d, a, g, h = _fusion_io(shike, x, m)
    assert d.min() >= 0  # d_m comes after a ReLU
    torch.testing.assert_close(g, d * a)
    torch.testing.assert_close(h, (d * a).mean(dim=(2, 3)))  # global average pooling -> h_m


def test_dkf_sum_and_concat_variants(x):
    torch.manual_seed(0)
    model = build_model(ModelConfig(fusion="sum"), 10)
    d, a, g, _ = _fusion_io(model, x, 0)
    torch.testing.assert_close(g, d + a)

    model = build_model(ModelConfig(fusion="concat"), 10)
    d, a, g, _ = _fusion_io(model, x, 1)
    proj = model.experts[1].fusion.proj
    assert proj.weight.shape == (64, 128, 1, 1) and proj.bias is None
    torch.testing.assert_close(g, nn.functional.conv2d(torch.cat([d, a], 1), proj.weight))


def test_no_dkf_has_no_adapters(x):
    model = build_model(ModelConfig(dkf=False), C)
    assert not any("adapter" in n or "fusion" in n for n, _ in model.named_parameters())
    assert all(e.adapter is None for e in model.experts)
    assert n_params(model.parameters()) == 112_592 + 3 * 353_664 + 6 * 6_400
    seen, handles = capture({"d": model.experts[0].deep, "in:h": model.classifiers[0]})
    model(x)
    for h in handles:
        h.remove()
    torch.testing.assert_close(seen["in:h"], seen["d"].mean(dim=(2, 3)))  # g_m = d_m


# ---- heads and stages ------------------------------------------------------------------------


def test_cosine_logits_bounded_by_scale(x):
    torch.manual_seed(0)
    a = build_model(ModelConfig(cosine_scale=30.0), C)
    torch.manual_seed(0)
    b = build_model(ModelConfig(cosine_scale=10.0), C)
    za, zb = a(x), b(x)
    assert za.abs().max() <= 30.0 + 1e-4
    torch.testing.assert_close(za / 30.0, zb / 10.0)  # same cosines, different s
    assert all(isinstance(h, NormedLinear) for h in [*a.classifiers, *a.rt_classifiers])


def test_cosine_head_math_and_init():
    torch.manual_seed(0)
    head = NormedLinear(64, 7, scale=30.0)
    assert head.weight.shape == (7, 64)
    torch.testing.assert_close(head.weight.norm(dim=1), torch.ones(7))
    assert head.weight.abs().max() <= 1.0
    h = torch.randn(5, 64)
    w = head.weight
    expected = 30.0 * (h / h.norm(dim=1, keepdim=True)) @ (w / w.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(head(h), expected)
    # A feature aligned with class 3's weight hits the bound exactly.
    torch.testing.assert_close(head(w[3:4] * 5.0)[0, 3], torch.tensor(30.0))


def test_set_stage_uses_rt_heads_without_freezing(x):
    torch.manual_seed(0)
    model = build_model(ModelConfig(), C).eval()
    z1 = model(x)
    model.set_stage(2)
    assert model.stage == 2
    z2 = model(x)
    assert not torch.allclose(z1, z2)
    hs = model.forward_features(x)
    torch.testing.assert_close(
        z2, torch.stack([h(f) for h, f in zip(model.rt_classifiers, hs, strict=True)])
    )
    assert all(p.requires_grad for p in model.parameters())
    model.set_stage(1)
    torch.testing.assert_close(model(x), z1)
    with pytest.raises(ValueError):
        model.set_stage(3)


def test_init_order_kaiming_before_adapters():
    torch.manual_seed(0)
    model = build_model(ModelConfig(), C)
    # Kaiming-normal (fan_in, ReLU gain): std = sqrt(2 / fan_in).
    conv = model.experts[0].deep[1].conv1  # 64 -> 64, 3x3, fan_in = 576
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / 576), rel=0.05)
    # Adapters keep PyTorch's default kaiming_uniform(a=sqrt(5)): std = 1 / sqrt(3 * fan_in).
    aconv = model.experts[0].adapter[1][0]  # 32 -> 64, 3x3, fan_in = 288
    assert aconv.weight.std().item() == pytest.approx(1 / math.sqrt(3 * 288), rel=0.05)
    bn = model.experts[0].deep[0].bn1
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


# ---- baselines -------------------------------------------------------------------------------


def test_resnet32_single_expert_baseline(x):
    model = build_model(ModelConfig(arch="resnet32", num_experts=3), C)
    assert model.num_experts == 1
    assert model.adapter_depths == [0]
    assert n_params(model.parameters()) == 112_592 + 353_664 + 2 * 6_400
    assert model(x).shape == (1, 2, C)

    linear = build_model(ModelConfig(arch="resnet32", head="linear"), C)
    assert isinstance(linear.classifiers[0], nn.Linear) and linear.classifiers[0].bias is not None
    assert isinstance(linear.rt_classifiers[0], nn.Linear)
    assert n_params(linear.stage2_head_parameters()) == 64 * C + C


# ---- inference wrappers ----------------------------------------------------------------------


def test_expert_inference_is_mean_of_current_stage(shike, x):
    shike.eval()
    ens = ExpertInference(shike)
    torch.testing.assert_close(ens(x), shike(x).mean(dim=0))
    assert ens(x).shape == (2, C)
    shike.set_stage(2)
    try:
        torch.testing.assert_close(ens(x), shike(x).mean(dim=0))
    finally:
        shike.set_stage(1)


def test_image_classifier_uint8_to_probabilities(shike):
    shike.eval()
    mean, std = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
    names = [f"c{i}" for i in range(C)]
    clf = ImageClassifier(shike, mean, std, names).eval()
    assert clf.class_names == names and isinstance(clf.class_names, list)
    images = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    with torch.no_grad():
        probs = clf(images)
        x = images.permute(0, 3, 1, 2).float() / 255.0
        x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        expected = torch.softmax(shike(x).mean(0), dim=1)
    assert probs.shape == (4, C)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(4))
    torch.testing.assert_close(probs, expected)
    assert {"mean", "std"} <= {n for n, _ in clf.named_buffers()}


def test_image_classifier_exports_with_dynamic_batch(shike):
    clf = ImageClassifier(shike.eval(), [0.5] * 3, [0.25] * 3, [str(i) for i in range(C)]).eval()
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=512)
    program = torch.export.export(clf, (images,), dynamic_shapes={"images": {0: batch}})
    few = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(few), clf(few))


# ---- 4-stage variants ------------------------------------------------------------------------


def test_shike_resnet50_forward_and_adapters():
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="shike_resnet50"), 5)
    assert model.expert_sources == [1, 2, 3]
    assert model.adapter_depths == [3, 2, 1]
    widths = [[u[0].out_channels for u in e.adapter] for e in model.experts]
    assert widths == [[512, 1024, 2048], [1024, 2048], [2048]]
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (3, 2, 5)
    assert out.abs().max() <= 30.0 + 1e-4
    # Each expert's layer4 is its own module with its own weights.
    w = [e.deep[0].conv1.weight for e in model.experts]
    assert w[0].data_ptr() != w[1].data_ptr() and not torch.equal(w[0], w[1])


def test_shike_resnext50_and_resnet152_structure():
    model = build_model(ModelConfig(arch="shike_resnext50", num_experts=4), 7)
    assert model.expert_sources == [1, 2, 3, 1]
    assert model.adapter_depths == [3, 2, 1, 3]
    assert model.experts[0].deep[0].conv2.groups == 32  # ResNeXt 32x4d grouped convs
    assert model.classifiers[0].weight.shape == (7, 2048)

    big = build_model(ModelConfig(arch="shike_resnet152"), 7)
    assert [len(s) for s in big.shared] == [3, 8, 36]  # ResNet-152 stage depths
    assert [len(e.deep) for e in big.experts] == [3, 3, 3]
    assert big.adapter_depths == [3, 2, 1]
    assert n_params(big.stage2_head_parameters()) == 3 * 7 * 2048


# ----------------------------------------------------------------------------- pretrained trunks


def _resnet18_weights(path):
    import torchvision

    torch.manual_seed(7)
    reference = torchvision.models.resnet18(weights=None, num_classes=1000)
    torch.save(reference.state_dict(), path)
    return reference.state_dict()


def test_pretrained_weights_fill_the_trunk_and_every_experts_deep_stage(tmp_path):
    """`model.pretrained` (a torchvision state dict): stem, layer1-3 and each expert's layer4
    start from it; heads and adapters keep their own init; the 1000-class fc is ignored."""
    from pipeline.training.session import TrainingSession

    reference = _resnet18_weights(tmp_path / "r18.pt")
    cfg = load_config(
        None, ["model.arch=shike_resnet18", f"model.pretrained={tmp_path / 'r18.pt'}"]
    )
    session = TrainingSession(cfg, [5, 3, 2], torch.device("cpu"))
    session.start(None)  # a fresh run: from the pretrained weights
    model = session.model
    own = model.state_dict()
    assert torch.equal(own["stem.0.weight"], reference["conv1.weight"])
    assert torch.equal(own["shared.2.1.bn2.running_var"], reference["layer3.1.bn2.running_var"])
    for m in range(model.num_experts):
        assert torch.equal(
            own[f"experts.{m}.deep.0.conv1.weight"], reference["layer4.0.conv1.weight"]
        )
    fresh = TrainingSession(
        load_config(None, ["model.arch=shike_resnet18"]), [5, 3, 2], torch.device("cpu")
    ).model.state_dict()
    untouched = [k for k in own if k.startswith(("classifiers.", "experts.0.adapter"))]
    assert untouched and all(torch.equal(own[k], fresh[k]) for k in untouched)


def test_pretrained_weights_of_another_architecture_are_refused(tmp_path):
    from pipeline.models import load_pretrained
    from pipeline.training.checkpoint import CheckpointError, load_pretrained_weights

    _resnet18_weights(tmp_path / "r18.pt")
    cfg = load_config(None, ["model.arch=shike_resnet50"])
    with pytest.raises(ValueError, match=r"do not fit model: conv1.weight|layer1.0.conv1.weight"):
        load_pretrained(
            build_model(cfg.model, 3), load_pretrained_weights(str(tmp_path / "r18.pt"))
        )
    with pytest.raises(CheckpointError, match="model.pretrained: no file at .*missing.pt"):
        load_pretrained_weights(str(tmp_path / "missing.pt"))
    with pytest.raises(ConfigError, match="model.pretrained takes torchvision ResNet weights"):
        load_config(None, [f"model.pretrained={tmp_path / 'r18.pt'}"])
