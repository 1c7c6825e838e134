"""A real Ray head node on 127.0.0.1 for the test session (`ray start --head`).

Started once per session and shared: the in-process tests connect with ray.init(address=...),
`ray job submit` and subprocess drivers reach it through RAY_ADDRESS. Token auth is disabled
on both sides (loopback only). 4 logical CPUs on a 2-core machine: Ray Data tasks and two
0.5-CPU Train workers must fit at once or Ray Data stalls.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from tests.helpers.s3_server import free_port

# Per-test limit of tests that run whole Ray jobs (several driver launches each): up to 507 s on
# the slowest 2-core machine measured (2026-12-01), so twice the suite's 600 s (pyproject.toml).
RAY_JOB_TEST_TIMEOUT_S = 1200

RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    "RAY_TRAIN_V2_ENABLED": "1",
    # How often a Train controller polls its workers (default 2 s): each run's start, end and
    # restart waits for a poll. A test run is seconds long, so 0.3 s saves seconds per launch.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.3",
}


def own_ports(head: bool) -> list[str]:
    """`ray start` arguments that replace Ray's fixed default ports with free ones: the
    dashboard agent's HTTP port (52365), through which `ray job submit` reaches a node, and a
    head's Ray Client server (10001). Two nodes on one machine (the node-loss test's cluster
    beside the session's, or a developer's Ray) would otherwise race for them, and the loser's
    agent runs without its HTTP server: "No available agent to submit job"."""
    ports = [f"--dashboard-agent-listen-port={free_port()}"]
    return [*ports, f"--ray-client-server-port={free_port()}"] if head else ports


def _ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


@contextmanager
def ray_head(tmp_dir: Path, num_cpus: int = 4, extra_env: dict | None = None):
    """Yield (gcs_address, dashboard_url, env) of a fresh head node; stop it afterwards.
    `extra_env` reaches the node's processes (Ray workers) but not this process."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    port, dash = free_port(), free_port()
    # RAY_ADDRESS reaches the node's own processes too: Ray Train's PlacementGroupCleaner asks
    # the State API with no address, which refuses to guess when the machine runs two Rays.
    env = {**os.environ, **RAY_ENV, "RAY_TMPDIR": str(tmp_dir), **(extra_env or {})}
    env["RAY_ADDRESS"] = f"127.0.0.1:{port}"
    cmd = [
        _ray_bin(),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        f"--num-cpus={num_cpus}",
        "--num-gpus=0",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--temp-dir={tmp_dir}",
        "--disable-usage-stats",
        *own_ports(head=True),
    ]
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=120)
    address = env["RAY_ADDRESS"]
    try:
        _wait_dashboard(dash)
        yield address, f"http://127.0.0.1:{dash}", env
    finally:
        _stop(tmp_dir)


def node_processes(tmp_dir: Path) -> list:
    """The psutil processes of the Ray node started with `tmp_dir`: the GCS, raylet and
    dashboard carry it on their command line; workers and dashboard modules are their
    descendants. (Other Rays on the machine, e.g. a developer's, are not touched.)"""
    import psutil

    roots = [
        p
        for p in psutil.process_iter(["cmdline"])
        if str(tmp_dir) in " ".join(p.info["cmdline"] or [])
    ]
    mine = {p.pid: p for p in roots}
    for root in roots:
        with contextlib.suppress(psutil.Error):
            mine.update({c.pid: c for c in root.children(recursive=True)})
    return list(mine.values())


def train_workers(tmp_dir: Path) -> list:
    """The Ray Train worker processes of that node."""
    import psutil

    found = []
    for proc in node_processes(tmp_dir):
        with contextlib.suppress(psutil.Error):
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                found.append(proc)
    return found


def _stop(tmp_dir: Path) -> None:
    """Stop only this head's processes (`ray stop` would stop every Ray on the machine)."""
    import psutil

    mine = node_processes(tmp_dir)
    for proc in mine:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(mine, timeout=5)  # test processes: no need to be patient
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()


def _wait_dashboard(port: int, timeout_s: float = 60) -> None:
    import urllib.request

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"Ray dashboard on port {port} did not come up in {timeout_s}s")


def submit_job(dashboard: str, entrypoint: list[str], cwd: Path, env: dict, timeout: float):
    """`ray job submit --address <dashboard> --working-dir . -- <entrypoint>`, run to its end.

    The head hands a submission to its dashboard agent and gives up after 10 s when that agent
    does not answer ("No available agent to submit job, please try again later."), which a
    loaded 2-core machine can cause: as the message says, submit again (three tries)."""
    cmd = [_ray_bin(), "job", "submit", "--address", dashboard, "--working-dir", ".", "--"]
    for attempt in range(3):
        proc = subprocess.run(
            [*cmd, *entrypoint], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
        )
        if "No available agent to submit job" not in proc.stdout + proc.stderr or attempt == 2:
            return proc
        time.sleep(5)
    raise AssertionError("unreachable")
