"""The bench harness: a broker in its own process, load workers in theirs, and /proc readings.

`BrokerProcess` runs `homing serve` on a fresh temporary data directory and a free loopback port
(log level warning, send-rate limits raised so the benchmark measures the broker, not its
throttle). `Workers` starts load-generator processes (multiprocessing, spawn), each running one
function of `bench.loadgen` with its own spec; they connect, report ready, wait for one common
go, run, report their figures, and exit when told. CPU time of every process comes from
/proc/PID/stat, so we can show that the clients were not the bottleneck.
"""

from __future__ import annotations

import contextlib
import functools
import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from multiprocessing.connection import wait as wait_pipes
from pathlib import Path
from typing import Any

from bench import placement
from broker import tokens

CLK_TCK = os.sysconf("SC_CLK_TCK")
UNLIMITED_RATE = 1e9
"""The --send-rate and --user-send-rate every bench broker runs with (the limits are off)."""


def say(text: str) -> None:
    """A note on stderr, on a line of its own: on a terminal the progress line (bench/cli.py,
    `Progress`) may be drawn there, so it is cleared first."""
    sys.stderr.write(("\r\033[K" if sys.stderr.isatty() else "") + text + "\n")
    sys.stderr.flush()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds used so far by process `pid` (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


def machine_busy_seconds() -> tuple[float, float]:
    """CPU seconds all cores spent busy since boot, and the part of them that was steal.

    From /proc/stat: busy is all but idle and iowait; steal is the time a virtual machine's
    CPUs were ready to run but the hypervisor ran something else (0 on bare metal).
    """
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLK_TCK, fields[7] / CLK_TCK


def rss_mib(pid: int) -> float:
    """Resident set size of `pid` in MiB (VmRSS of /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _prctl() -> Any:
    """libc's `prctl` on Linux when called from the main thread, else None. Looked up in the
    bench's process: a `preexec_fn` runs between fork and exec, where an import or a library
    load may wait for ever on a lock another thread of the parent held at the fork.

    Linux sends the PR_SET_PDEATHSIG signal when the *thread* that forked the child ends, not
    its process: a broker started from a worker thread (trio's `to_thread` ends its idle
    threads after 10 s) was sent SIGTERM as that thread ended, mid-run, and exited at once.
    The main thread ends only with the bench, so only a broker it starts is armed."""
    if sys.platform != "linux" or threading.current_thread() is not threading.main_thread():
        return None
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl


def _broker_child(bench_pid: int, prctl: Any, cpus: list[int] | None) -> None:
    """In the broker's process before it runs `homing serve`: be sent SIGTERM when the bench
    dies (`prctl`: Linux's, None elsewhere or off the main thread, `_prctl`), then go on `cpus`
    (None: any).

    The bench ends its broker itself on Ctrl-C and SIGTERM; killed (SIGKILL, the OOM killer,
    a CI job's hard timeout) it cannot, and its broker served on, busy, for ever."""
    if prctl is not None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != bench_pid:  # the bench died before that: no signal will come
            os.kill(os.getpid(), signal.SIGTERM)
    if cpus is not None:
        placement.pin_self(cpus)


class BrokerError(RuntimeError):
    """The broker under test did not start (it exited, or did not listen in time)."""


class BrokerProcess:
    """`homing serve` as a subprocess on a temporary data directory; a context manager."""

    def __init__(self, *, window: int = 256, extra: list[str] | None = None,
                 keep_data: bool = False, cpus: list[int] | None = None) -> None:
        self.window = window
        self.cpus = cpus  # bench.placement: the CPUs the broker runs on (None: any)
        self.extra = extra or []
        self.keep_data = keep_data or bool(os.environ.get("HOMING_BENCH_KEEP"))
        self.data = Path(tempfile.mkdtemp(prefix="homing-bench-"))
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.secret = b""
        self.argv: list[str] = []

    @property
    def server(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> BrokerProcess:
        homing = Path(sys.executable).with_name("homing")
        cmd = [str(homing)] if homing.exists() else [sys.executable, "-m", "broker.cli"]
        self.argv = [*cmd, "serve", "--data", str(self.data), "--port", str(self.port),
                     "--log-level", "warning", "--log-format", "json",
                     "--window", str(self.window), "--send-rate", str(UNLIMITED_RATE),
                     "--user-send-rate", str(UNLIMITED_RATE), *self.extra]
        self.log = open(self.data.with_suffix(".log"), "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT,
                                     preexec_fn=functools.partial(_broker_child, os.getpid(),
                                                                  _prctl(), self.cpus))
        try:
            self._wait_listening()
            self.secret = tokens.load_secret(self.data)
        except BaseException as exc:
            # Not started: `with` calls no __exit__, so stop it here (a broker still starting
            # was left running), keeping its data and log unless the run was interrupted.
            self.__exit__(type(exc), exc, None)
            raise
        return self

    def _wait_listening(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrokerError(f"the broker exited with {self.proc.returncode}"
                                  f"{self._last_words()}")
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=0.2):
                return
            time.sleep(0.05)
        raise BrokerError(f"the broker did not listen on {self.port} within {timeout:g} s"
                          f"{self._last_words()}")

    def _last_words(self) -> str:
        """": " and the last line of the broker's log (the message of a JSON line), or ""."""
        self.log.flush()
        try:
            lines = self.data.with_suffix(".log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        last = next((line.strip() for line in reversed(lines) if line.strip()), "")
        with contextlib.suppress(ValueError, AttributeError):
            entry = json.loads(last)
            last = entry.get("message") or entry.get("event") or last
        return f": {last[:300]}" if last else ""

    def token(self, user: str) -> str:
        """A fresh user token for `user`, signed with this broker's secret."""
        return tokens.issue(self.secret, user, "user", 3600)

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def rss_mib(self) -> float:
        return rss_mib(self.pid)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "log", None) is not None:
            self.log.close()
        if not self.keep_data:
            shutil.rmtree(self.data, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.unlink(self.data.with_suffix(".log"))

    def __enter__(self) -> BrokerProcess:
        return self.start()

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        # A failure keeps the broker's log and data to look at; an interruption (Ctrl-C, or
        # SIGTERM as SystemExit) is none, so it leaves nothing behind (HOMING_BENCH_KEEP=1
        # keeps them all the same).
        if exc_type is not None and not issubclass(exc_type, KeyboardInterrupt | SystemExit):
            self.keep_data = True
        self.stop()
        if self.keep_data and exc_type is not None:
            say(f"broker data and log kept: {self.data} ({self.data}.log)")


def _worker_main(target: str, spec: dict, pipe: Any, cpus: list[int] | None,
                 sched: str) -> None:
    """Entry point of a load process: run `bench.loadgen.<target>(spec, pipe)` on `cpus`, under
    the scheduling policy `sched` (bench.placement)."""
    import importlib

    # Ctrl-C at a terminal reaches every process of the group: the bench ends its load
    # processes itself (Workers.close), so they do not each print a KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    placement.pin_self(cpus)
    placement.set_sched(sched)
    module, _, name = target.rpartition(".")
    fn = getattr(importlib.import_module(module), name)
    try:
        fn(spec, pipe)
    except BaseException as exc:
        with contextlib.suppress(Exception):
            pipe.send(("error", "".join(traceback.format_exception(exc))[-3000:]))
        raise


class WorkerError(RuntimeError):
    """A load process failed or did not answer in time."""


class Workers:
    """A set of load processes driven in lock step: ready, go, done, exit."""

    def __init__(self, jobs: list[tuple[str, dict]], progress: Any = None,
                 cpus: list[int] | None = None, sched: str = "normal") -> None:
        ctx = multiprocessing.get_context("spawn")
        self.pipes = []
        self.procs = []
        self.progress = progress
        for target, spec in jobs:
            ours, theirs = ctx.Pipe()
            p = ctx.Process(target=_worker_main, args=(target, spec, theirs, cpus, sched),
                            daemon=True)
            p.start()
            theirs.close()
            self.pipes.append(ours)
            self.procs.append(p)

    def gather(self, want: str, timeout: float, label: str = "") -> list[Any]:
        """Wait for every process to send `(want, payload)`; return the payloads in order."""
        out: list[Any] = [None] * len(self.pipes)
        waiting = dict(enumerate(self.pipes))
        deadline = time.monotonic() + timeout
        started = time.monotonic()
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerError(f"{len(waiting)} load process(es) sent no {want!r} "
                                  f"within {timeout:g} s")
            ready = wait_pipes(list(waiting.values()), timeout=min(left, 0.5))
            if self.progress is not None:
                self.progress(label or want, time.monotonic() - started,
                              len(self.pipes) - len(waiting), len(self.pipes))
            for pipe in ready:
                i = next(k for k, v in waiting.items() if v is pipe)
                try:
                    kind, payload = pipe.recv()
                except EOFError:
                    raise WorkerError(f"load process {i} died ({self._ending(i)})") from None
                if kind == "error":
                    raise WorkerError(f"load process {i}: {payload}")
                if kind != want:
                    raise WorkerError(f"load process {i} sent {kind!r}, expected {want!r}")
                out[i] = payload
                del waiting[i]
        return out

    def _ending(self, i: int) -> str:
        """How load process `i`, whose pipe has closed, ended: "killed by SIGKILL", "exit 1".
        Its pipe may close before it is reaped: its exit status is None until then."""
        proc = self.procs[i]
        proc.join(5)
        code = proc.exitcode
        if code is None:
            return "its pipe closed, the process still runs"
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"killed by {signal.Signals(-code).name}"
        return f"exit {code}"

    def broadcast(self, message: Any) -> None:
        for pipe in self.pipes:
            pipe.send(message)

    def ask(self, message: Any, want: str, timeout: float, label: str = "") -> list[Any]:
        """Send `message` to every process and gather their `want` answers; a process that
        has died is a WorkerError saying how it ended, whether its pipe broke on the send or
        closed on the read."""
        for i, pipe in enumerate(self.pipes):
            try:
                pipe.send(message)
            except OSError:  # BrokenPipeError, ConnectionResetError: its end is closed
                raise WorkerError(f"load process {i} died ({self._ending(i)})") from None
        return self.gather(want, timeout, label)

    def dead(self) -> dict[int, str]:
        """How each process that has ended ended, by index ("killed by SIGKILL", "exit 1")."""
        return {i: self._ending(i) for i, p in enumerate(self.procs) if p.exitcode is not None}

    def cpu(self) -> list[float]:
        return [cpu_seconds(p.pid) for p in self.procs]

    def close(self, at_once: bool = False) -> None:
        """Tell each process to exit and wait for it (10 s at most), or, `at_once`, end them
        now: after a failure or an interruption they may be in a phase nobody waits for."""
        for pipe in self.pipes:
            with contextlib.suppress(OSError, BrokenPipeError):
                pipe.send(("exit", None))
        if at_once:
            for p in self.procs:
                p.terminate()
        for p in self.procs:
            p.join(5 if at_once else 10)
            if p.is_alive():
                p.terminate()
                p.join(5)
        for pipe in self.pipes:
            pipe.close()

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(at_once=exc_type is not None)


def run_phase(workers: Workers, *, timeout: float, pids: dict[str, int], label: str,
              go: Any = None) -> tuple[list[Any], dict[str, float], float]:
    """Say go, wait for every `done`, and return (payloads, CPU% per named pid, wall seconds).

    CPU% is CPU seconds over wall seconds of the phase, per process: 100 is one core busy;
    `other` is the rest of the machine's busy time and `steal` the part of it that was steal.
    """
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    workers_before = workers.cpu()
    busy_before, steal_before = machine_busy_seconds()
    started = time.monotonic()
    workers.broadcast(("go", go))
    results = workers.gather("done", timeout, label)
    wall = time.monotonic() - started
    cpu = {name: 100 * (cpu_seconds(pid) - before[name]) / wall for name, pid in pids.items()}
    for i, (b, a) in enumerate(zip(workers_before, workers.cpu(), strict=True)):
        cpu[f"load{i}"] = 100 * (a - b) / wall
    # Everything else on the machine (other people's jobs, the orchestrator, and on a VM the
    # hypervisor's steal): a shared machine shows up here, and the figures of such a run are
    # worth less. `steal` is the part of `other` the hypervisor took, so it is not summed again.
    busy_after, steal_after = machine_busy_seconds()
    cpu["other"] = max(0.0, 100 * (busy_after - busy_before) / wall - sum(cpu.values()))
    cpu["steal"] = 100 * (steal_after - steal_before) / wall
    return results, cpu, wall
