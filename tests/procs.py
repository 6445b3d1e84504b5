"""Helpers for tests that run `homing` as real child processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HOMING = [sys.executable, "-m", "broker.cli"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, timeout: float = 15.0, proc: subprocess.Popen | None = None) -> None:
    """Block until something accepts on 127.0.0.1:`port`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"broker exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port} after {timeout} s")


class BrokerProcess:
    """`homing serve` as a child process on a fixed data directory and port."""

    def __init__(self, data: Path, port: int | None = None, *extra: str) -> None:
        self.data, self.port, self.extra = Path(data), port or free_port(), extra
        self.proc: subprocess.Popen | None = None
        self.log = self.data.parent / f"broker-{self.port}.log"

    @property
    def server(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> BrokerProcess:
        self.data.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*HOMING, "serve", "--data", str(self.data), "--port", str(self.port),
                 "--log-format", "json", *self.extra],
                stdout=log, stderr=log, cwd=self.data.parent)
        wait_listening(self.port, proc=self.proc)
        return self

    def kill(self) -> None:
        """SIGKILL, and reap."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait for a clean exit; its status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def rss_kib(self) -> int:
        """Resident set size of the broker process in KiB."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def __enter__(self) -> BrokerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


def homing(*args: str, env: dict | None = None, input: str | None = None,
           timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess:
    """Run the `homing` command; stdout/stderr as text."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([*HOMING, *args], env=full_env, input=input, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"homing {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
    return proc


def lines(proc: subprocess.CompletedProcess) -> list[dict]:
    """The JSON objects a command printed, one per line."""
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
