import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import EXECUTION_SETTINGS, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize(
    "path", [p for p in PRESETS if not p.name.startswith("sweep_")], ids=lambda p: p.name
)
def test_every_preset_loads(path):
    cfg = load_config(path)
    assert cfg.optim.stage2_start <= cfg.optim.epochs


def test_paper_preset_matches_the_released_recipe():
    cfg = load_config(ROOT / "configs/cifar100_lt_if100.yaml")
    assert (cfg.data.dataset, cfg.data.imbalance_factor, cfg.data.selection) == (
        "cifar100",
        100,
        "first",
    )
    assert (cfg.optim.epochs, cfg.optim.stage2_start, cfg.optim.batch_size) == (200, 180, 128)
    assert (cfg.loss.dkt_weight, cfg.loss.md_weight, cfg.loss.kl_reduction) == (10, 1, "mean")
    assert cfg.model.cosine_scale == 30 and cfg.model.fusion == "product"


def test_dotted_overrides_are_typed():
    cfg = load_config(
        None, ["loss.dkt_weight=5", "model.fusion=sum", "model.expert_sources=[2,2,1]"]
    )
    assert cfg.loss.dkt_weight == 5.0
    assert cfg.model.fusion == "sum"
    assert cfg.model.expert_sources == [2, 2, 1]


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("loss.dkt_wieght=5", "unknown config key 'loss.dkt_wieght'"),
        ("nonsense.key=1", "unknown config key 'nonsense'"),
        ("optim.lr=-0.1", "'optim.lr'"),
        ("model.fusion=max", "'model.fusion'"),
        ("optim.stage2_start=300", "optim.stage2_start (300) must be <= optim.epochs (200)"),
        ("model.expert_sources=[1,2]", "model.expert_sources has 2 entries"),
        ("optim.warmup_epochs=1", "optim.warmup_epochs must be 0"),
        ("lossdkt_weight", "must look like key.subkey=value"),
    ],
)
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert fragment in str(info.value)


def test_config_hash_changes_with_any_value():
    a = load_config(None)
    assert a.config_hash() == load_config(None).config_hash()
    assert a.config_hash() != load_config(None, ["loss.tau=0.5"]).config_hash()
    assert a.flat()["loss.dkt_weight"] == 10.0


def test_recipe_leaves_out_execution_settings_only():
    """What a checkpoint must match on resume: every setting but where and how the run executes."""
    cfg = load_config(None)
    flat = cfg.flat()
    assert flat.keys() >= EXECUTION_SETTINGS  # no stale or misspelt name in the list
    assert cfg.recipe().keys() == flat.keys() - EXECUTION_SETTINGS
    moved = load_config(
        None, ["train.channels_last=true", "data.loader_workers=7", "train.amp=false"]
    )
    assert moved.recipe() == cfg.recipe() and moved.config_hash() != cfg.config_hash()
    assert load_config(None, ["optim.lr=0.1"]).recipe()["optim.lr"] == 0.1


def test_missing_config_file_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "optim.learning_rate=0.1"], "error: unknown config key 'optim.learning_rate'"),
        (["--set", "optim.lr=-1"], "error: invalid value for 'optim.lr'"),
        (["--set", "data.source=/no/such/dir"], "error: data.source does not exist: /no/such/dir"),
    ],
)
def test_engine_cli_rejects_bad_input_with_one_line(args, message):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.training.engine",
            "--config",
            str(ROOT / "configs/smoke.yaml"),
            *args,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert lines == [message] or (len(lines) == 1 and lines[0].startswith(message)), proc.stderr


def test_the_device_finishes_the_augmentation_unless_told_otherwise():
    assert load_config(None).data.augments_on_device  # auto: the CIFAR recipe on the device
    assert not load_config(None, ["data.augment_on=loader"]).data.augments_on_device
    large = load_config(ROOT / "configs/imagenet_lt_rx50.yaml")  # crops on the CPU, colour on it
    assert large.data.augment_on == "auto" and large.data.augments_on_device
    randaugment = ["data.augment=randaugment", "data.augment_on=loader"]
    assert not load_config(None, randaugment).data.augments_on_device


def test_use_gpu_takes_yaml_booleans():
    """`--set cluster.use_gpu=false` (YAML reads false as a boolean) means "false"."""
    values = [
        load_config(None, [f"cluster.use_gpu={v}"]).cluster.use_gpu
        for v in ("false", "true", "auto")
    ]
    assert values == ["false", "true", "auto"]
