"""systemd notifications (broker/sdnotify.py): a `homing serve` started as `Type=notify` says
when it is ready and when it stops, keeps systemd's watchdog fed while it serves, and withholds
the keep-alive while a commit is stuck. The "systemd" here is a real datagram socket."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from broker.sdnotify import Notifier
from tests.procs import BrokerProcess, homing, homing_cmd, lines
from tests.storage.test_catch_up import chat, split_dirs
from tests.storage.test_layout import older_layout


class Listener:
    """The systemd side: a datagram socket, read by a thread that timestamps each notification
    as it arrives."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.address = str(path)
        self.got: list[tuple[float, dict[str, str]]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:
                return  # closed
            if not data:
                return  # shut down
            fields = dict(line.split("=", 1) for line in data.decode().split("\n"))
            self.got.append((time.monotonic(), fields))

    def wait_for(self, done, timeout: float = 20.0) -> dict[str, str]:
        """Wait for a notification with `done(fields)`; return its fields."""
        deadline = time.monotonic() + timeout
        while True:
            for _, fields in list(self.got):
                if done(fields):
                    return fields
            assert time.monotonic() < deadline, f"none in {timeout} s; the last: {self.got[-8:]}"
            time.sleep(0.01)

    def pings(self) -> list[float]:
        return [t for t, fields in list(self.got) if fields.get("WATCHDOG") == "1"]

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._reader.join(5)


@pytest.fixture
def listener(tmp_path):
    sock_dir = Path(f"/tmp/homing-notify-{os.getpid()}-{time.monotonic_ns()}")
    sock_dir.mkdir()  # short: a socket's path must fit 108 bytes, a pytest tmp_path may not
    listener = Listener(sock_dir / "notify")
    yield listener
    listener.close()
    (sock_dir / "notify").unlink()
    sock_dir.rmdir()


def broker_env(listener: Listener, watchdog_usec: int | None) -> dict[str, str]:
    env = {**os.environ, "NOTIFY_SOCKET": listener.address}
    env.pop("WATCHDOG_PID", None)
    env.pop("WATCHDOG_USEC", None)
    if watchdog_usec is not None:
        env["WATCHDOG_USEC"] = str(watchdog_usec)
    return env


def test_ready_once_listening_then_watchdog_status_and_stopping(tmp_path, listener):
    """`STATUS=opening DIR` before the store opens; `READY=1` only once the port takes
    connections; `WATCHDOG=1` every half timeout; the stats line's `STATUS`; `STOPPING=1` on
    SIGTERM, then a clean exit."""
    bp = BrokerProcess(tmp_path / "data", "--stats-interval", "1",
                       env=broker_env(listener, 400_000))
    bp.spawn()  # not `start`: READY must come before anything probes the port
    try:
        ready = listener.wait_for(lambda f: "READY" in f)
        socket.create_connection(("127.0.0.1", bp.port), timeout=2).close()  # listening now
        assert listener.got[0][1] == {"STATUS": f"opening {bp.data}"}, listener.got
        assert ready == {"READY": "1", "STATUS": f"serving 127.0.0.1:{bp.port}"}
        [sent] = lines(homing("send", "--to", "bob", "hi",
                              env={"HOMING_SERVER": bp.server, "HOMING_TOKEN": bp.token("shop")}))
        stats = listener.wait_for(lambda f: " lsn " in f.get("STATUS", "") and
                                  int(f["STATUS"].rsplit(" ", 1)[1]) >= sent["lsn"])
        assert stats["STATUS"].startswith(f"serving 127.0.0.1:{bp.port}: "), stats
        start = len(listener.pings())
        listener.wait_for(lambda f: len(listener.pings()) >= start + 5)
        assert max(gaps(listener.pings())) < 0.4  # each well inside the 0.4 s timeout
        bp.proc.send_signal(signal.SIGTERM)
        stopping = listener.wait_for(lambda f: "STOPPING" in f)
        assert stopping == {"STOPPING": "1", "STATUS": "stopping: draining connections"}
        assert bp.proc.wait(20) == 0
    finally:
        bp.kill()


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


def extended_before_ready(listener) -> dict[str, str]:
    """Wait for `READY=1`; return the first notification that extended the start timeout,
    which must have come before it."""
    listener.wait_for(lambda f: "READY" in f)
    fields = [f for _, f in listener.got]
    extended = [f for f in fields if "EXTEND_TIMEOUT_USEC" in f]
    assert extended and fields.index(extended[0]) < fields.index(
        next(f for f in fields if "READY" in f))
    return extended[0]


def test_a_rebuild_before_serving_says_how_far_it_got_and_extends_the_start_timeout(
        tmp_path, listener):
    """A directory of an older layout is rebuilt before `READY=1`: meanwhile systemd hears
    `EXTEND_TIMEOUT_USEC` with a `STATUS=rebuilding projections: N of M events`, and the log
    has `projections_rebuild_progress`."""
    bp = BrokerProcess(tmp_path / "data", env=broker_env(listener, None))
    last = older_layout(bp.data, 20_000)
    bp.spawn()
    try:
        rebuilding = extended_before_ready(listener)
        assert rebuilding["EXTEND_TIMEOUT_USEC"] == "30000000"
        assert rebuilding["STATUS"].startswith("rebuilding projections: ")
        assert rebuilding["STATUS"].endswith(f" of {last:,} events")
    finally:
        bp.kill()
    progress = [e for e in bp.log_events() if e["event"] == "projections_rebuild_progress"]
    assert progress and progress[0]["of"] == last and 0 < progress[0]["events"] <= last


def test_projections_behind_the_log_are_caught_up_before_serving(tmp_path, listener):
    """A directory whose log goes past its projections' `applied_lsn` is caught up before
    `READY=1`: systemd hears `EXTEND_TIMEOUT_USEC` with `STATUS=catching up projections: N of
    M events`, and the log has `projections_behind_log` (warning) then
    `projections_caught_up`."""
    _, behind, k, n = split_dirs(tmp_path, lambda s: chat(s, 2, "a"), lambda s: chat(s, 3, "b"))
    bp = BrokerProcess(behind, env=broker_env(listener, None))
    bp.spawn()
    try:
        assert extended_before_ready(listener) == {
            "EXTEND_TIMEOUT_USEC": "30000000",
            "STATUS": f"catching up projections: {n - k} of {n - k} events"}
    finally:
        bp.kill()
    events = {e["event"]: e for e in bp.log_events()}
    assert events["projections_behind_log"]["level"] == "warning"
    assert (events["projections_behind_log"]["applied_lsn"], events["projections_behind_log"][
        "log_lsn"], events["projections_behind_log"]["events"]) == (k, n, n - k)
    done = events["projections_caught_up"]
    assert (done["from_lsn"], done["to_lsn"], done["events"]) == (k + 1, n, n - k)


HOLD_WRITE_LOCK = """
import sys, lmdb
env = lmdb.open(sys.argv[1], max_dbs=64, map_size=1 << 20)
txn = env.begin(write=True)   # LMDB's one writer: every commit of the broker waits for it
print("held", flush=True)
sys.stdin.readline()
txn.abort()
"""


def test_the_keepalive_is_withheld_while_a_commit_is_stuck(tmp_path, listener):
    """Another process holds LMDB's write lock, so the broker's next commit cannot begin: once
    it has waited the whole watchdog timeout, the keep-alives stop (`watchdog_withheld`); when
    the lock is let go, the send is accepted and they resume (`watchdog_resumed`)."""
    timeout = 0.3
    with BrokerProcess(tmp_path / "data", env=broker_env(listener, int(timeout * 1e6))) as bp:
        listener.wait_for(lambda f: len(listener.pings()) >= 3)
        holder = subprocess.Popen([sys.executable, "-c", HOLD_WRITE_LOCK, str(bp.data)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline() == "held\n"
            send = subprocess.Popen(
                [*homing_cmd(), "send", "--to", "bob", "--server", bp.server, "stuck"],
                env={**os.environ, "HOMING_TOKEN": bp.token("shop")},
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            deadline = time.monotonic() + 20
            while "watchdog_withheld" not in {e["event"] for e in bp.log_events()}:
                assert time.monotonic() < deadline, bp.log_tail()
                time.sleep(0.02)
            withheld = time.monotonic()
            time.sleep(1.0)
            assert send.poll() is None  # not accepted: its commit cannot begin
            released = time.monotonic()
        finally:
            holder.stdin.write("go\n")
            holder.stdin.flush()
            holder.wait(10)
        _, err = send.communicate(timeout=20)
        assert send.returncode == 0, err
        listener.wait_for(lambda f: listener.pings()[-1] > released)
        # The log's own thread writes the line: it may come a moment after the ping.
        deadline = time.monotonic() + 10
        while "watchdog_resumed" not in {e["event"] for e in bp.log_events()}:
            assert time.monotonic() < deadline, bp.log_tail()
            time.sleep(0.02)
    assert not [t for t in listener.pings() if withheld < t < released]
    events = [e["event"] for e in bp.log_events()]
    assert events.index("watchdog_withheld") < events.index("watchdog_resumed")


# -- the notifier alone -------------------------------------------------------------------------

def test_no_notify_socket_means_no_notifier():
    assert Notifier.from_environ({}) is None
    assert Notifier.from_environ({"NOTIFY_SOCKET": ""}) is None
    assert Notifier.from_environ({"NOTIFY_SOCKET": "vsock:2:1234"}) is None  # not a path


@pytest.fixture
def abstract():
    """A datagram socket in the abstract namespace: its `@name`, and the socket."""
    name = f"homing-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        yield "@" + name, sock


def test_an_abstract_socket_and_its_watchdog(abstract):
    address, sock = abstract
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "2500000",
                                      "WATCHDOG_PID": str(os.getpid())})
    assert notifier is not None and notifier.watchdog_s == 2.5
    assert notifier.notify(READY=1, STATUS="serving")
    assert sock.recv(100) == b"READY=1\nSTATUS=serving"


@pytest.mark.parametrize("env", [
    {"WATCHDOG_USEC": "2500000", "WATCHDOG_PID": "1"},  # meant for another process
    {"WATCHDOG_USEC": "soon"},
    {"WATCHDOG_USEC": "0"},
])
def test_no_watchdog_unless_it_is_ours_and_well_formed(env):
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": "/run/none", **env})
    assert notifier is not None and notifier.watchdog_s is None


def test_a_socket_that_is_gone_is_not_an_error(tmp_path):
    notifier = Notifier(str(tmp_path / "gone"))
    assert notifier.notify(READY=1) is False
    assert notifier.notify(WATCHDOG=1) is False  # never raised


def test_a_value_with_a_line_break_goes_out_on_one_line(abstract):
    address, sock = abstract
    assert Notifier(address).notify(STATUS="opening /srv/odd\nname\r\n", READY=1)
    assert sock.recv(100) == b"STATUS=opening /srv/odd name\nREADY=1"
