"""The Ray-free engine: stage switch, exact resume, evaluation, bad input."""

import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.data.readers.batch_augment import BatchAugment, augmented_batches, shuffled_batches
from pipeline.data.readers.torch_reader import make_loader
from pipeline.data.sources.raw import RawSplit
from pipeline.seeding import epoch_seed
from pipeline.training.fit import fit, format_epoch_line
from pipeline.training.session import NonFiniteLossError, TrainingSession

ROOT = Path(__file__).resolve().parents[2]


def _split(n_per_class, num_classes=10, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), n_per_class)
    images = rng.integers(0, 256, size=(len(labels), 32, 32, 3), dtype=np.uint8)
    # a class-dependent tint so that there is something to learn
    images[..., 0] = np.clip(images[..., 0] // 4 + labels[:, None, None] * 20, 0, 255)
    return RawSplit(
        images=images, labels=labels.astype(np.int64), sample_ids=np.arange(len(labels))
    )


def _cfg(**overrides):
    base = {
        "optim.epochs": 3,
        "optim.stage2_start": 2,
        "optim.batch_size": 32,
        "optim.warmup_epochs": 0,
        "data.loader_workers": 0,
        "train.seed": 3,
    }
    base.update(overrides)
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


def _batches(cfg, split):
    return lambda epoch: make_loader(
        split, cfg.data, cfg.optim.batch_size, train=True, seed=epoch_seed(cfg.train.seed, epoch)
    )


COUNTS = [12, 10, 8, 6, 5, 4, 3, 3, 2, 2]


def test_stage_switch_trains_only_the_stage2_heads():
    cfg = _cfg(**{"optim.epochs": 2, "optim.stage2_start": 1})
    split = _split(6)
    session = TrainingSession(cfg, COUNTS, torch.device("cpu"))
    session.run_epoch(_batches(cfg, split))
    before = {k: v.clone() for k, v in session.model.state_dict().items()}
    stats = session.run_epoch(_batches(cfg, split))
    assert stats["stage"] == 2 and session.model.stage == 2
    prefix = session.model.stage2_head_prefix
    after = session.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    heads = {k for k in changed if k.startswith(prefix)}
    running = {
        k for k in changed if k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    }
    assert heads, "stage-2 heads did not train"
    assert running, (
        "BN running statistics must keep updating in stage 2 (model stays in train mode)"
    )
    assert changed - heads - running == set()
    # the new optimizer holds exactly the stage-2 head parameters
    opt_params = {id(p) for g in session.optimizer.param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in session.model.stage2_head_parameters()}


def test_stage1_leaves_stage2_heads_untouched():
    cfg = _cfg()
    session = TrainingSession(cfg, COUNTS, torch.device("cpu"))
    prefix = session.model.stage2_head_prefix
    before = {k: v.clone() for k, v in session.model.state_dict().items() if k.startswith(prefix)}
    session.run_epoch(_batches(cfg, _split(4)))
    after = session.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def _device_batches(cfg, split):
    """The engine's batches with `data.augment_on=device`: the split kept whole as uint8."""
    images = torch.from_numpy(split.images).permute(0, 3, 1, 2).contiguous()
    labels = torch.as_tensor(split.labels)
    augment = BatchAugment(cfg.data.augment)

    def epoch_batches(epoch):
        seed = epoch_seed(cfg.train.seed, epoch)
        batches = shuffled_batches(images, labels, cfg.optim.batch_size, seed)
        return augmented_batches(batches, augment, seed, torch.device("cpu"))

    return epoch_batches


@pytest.mark.parametrize("augment_on", ["loader", "device"])
def test_resume_is_bit_identical_across_the_stage_switch(tmp_path, augment_on):
    cfg = _cfg(**{"data.augment_on": augment_on})
    split = _split(6)
    batches = _batches if augment_on == "loader" else _device_batches
    straight = TrainingSession(cfg, COUNTS, torch.device("cpu"))
    for _ in range(3):
        straight.run_epoch(batches(cfg, split))

    first = TrainingSession(cfg, COUNTS, torch.device("cpu"))
    first.run_epoch(batches(cfg, split))
    first.save(tmp_path / "ckpt")
    del first
    torch.manual_seed(12345)  # disturb global RNG: the resumed run must not depend on it
    resumed = TrainingSession(cfg, COUNTS, torch.device("cpu"))
    resumed.restore(tmp_path / "ckpt")
    assert resumed.epoch == 1
    resumed.run_epoch(batches(cfg, split))
    resumed.save(tmp_path / "ckpt")  # checkpoint again, now crossing into stage 2
    again = TrainingSession(cfg, COUNTS, torch.device("cpu"))
    again.restore(tmp_path / "ckpt")
    again.run_epoch(batches(cfg, split))

    a, b = straight.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa, sb = straight.optimizer.state_dict()["state"], again.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i]["momentum_buffer"], sb[i]["momentum_buffer"]) for i in sa)


