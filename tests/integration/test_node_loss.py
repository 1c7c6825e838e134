"""Node loss on a two-node Ray cluster on loopback (issue 28, finding 2).

Two `ray start` processes on this machine, 2 CPUs each, one Train worker (1 CPU) on each node.
The worker node's raylet is killed mid-run: Ray Train restarts the group on the head, where
both workers fit but leave Ray Data no CPU. Before the capacity check and the stall guard
(pipeline.distributed.capacity) the run then waited 1,800 s per retry with its MLflow run left
RUNNING; now the restarted group's rank 0 finds 2 CPUs where 3 are needed, waits
cluster.stall_timeout_s for a node to join (none does), and the run fails within minutes with
one error line naming the capacity shortfall, its MLflow run FAILED.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from tests.helpers.checkpoints import registered_checkpoint
from tests.helpers.processes import start_driver
from tests.helpers.ray_cluster import RAY_ENV, _ray_bin, _stop, own_ports
from tests.helpers.s3_server import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
ROOT = Path(__file__).resolve().parents[2]
# The test's cluster.stall_timeout_s (the default is 300): the restarted group waits this long
# for a node to join; also the longest wait for a batch (a first batch takes about 6 s here).
STALL_TIMEOUT_S = 25

# Holds one CPU on each node while the Train workers are placed, so Ray Train's PACK strategy
# has to put one worker on each node (each node keeps one CPU for Ray Data afterwards).
HOLDER = """
import sys, ray
from ray.util.placement_group import placement_group, remove_placement_group
ray.init(log_to_driver=False)
pg = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_SPREAD")
ray.get(pg.ready(), timeout=60)
print("held", flush=True)
sys.stdin.readline()
remove_placement_group(pg)
"""


# The GCS declares a node dead after this many failed health checks this far apart (defaults:
# 5 x 3 s): the killed raylet is noticed in about 3 s instead of 15.
FAST_NODE_DEATH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}


@contextlib.contextmanager
def two_nodes(tmp: Path) -> Iterator[dict]:
    """A head and a worker node, 2 CPUs each, with their own temp dirs under `tmp`; yields the
    environment for drivers. Stops only these nodes' processes."""
    port = free_port()
    env = {**os.environ, **RAY_ENV, "RAY_TMPDIR": str(tmp), **FAST_NODE_DEATH}
    env["RAY_ADDRESS"] = f"127.0.0.1:{port}"  # for the nodes' processes too (ray_cluster.ray_head)
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=2", "--num-gpus=0"]
    common += ["--disable-usage-stats"]
    orphans: list[psutil.Process] = []
    try:
        subprocess.run(
            [_ray_bin(), "start", "--head", f"--port={port}", "--include-dashboard=false",
             f"--temp-dir={tmp / 'head'}", *common, *own_ports(head=True)],
            env=env, check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        subprocess.run(
            [_ray_bin(), "start", f"--address=127.0.0.1:{port}", f"--temp-dir={tmp / 'node'}",
             *common, *own_ports(head=False)],
            env=env, check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        yield {**env, "_orphans": orphans}
    finally:
        _stop(tmp)
        for proc in orphans:  # the lost node's workers, if they outlived their raylet
            with contextlib.suppress(psutil.Error):
                proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def _raylet(tmp: Path, node: str) -> psutil.Process:
    [raylet] = [
        p
        for p in psutil.process_iter(["cmdline"])
        if (cmd := p.info["cmdline"] or [])
        and cmd[0].endswith("/raylet")
        and str(tmp / node) in " ".join(cmd)
    ]
    return raylet


def _train_workers(raylet: psutil.Process) -> list[psutil.Process]:
    with contextlib.suppress(psutil.Error):
        return [
            p for p in raylet.children(recursive=True) if "RayTrainWorker" in " ".join(p.cmdline())
        ]
    return []


def _wait(condition, timeout_s: float, proc: subprocess.Popen, log: Path, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert proc.poll() is None, f"driver ended before {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} in {timeout_s}s:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)


def test_a_lost_node_fails_the_run_clearly_within_minutes(tiny_dataset, tmp_path):
    tmp = Path(f"/tmp/rnl-{uuid.uuid4().hex[:8]}")  # AF_UNIX socket paths stay short
    name = "node-loss"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    values = {
        "data.uri": tiny_dataset,
        "model.arch": "resnet32",
        "optim.epochs": 8,
        "optim.stage2_start": 7,
        "optim.batch_size": 32,
        "optim.warmup_epochs": 0,
        "cluster.num_workers": 2,
        "cluster.cpus_per_worker": 1,
        # The finding: the group restarts on the head. One retry more than that: a restart can
        # itself fail soon after the loss (seen once under `make test`'s load: the run ended 10 s
        # after it on a second worker health-check failure, its one retry spent; likely a group
        # placed while the GCS still counted the lost node). The capacity error ends the run on
        # a later retry.
        "cluster.max_failures": 2,
        "cluster.stall_timeout_s": STALL_TIMEOUT_S,
        "cluster.storage_path": str(tmp_path / "runs"),
        "tracking.tracking_uri": uri,
        "tracking.model_name": "shike-test",
        "train.threads": 1,
    }
    cmd = [sys.executable, "-m", "jobs.train", "--config", "configs/smoke.yaml"]
    cmd += ["--run-name", name, *[a for k, v in values.items() for a in ("--set", f"{k}={v}")]]
    log = tmp_path / "driver.log"
    with two_nodes(tmp) as env:
        orphans = env.pop("_orphans")
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLDER], env=env, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        proc = None
        try:
            assert holder.stdout.readline().strip() == "held"
            proc = start_driver(cmd, ROOT, env, log=log)
            head, node = _raylet(tmp, "head"), _raylet(tmp, "node")
            _wait(
                lambda: _train_workers(head) and _train_workers(node),
                240, proc, log, "Train worker on each node",
            )  # fmt: skip
            holder.communicate("\n", timeout=60)  # the CPUs it held go to Ray Data
            _wait(
                lambda: registered_checkpoint(tmp_path / "runs", name) is not None,
                240, proc, log, "checkpoint",
            )  # fmt: skip

            orphans += [*_train_workers(node), *node.children(recursive=True)]
            node.kill()
            killed = time.monotonic()
            try:
                proc.wait(timeout=300)
            except subprocess.TimeoutExpired:
                pytest.fail(f"driver still running 300 s after the node loss:\n{log.read_text()}")
            took = time.monotonic() - killed
        finally:
            for child in (holder, proc):
                if child is not None and child.poll() is None:
                    child.kill()
                    child.wait()
    out = log.read_text()
    errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
    print(f"node loss -> driver exit in {took:.0f} s, rc {proc.returncode}: {errors[-1:]}")
    assert took < 300
    assert proc.returncode == 1, out[-3000:]
    assert len(errors) == 1, out[-3000:]
    [error] = errors
    # The restarted group's capacity check (rank 0): the head's 2 CPUs against 2 workers x 1 CPU
    # + 1 CPU for Ray Data (cluster.data_cpus), after waiting cluster.stall_timeout_s for a node.
    cause = (
        "Train worker rank 0: CapacityError: at worker-group start: the cluster has 2 CPUs on 1 "
        "node; 2 Train workers x 1 CPU + 1 CPU for Ray Data input (cluster.data_cpus) need 3 (a "
        "lost node?): lower cluster.num_workers / cluster.cpus_per_worker or add nodes (waited "
        f"{STALL_TIMEOUT_S} s for nodes to join, cluster.stall_timeout_s)"
    )
    assert error.startswith(
        f"error: training run '{name}' failed: {cause}; the checkpoint of epoch "
    ), error
    assert "; resume with: python -m jobs.train " in error, error
    [run] = MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name("shike").experiment_id],
        f"tags.`shike.run_name` = '{name}'",
    )
    assert run.info.status == "FAILED"
