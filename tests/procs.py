"""Helpers for tests that run `homing` as real child processes."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import trio

from broker import tokens
from broker.client import open_client
from storage.store import Store


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on, for a child broker to bind later.

    A port the kernel picks (bind to 0) is one of its ephemeral ports, which it also hands to
    every outgoing connection: between this pick and the child's bind (or a kill and a restart
    on the same port) a client of the other pytest-xdist worker could take it. So the port
    comes from below the ephemeral range, from this worker's own slice of it, which no
    connection and no other worker is given; where there is no room below the range, the
    kernel's pick as before."""
    for port in _worker_ports():
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # taken, or TIME_WAIT connections of an earlier broker on it
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_ports(tries: int = 64) -> list[int]:
    """Up to `tries` random ports of this xdist worker's slice of 10000 to the ephemeral range's
    start (none if that is too small or unknown)."""
    try:
        first_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return []
    workers = max(int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")), 1)
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    width = (first_ephemeral - 10000) // workers
    if width < 1000:
        return []
    # xdist replaces a crashed worker with one of the next id (gw2 of two workers): without the
    # modulo its slice lay in the ephemeral range, then past 65535. With it, the crashed one's.
    start = 10000 + worker % workers * width
    return random.sample(range(start, start + width), tries)


def homing_cmd() -> list[str]:
    """The `homing` entry point of this environment."""
    exe = Path(sys.executable).with_name("homing")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "broker.cli"]


def rss_kib(pid: int) -> int:
    """Resident set size of process `pid` in KiB (from /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


class BrokerProcess:
    """`homing serve` as a child process on a fixed port; start, kill, restart."""

    def __init__(self, data: Path, *flags: str, port: int | None = None,
                 env: dict[str, str] | None = None,
                 preexec_fn: Callable[[], object] | None = None) -> None:
        self.data = Path(data)
        self.flags = list(flags)
        self.env = env  # the child's whole environment (None: this process's)
        self.preexec_fn = preexec_fn  # run in the child before exec (`nohup`'s SIG_IGN, say)
        self.port = port or free_port()
        self.server = f"127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.secret = tokens.load_secret(self.data)  # create it before the child does
        self.logfile = self.data.parent / f"{self.data.name}-broker.log"

    def token(self, user: str, role: str = "user", ttl: int = 3600) -> str:
        return tokens.issue(self.secret, user, role, ttl)

    def client(self, user: str, device: str = "d1", role: str = "user", **kw):
        return open_client(self.server, self.token(user, role), device, **kw)

    def start(self, timeout: float = 15.0) -> None:
        assert self.proc is None or self.proc.poll() is not None
        self.spawn()
        self.starts += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.03)
        raise RuntimeError(f"broker did not listen within {timeout} s:\n{self.log_tail()}")

    def spawn(self) -> None:
        """Start the child and return at once (`start` also waits until it listens)."""
        with open(self.logfile, "ab") as log:
            self.proc = subprocess.Popen(
                [*homing_cmd(), "serve", "--data", str(self.data), "--port", str(self.port),
                 "--log-format", "json", *self.flags],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=self.env,
                preexec_fn=self.preexec_fn)

    async def astart(self, timeout: float = 15.0) -> None:
        await trio.to_thread.run_sync(self.start, timeout)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM, wait for a clean exit, and return the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    async def aterminate(self, timeout: float = 20.0) -> int:
        return await trio.to_thread.run_sync(self.terminate, timeout)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def log_events(self) -> list[dict]:
        out = []
        for line in self.logfile.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def open_store(self, readonly: bool = False) -> Store:
        return Store.open(str(self.data), readonly=readonly)

    def __enter__(self) -> BrokerProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()



def homing(*args: str, env: dict | None = None, input: str | None = None,
           timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess:
    """Run the `homing` command; stdout/stderr as text."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([*homing_cmd(), *args], env=full_env, input=input,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"homing {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
    return proc


def lines(proc: subprocess.CompletedProcess) -> list[dict]:
    """The JSON objects a command printed, one per line."""
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def as_user(bp: BrokerProcess, user: str, role: str = "user") -> dict:
    """The environment that makes a client command connect to `bp` as `user` with `role`."""
    return {"HOMING_SERVER": bp.server, "HOMING_TOKEN": bp.token(user, role)}


def last_error(stderr: str) -> dict:
    """The JSON error that ends stderr, with no traceback before it."""
    assert "Traceback" not in stderr, stderr
    err = json.loads(stderr.strip().splitlines()[-1])
    assert set(err) == {"error", "code", "message"}, err
    return err


def read_terminal(master: int) -> bytes:
    """All a child wrote to the terminal whose other side (`pty.openpty()`'s slave) is closed,
    read from `master`, which is then closed."""
    drawn = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the other side is closed and all was read
            break
        if not chunk:
            break
        drawn += chunk
    os.close(master)
    return drawn


def check_serves_then_stops(serve: subprocess.Popen, data: Path, port: int) -> None:
    """`serve`, a `homing serve` child on `data` and `port` whose log goes nowhere usable,
    answers three sends of `homing send` in order, then stops cleanly on SIGTERM; it is killed
    whatever happens."""
    try:
        env = {"HOMING_SERVER": f"127.0.0.1:{port}",
               "HOMING_TOKEN": homing("token", "shop", "--data", str(data)).stdout.strip()}
        for i in range(3):
            sent = lines(homing("send", "--to", "bob", "--connect-timeout", "15", f"n{i}",
                                env=env))
            assert sent[0]["seq"] == i + 1
        assert serve.poll() is None
        serve.terminate()
        assert serve.wait(timeout=20) == 0
    finally:
        serve.kill()
        serve.wait()
