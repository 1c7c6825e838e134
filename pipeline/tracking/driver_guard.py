"""Ends the MLflow run of a driver that died without ending it (SIGKILL, the OOM killer).

A driver ends its run itself when it finishes, fails or is interrupted; a killed one cannot, and
its run would show RUNNING until somebody relaunched it. So the training driver starts this
module as a small process of its own session (a kill of the driver's process group spares it)
with a pipe on its stdin:

    guard = DriverGuard.start(tracking_uri, run_id, run_name, resume_command)
    ...                       # train; end the MLflow run
    guard.stop()              # "done": the driver ended the run itself

When the pipe closes without "done", the driver is gone: if the run is still RUNNING the guard
sets it KILLED and tags why and how to resume (`shike.end_reason`), then exits. The tracking URI
travels in the environment, not on the command line (`ps` shows command lines).
"""

from __future__ import annotations

import os
import subprocess
import sys

TAG_END_REASON = "shike.end_reason"
_URI_ENV = "SHIKE_GUARD_TRACKING_URI"


class DriverGuard:
    def __init__(self, process: subprocess.Popen) -> None:
        self._process = process

    @classmethod
    def start(
        cls, tracking_uri: str, run_id: str, run_name: str, resume_command: str
    ) -> DriverGuard:
        process = subprocess.Popen(
            [sys.executable, "-m", __name__, run_id, run_name, str(os.getpid()), resume_command],
            stdin=subprocess.PIPE,
            env={**os.environ, _URI_ENV: tracking_uri},
            start_new_session=True,
        )
        return cls(process)

    def stop(self) -> None:
        """The driver ended its run: let the guard go."""
        if self._process.poll() is None:
            try:
                self._process.stdin.write(b"done\n")
                self._process.stdin.close()
            except OSError:
                pass
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()


def end_orphaned_run(tracking_uri: str, run_id: str, reason: str) -> bool:
    """Set run `run_id` KILLED with `reason` if it is still RUNNING; whether it was.

    Imports MLflow's client alone, after the driver's death (the guard idles as a bare
    interpreter): not `runs`, which brings torch in and would delay the KILLED by seconds, more
    on a loaded node."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.store import checked_value

    client = MlflowClient(tracking_uri=tracking_uri)
    if client.get_run(run_id).info.status != "RUNNING":
        return False
    client.set_tag(run_id, TAG_END_REASON, checked_value("tag", TAG_END_REASON, reason))
    client.set_terminated(run_id, status="KILLED")
    return True


def main(argv: list[str]) -> int:
    run_id, run_name, driver_pid, resume_command = argv
    if sys.stdin.buffer.readline().strip() == b"done":
        return 0
    reason = (
        f"the driver (pid {driver_pid}) died without ending run '{run_name}'; its last "
        f"checkpoint is kept: relaunch to resume: {resume_command}"
    )
    if end_orphaned_run(os.environ[_URI_ENV], run_id, reason):
        print(f"[shike] {reason}; MLflow run {run_id} set KILLED", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
