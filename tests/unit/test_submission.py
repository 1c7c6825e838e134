"""A launch from Ray's copy of a submitted job's working directory
(`pipeline.distributed.submission`): refused while an output or the dataset lies inside it."""

from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.distributed.submission import ray_working_dir_copy, settings_inside_ray_copy

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def ray_copy(tmp_path, monkeypatch):
    """The current directory made what `ray job submit --working-dir .` runs a job in."""
    copy = tmp_path / "session_1/runtime_resources/working_dir_files/_ray_pkg_abc"
    (copy / "sub").mkdir(parents=True)
    monkeypatch.chdir(copy)
    return copy


def test_the_copy_is_found_from_inside_it(ray_copy, tmp_path):
    assert ray_working_dir_copy() == ray_copy
    assert ray_working_dir_copy(ray_copy / "sub") == ray_copy
    assert ray_working_dir_copy(tmp_path) is None


def test_the_defaults_are_refused_naming_each_setting(ray_copy):
    cfg = load_config(ROOT / "configs/smoke.yaml", ["data.uri=.data/smoke"])
    line = settings_inside_ray_copy(cfg, f"sqlite:///{ray_copy}/mlflow.db")
    assert line is not None and "\n" not in line
    for name in ("tracking.tracking_uri", "cluster.storage_path", "data.uri"):
        assert name in line
    assert str(ray_copy) in line and "MLFLOW_TRACKING_URI" in line


def test_durable_locations_pass(ray_copy, tmp_path):
    shared = tmp_path / "shared"
    cfg = load_config(
        ROOT / "configs/smoke.yaml",
        [f"data.uri={shared}/data", f"cluster.storage_path={shared}/runs"],
    )
    assert settings_inside_ray_copy(cfg, f"sqlite:///{shared}/mlflow.db") is None
    assert settings_inside_ray_copy(cfg, "http://127.0.0.1:5000") is None
    s3 = load_config(
        ROOT / "configs/smoke.yaml", ["data.uri=s3://b/d", "cluster.storage_path=s3://b/runs"]
    )
    assert settings_inside_ray_copy(s3, "http://127.0.0.1:5000") is None
    # only the setting still inside the copy is named
    named = settings_inside_ray_copy(cfg, "sqlite:///mlflow.db").split(" must name")[0]
    assert "tracking.tracking_uri" in named and "cluster.storage_path" not in named


def test_outside_a_ray_copy_nothing_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(ROOT / "configs/smoke.yaml", ["data.uri=.data/smoke"])
    assert settings_inside_ray_copy(cfg, "sqlite:///mlflow.db") is None
