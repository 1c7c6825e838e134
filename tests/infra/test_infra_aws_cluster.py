"""infra/aws/cluster.yaml through Ray's own cluster-launcher validation (the steps `ray up`
runs before touching a cloud: prepare_config merges the AWS defaults, validate_config checks
ray/autoscaler/ray-schema.json and the node-type rules), a broken copy rejected, and the
commands consistent with each other. No cloud calls."""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "infra" / "aws" / "cluster.yaml"
CONFIG = yaml.safe_load(CLUSTER.read_text())


def ray_validate(config: dict) -> dict:
    """The file as written, then as `ray up` prepares it (AWS defaults merged), both through
    Ray's validate_config (ray-schema.json + node-type rules)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(copy.deepcopy(config))
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_validates_with_ray():
    prepared = ray_validate(CONFIG)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_ray_validation_rejects_a_broken_copy():
    """Ray's validation is live, not a no-op: one unknown key fails a copy of our file."""
    bad = copy.deepcopy(CONFIG)
    bad["docker"]["imagee"] = "x"
    with pytest.raises(jsonschema.ValidationError, match="imagee"):
        ray_validate(bad)


def test_cpu_head_and_gpu_workers_on_one_image():
    docker = CONFIG["docker"]
    assert docker.get("image") and "head_image" not in docker and "worker_image" not in docker
    types = CONFIG["available_node_types"]
    head = types[CONFIG["head_node_type"]]
    assert not head["node_config"]["InstanceType"].startswith(("g", "p")), (
        "head should be a CPU instance"
    )
    workers = [t for name, t in types.items() if name != CONFIG["head_node_type"]]
    assert workers and all(w["node_config"]["InstanceType"].startswith(("g", "p")) for w in workers)
    assert sum(w.get("min_workers", 0) for w in workers) <= CONFIG["max_workers"]


def _start_args(commands: list[str]) -> list[str]:
    start = [c for c in commands if "ray start" in c]
    assert len(start) == 1, commands
    return shlex.split(start[0].split("ray start", 1)[1])


def test_start_commands_agree():
    head = _start_args(CONFIG["head_start_ray_commands"])
    worker = _start_args(CONFIG["worker_start_ray_commands"])
    assert "--head" in head
    port = next(a.split("=", 1)[1] for a in head if a.startswith("--port="))
    address = next(a.split("=", 1)[1] for a in worker if a.startswith("--address="))
    assert address == f"$RAY_HEAD_IP:{port}"
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    om = lambda args: [a for a in args if a.startswith("--object-manager-port")]  # noqa: E731
    assert om(head) == om(worker)
    for cmds in (CONFIG["head_start_ray_commands"], CONFIG["worker_start_ray_commands"]):
        assert cmds[0] == "ray stop"


def test_everything_comes_from_the_image():
    """Setup must not reinstall Ray or the project (it would drift from the image's pins)."""
    for key in (
        "initialization_commands",
        "setup_commands",
        "head_setup_commands",
        "worker_setup_commands",
    ):
        for cmd in CONFIG.get(key, []):
            assert not re.search(r"pip install.*\bray\b|pip install -U", cmd), f"{key}: {cmd}"


def test_auth_mode_and_token_are_the_same_on_every_node():
    opts = " ".join(CONFIG["docker"]["run_options"])
    assert "RAY_AUTH_MODE=token" in opts
    token_path = re.search(r"RAY_AUTH_TOKEN_PATH=(\S+)", opts).group(1)
    mount_dirs = [remote for remote in CONFIG["file_mounts"]]
    assert any(token_path.startswith(d.rstrip("/") + "/") for d in mount_dirs), (
        "the token file must come from a file_mounts folder synced to every node"
    )
    assert (
        "head_run_options" not in CONFIG["docker"] and "worker_run_options" not in CONFIG["docker"]
    )


def test_no_credentials_in_the_file():
    text = CLUSTER.read_text()
    assert not re.search(
        r"AWS_SECRET_ACCESS_KEY|AWS_ACCESS_KEY_ID|AKIA[0-9A-Z]{16}|RAY_AUTH_TOKEN=", text
    )
