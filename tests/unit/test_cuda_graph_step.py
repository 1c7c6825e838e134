"""The captured training step (train.cuda_graphs): its SGD arithmetic on any device, and on a
CUDA device the whole captured epoch against the eager one."""

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from pipeline.config import ConfigError, load_config
from pipeline.data.readers.torch_reader import make_loader
from pipeline.data.sources.raw import RawSplit
from pipeline.losses import build_objective
from pipeline.models import build_model
from pipeline.seeding import epoch_seed
from pipeline.training.cuda_graph_step import sgd_update
from pipeline.training.session import TrainingSession, set_trainable

COUNTS = [40, 30, 20, 14, 10, 8, 6, 4, 3, 2]


@pytest.mark.parametrize(
    "momentum, weight_decay, nesterov", [(0.9, 5e-4, False), (0.9, 0.0, True), (0.0, 1e-3, False)]
)
def test_sgd_update_matches_torch_sgd(momentum, weight_decay, nesterov):
    torch.manual_seed(0)
    ref = [torch.randn(5, 3), torch.randn(7)]
    params = [torch.nn.Parameter(p.clone()) for p in ref]
    opt = torch.optim.SGD(
        params, lr=0.1, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov
    )
    lr = torch.tensor(0.0)
    buffers: list[torch.Tensor] = []
    for step in range(4):
        grads = [torch.randn_like(p) for p in ref]
        step_lr = 0.1 / (step + 1)
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.param_groups[0]["lr"] = step_lr
        opt.step()
        if step == 0:  # torch creates the buffers on its first step; ours starts from them
            ours = [torch.nn.Parameter(p.detach().clone()) for p in params]  # leaves, as in use
            buffers = [opt.state[p]["momentum_buffer"].clone() for p in params] if momentum else []
            continue
        lr.fill_(step_lr)
        sgd_update(
            ours,
            grads,
            buffers,
            lr,
            momentum=momentum,
            weight_decay=weight_decay,
            nesterov=nesterov,
        )
        for mine, theirs in zip(ours, params, strict=True):
            torch.testing.assert_close(mine.detach(), theirs.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["model.dkf=false"],
        ["loss.dkt_weight=0"],
        ["loss.target_slot=neg_inf", "loss.hardest_negative=min"],
        ["model.arch=resnet32", "model.head=linear", "loss.stage1=ce"],
        ["model.arch=resnet32", "model.head=linear", "loss.stage1=balanced_softmax"],
    ],
    ids=["shike", "no_dkf", "no_dkt", "neg_inf", "ce", "balanced_softmax"],
)
@pytest.mark.parametrize("stage", [1, 2])
def test_training_step_has_static_shapes(overrides, stage):
    """What a CUDA graph cannot capture (boolean-mask indexing, .item(), nonzero) raises under
    fake tensors too: this guards capturability on a machine without a GPU."""
    cfg = load_config(None, ["data.dataset=cifar10", *overrides])
    model = build_model(cfg.model, 10)
    model.set_stage(stage)
    set_trainable(model, stage)
    objective = build_objective(cfg.loss, stage, COUNTS, cfg.model.cosine_scale)
    objective(model(torch.randn(4, 3, 32, 32)), torch.arange(4))  # eager: buffers settle
    with FakeTensorMode(allow_non_fake_inputs=True):
        images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
        terms = objective(model(images), labels)
        terms.total.backward()
        assert terms.total.shape == ()


def test_cuda_graphs_need_amp_off():
    with pytest.raises(ConfigError, match="train.cuda_graphs needs train.amp=false"):
        load_config(None, ["train.cuda_graphs=true"])


def _split(n_per_class):
    rng = np.random.default_rng(1)
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(n_per_class)])
    images = rng.integers(0, 256, size=(len(labels), 32, 32, 3), dtype=np.uint8)
    images[..., 1] = np.clip(images[..., 1] // 3 + labels[:, None, None] * 18, 0, 255)
    return RawSplit(
        images=images, labels=labels.astype(np.int64), sample_ids=np.arange(len(labels))
    )


DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    ),
]


@pytest.mark.parametrize("device", DEVICES)
def test_captured_epochs_match_eager_epochs(device, monkeypatch):
    """Three epochs (a stage switch, a partial last batch each epoch) through the captured
    step vs the eager one. On CPU the static-buffer step runs uncaptured: everything but the
    capture (warm-up, gradient hand-over, partial batches, the SGD arithmetic) is checked."""
    split = _split(COUNTS)  # 137 images: 4 full batches of 32 and one of 9
    overrides = [
        "optim.epochs=3",
        "optim.stage2_start=2",
        "optim.batch_size=32",
        "optim.warmup_epochs=0",
        "data.loader_workers=0",
        "train.amp=false",
        f"train.device={device}",
        "train.seed=5",
    ]
    # Eager and replayed kernels then agree closely. cuDNN's TF32 is off (matmuls are float32
    # by default): it rounds convolution inputs to 10 mantissa bits, which turns the last-bit
    # difference between the two SGD updates into loss differences above the tolerance (seen
    # on an H200: 4.8e-4 relative).
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    sessions = {}
    for graphs in (False, True):
        cfg = load_config(None, [*overrides, f"train.cuda_graphs={str(graphs).lower()}"])
        session = TrainingSession(cfg, COUNTS, torch.device(device))
        history = []
        while not session.finished:
            history.append(
                session.run_epoch(
                    lambda e, cfg=cfg: make_loader(
                        split, cfg.data, 32, train=True, seed=epoch_seed(cfg.train.seed, e)
                    )
                )
            )
        sessions[graphs] = (session, history)
    (eager, eager_hist), (graphed, graphed_hist) = sessions[False], sessions[True]
    assert graphed._captured is not None and graphed._captured.captured  # in stage 2 too
    assert (graphed._captured.graph is not None) == (device == "cuda")
    for a, b in zip(eager_hist, graphed_hist, strict=True):
        assert a["samples"] == b["samples"] == len(split.labels)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    # The same arithmetic up to rounding (p - lr*b vs p + (-lr)*b), which 15 steps amplify to
    # ~1e-5..1e-4 relative; a skipped or mis-scaled update is orders of magnitude larger.
    for (name, a), b in zip(
        eager.model.state_dict().items(), graphed.model.state_dict().values(), strict=True
    ):
        a, b = a.double(), b.double()
        assert (a - b).norm() <= 1e-3 * b.norm() + 1e-9, name