def test_resume_refuses_another_recipe_and_names_the_setting(tmp_path):
    cfg = _cfg()
    session = TrainingSession(cfg, COUNTS, torch.device("cpu"))
    session.save(tmp_path)
    other = TrainingSession(_cfg(**{"loss.dkt_weight": 5}), COUNTS, torch.device("cpu"))
    with pytest.raises(
        RuntimeError, match=r"another recipe \(loss\.dkt_weight=10\.0 there, 5\.0 here\)"
    ):
        other.restore(tmp_path)


def test_resume_accepts_other_execution_settings(tmp_path):
    """A run continues on another machine or layout: device, precision, memory format, loader
    and checkpoint cadence are not part of what it trains."""
    cfg = _cfg()
    split = _split(6)
    session = TrainingSession(cfg, COUNTS, torch.device("cpu"))
    session.run_epoch(_batches(cfg, split))
    session.save(tmp_path)
    execution = {
        "train.channels_last": True,
        "train.amp": False,
        "train.cuda_graphs": True,
        "train.checkpoint_every": 5,
        "data.loader_workers": 1,
        "data.augment_on": "device",
        "tracking.experiment": "elsewhere",
    }
    moved = TrainingSession(_cfg(**execution), COUNTS, torch.device("cpu"))
    moved.restore(tmp_path)
    assert moved.epoch == 1
    for k, v in session.model.state_dict().items():
        assert torch.equal(moved.model.state_dict()[k], v), k


@pytest.mark.parametrize("arch", ["shike", "plain"])
def test_channels_last_computes_the_same_step(arch):
    """`train.channels_last` only changes the memory layout: from the same weights, the logits of
    both stages and the stage-1 gradient match the default layout up to float32 rounding. A
    layout bug (a view or flatten that assumes NCHW) gives errors of order 1. The bounds are
    loose because on CPU the channels-last kernels sum in another order
    than the NCHW ones, and 32 layers amplify that rounding: these two models differ by up to
    9e-5 of the logits' scale and 1.6-2.6% of the gradient norm (torch 2.14.1, 2 cores)."""
    plain = {"model.arch": "resnet32", "model.head": "linear", "loss.stage1": "ce"}
    extra = {} if arch == "shike" else plain
    images, labels = next(iter(_batches(_cfg(), _split(4))(0)))
    outputs = []
    for channels_last in (False, True):
        session = TrainingSession(
            _cfg(**extra, **{"train.channels_last": channels_last}), COUNTS, torch.device("cpu")
        )
        x = images.contiguous(memory_format=torch.channels_last) if channels_last else images
        stage1 = session.model(x)
        session.objective(stage1, labels).total.backward()
        grad = torch.cat(
            [p.grad.flatten() for p in session.model.parameters() if p.grad is not None]
        )
        session.model.set_stage(2)
        outputs.append((stage1.detach(), session.model(x).detach(), grad))
    (s1_a, s2_a, grad_a), (s1_b, s2_b, grad_b) = outputs
    for a, b in ((s1_a, s1_b), (s2_a, s2_b)):
        assert (a - b).abs().max() <= 1e-3 * a.abs().max()
    assert (grad_a - grad_b).norm() <= 0.1 * grad_a.norm()


