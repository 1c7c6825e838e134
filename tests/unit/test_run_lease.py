"""The run lease (pipeline.distributed.run_lease): one live launch per run name, on a folder and on S3
(moto's server on loopback), and a dead launch's lease taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from pipeline.distributed import run_lease
from pipeline.distributed.run_lease import LeaseHeldError
from pipeline.storage import s3_client


def _die_holding(storage: str, run_name: str) -> int:
    """Acquire the lease in a child process that is then killed (SIGKILL: no release); its pid."""
    code = (
        "import os, signal, sys; from pipeline.distributed import run_lease; "
        f"run_lease.acquire({storage!r}, {run_name!r}, ttl_s=3600); "
        "print(os.getpid(), flush=True); os.kill(os.getpid(), signal.SIGKILL)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9, proc.stderr
    return int(proc.stdout.split()[0])


def test_folder_lease_refuses_a_second_launch_and_names_the_owner(tmp_path):
    lease = run_lease.acquire(str(tmp_path), "run-a", command="python -m jobs.train ...")
    assert lease.took_over is None
    with pytest.raises(LeaseHeldError) as refused:
        run_lease.acquire(str(tmp_path), "run-a")
    assert f"run 'run-a' is already being trained by pid {os.getpid()} on " in str(refused.value)
    assert refused.value.owner["launch_id"] == lease.owner["launch_id"]
    with run_lease.acquire(str(tmp_path), "run-b"):  # another run name is another lease
        pass
    lease.release()
    with run_lease.acquire(str(tmp_path), "run-a") as again:
        assert again.took_over is None  # released cleanly: nobody to take over


def test_folder_lease_of_a_killed_launch_is_taken_over(tmp_path):
    dead_pid = _die_holding(str(tmp_path), "run-a")
    with run_lease.acquire(str(tmp_path), "run-a") as lease:
        assert lease.took_over is not None and lease.took_over["pid"] == dead_pid


def test_s3_lease_refuses_a_live_owner_and_takes_over_a_stale_one(s3_env):
    storage = s3_env.uri("runs")
    lease = run_lease.acquire(storage, "run-a", s3=s3_env.options, ttl_s=60)
    with pytest.raises(LeaseHeldError, match=f"pid {os.getpid()} on "):
        run_lease.acquire(storage, "run-a", s3=s3_env.options, ttl_s=60)
    lease.release()
    assert s3_client(s3_env.options).list_objects_v2(Bucket=s3_env.bucket).get("KeyCount", 0) == 0

    # A launch on another host that stopped beating 2 minutes ago: stale after ttl_s = 60.
    key = "runs/run-a/.shike-lease"
    stale = {"host": "gone-host", "pid": 1, "launch_id": "x", "started": 0, "heartbeat": 0}
    stale["heartbeat"] = time.time() - 120
    s3_client(s3_env.options).put_object(Bucket=s3_env.bucket, Key=key, Body=json.dumps(stale))
    with run_lease.acquire(storage, "run-a", s3=s3_env.options, ttl_s=60) as taken:
        assert taken.took_over == stale
        held = json.loads(
            s3_client(s3_env.options).get_object(Bucket=s3_env.bucket, Key=key)["Body"].read()
        )
        assert held["launch_id"] == taken.owner["launch_id"]


def test_s3_lease_heartbeat_keeps_a_live_owner(s3_env):
    storage = s3_env.uri("runs")
    with run_lease.acquire(storage, "run-a", s3=s3_env.options, ttl_s=2):
        time.sleep(3)  # longer than ttl_s: only the heartbeat (every ttl_s / 4) keeps it fresh
        with pytest.raises(LeaseHeldError):
            run_lease.acquire(storage, "run-a", s3=s3_env.options, ttl_s=2)


def test_s3_stale_lease_is_taken_over_by_exactly_one_of_two_launches(s3_env):
    """Both find it stale; the conditional write on its ETag lets one of them through."""
    key = "runs/run-a/.shike-lease"
    stale = {"host": socket.gethostname(), "pid": _dead_pid(), "launch_id": "x", "started": 0}
    stale["heartbeat"] = time.time()  # fresh, but its process is gone: stale at once
    s3_client(s3_env.options).put_object(Bucket=s3_env.bucket, Key=key, Body=json.dumps(stale))
    outcomes: list[object] = []
    start = threading.Barrier(2)

    def launch() -> None:
        start.wait()
        try:
            outcomes.append(run_lease.acquire(s3_env.uri("runs"), "run-a", s3=s3_env.options))
        except LeaseHeldError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=launch) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [o for o in outcomes if isinstance(o, run_lease.RunLease)]
    assert len(won) == 1 and len(outcomes) == 2, outcomes
    assert won[0].took_over == stale
    won[0].release()


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return int(proc.stdout)
