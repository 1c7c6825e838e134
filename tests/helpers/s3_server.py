"""A real S3-compatible server on loopback for tests: moto's server mode in a subprocess.

    with MotoServer() as server:            # or the `moto_server` pytest fixture
        server.endpoint_url                 # "http://127.0.0.1:<port>"

`MotoServer(auth=True)` enforces IAM authentication from the first request
(INITIAL_NO_AUTH_ACTION_COUNT=0): any key pair is rejected, which is how the wrong-credentials
tests get a real 403.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing-access-key",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
    "AWS_SESSION_TOKEN": "",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata probes
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    def __init__(self, auth: bool = False, start_timeout_s: float = 30.0) -> None:
        self.auth = auth
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MotoServer:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update({k: v for k, v in FAKE_CREDENTIALS.items() if v})
        if self.auth:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
        last = None
        for _ in range(3):  # the free port can be taken between probe and bind: retry
            self.port = free_port()
            # Its log goes to a file: moto writes a line per request, and a pipe nobody reads
            # fills after about 450 requests and then blocks the server for good.
            self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop)
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=subprocess.DEVNULL,
                stderr=self.log,
                env=env,
            )
            deadline = time.monotonic() + self.start_timeout_s
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    urllib.request.urlopen(f"{self.endpoint_url}/moto-api/", timeout=1).close()
                    return self
                except OSError as exc:
                    last = exc
                    time.sleep(0.1)
            self.log.seek(0)
            last = f"{last}; its log ends: {self.log.read()[-2000:].decode(errors='replace')}"
            self.stop()
        raise RuntimeError(f"moto server did not start: {last}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.log.close()
            self.proc = None

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