def test_input_wait_is_the_share_of_the_epoch_spent_waiting_for_batches():
    """A loader that takes 0.4 s per batch leaves the step waiting at least 0.8 s of a 2-batch
    epoch; batches already in memory keep it waiting for next to nothing."""
    cfg = _cfg()
    session = TrainingSession(cfg, COUNTS, torch.device("cpu"))
    in_memory = list(_batches(cfg, _split(4))(0))  # 40 images: 2 batches of 32 and 8

    def slow_loader():
        for batch in in_memory:
            time.sleep(0.4)
            yield batch

    slow = session.run_epoch(slow_loader())
    fast = session.run_epoch(in_memory)
    assert slow["input_wait"] * slow["seconds"] >= 0.8
    assert 0.4 <= slow["input_start_s"] < slow["input_wait"] * slow["seconds"]
    assert slow["input_wait"] <= 1.0
    assert fast["input_wait"] < 0.05
    assert "input wait" in format_epoch_line(fast, 3, None, 0.0, session.objective.part_names)


def test_nan_loss_stops_with_a_clear_error():
    cfg = _cfg(**{"optim.lr": 1e30, "optim.peak_lr": 1e30})
    session = TrainingSession(cfg, COUNTS, torch.device("cpu"))
    split = _split(6)
    with pytest.raises(NonFiniteLossError, match="non-finite"):
        for _ in range(2):
            session.run_epoch(_batches(cfg, split))


def test_evaluate_reports_lt_groups():
    cfg = _cfg()
    session = TrainingSession(cfg, [500] * 3 + [50] * 3 + [5] * 4, torch.device("cpu"))
    loader = make_loader(_split(3), cfg.data, 16, train=False)
    counts, adjusted = session.evaluate(loader, adjust=True)
    res = counts.compute(class_counts=session.class_counts)
    assert adjusted is not None and adjusted.num_samples == 30
    assert res["num_samples"] == 30
    assert 0.0 <= res["acc"] <= 1.0 and not math.isnan(res["acc_few"])
    assert session.model.training  # evaluation restores train mode


def test_smoke_recipe_runs_end_to_end_and_the_loss_falls(cifar10_dir):
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "pipeline.training.engine", "--config", "configs/smoke.yaml"),
            *("--set", "data.augment_on=device", "--set", f"data.source={cifar10_dir}"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("epoch")]
    assert len(lines) == 4
    losses = [float(ln.split("| loss ")[1].split()[0]) for ln in lines[:3]]  # stage 1 epochs
    assert losses[-1] < losses[0], lines
    assert "augmented on the device" in proc.stdout
    assert "test: top-1" in proc.stdout and "many" in proc.stdout


def _batches_of(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def test_augmented_batches_depend_on_the_seed_only():
    """Worker count and loader reuse change nothing; the caller's RNG is left alone."""
    cfg = _cfg(**{"data.augment": "shike"})
    split = _split(3)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    in_process = _batches_of(make_loader(split, cfg.data, 8, train=True, seed=11))
    assert torch.equal(torch.rand(3), expected_next)
    workers = _cfg(**{"data.augment": "shike", "data.loader_workers": 2})
    reused = make_loader(split, workers.data, 8, train=True, seed=99, persistent=True)
    _batches_of(reused)  # an epoch with another seed first
    reused.sampler.set_seed(11)
    for (xa, ya), (xb, yb) in zip(in_process, _batches_of(reused), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other = _batches_of(make_loader(split, cfg.data, 8, train=True, seed=12))
    assert not torch.equal(in_process[0][0], other[0][0])


def test_test_split_after_each_epoch_from_test_from_epoch():
    """train.test_from_epoch: the test split is also evaluated after the epochs from that one
    on (last against best of the last epochs); the run's result stays the last epoch's."""
    cfg = _cfg(**{"train.test_from_epoch": 2})
    split = _split(4)
    session = TrainingSession(cfg, COUNTS, torch.device("cpu"))
    lines: list[str] = []
    test = make_loader(split, cfg.data, 64, train=False)
    ends = fit(session, _batches(cfg, split), test_batches=test, log=lines.append)
    assert [end.test is not None for end in ends] == [False, True, True]
    epoch_lines = [line for line in lines if line.startswith("epoch")]
    assert ["test acc" in line for line in epoch_lines] == [False, True, False]
    assert sum(line.startswith("test: top-1") for line in lines) == 1  # the final result only
    assert "test/acc" in ends[1].metrics() and ends[2].final
