"""`homing bench` when a run fails or is interrupted (review of the bench as a user, 2026-12-05).

A scenario that fails (a phase past `--timeout`, a broker that does not start) is said in the
CLI's JSON error, exit 1, and the figures of the scenarios that did finish are still printed and
written; Ctrl-C (SIGTERM) ends the run at once with exit 130 (143), no traceback and nothing
left running or behind. These ran before as a Python traceback that lost every figure, up to
40 s after the failure (the load processes were each given 10 s to finish a phase nobody waited
for), and Ctrl-C printed a traceback of every load process and kept the broker's data directory, and
SIGTERM killed the bench alone, leaving its broker running.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from bench import scenarios
from bench.harness import BrokerProcess, Workers
from tests.waits import wait_until_sync

HOMING = [sys.executable, "-m", "broker.cli", "bench"]
SMALL = ["--procs", "1", "--senders", "2", "--receivers", "2"]


def _env(tmp_path) -> dict:
    """The bench's temporary files (broker data directories, the replay cache) in tmp_path."""
    return {**os.environ, "TMPDIR": str(tmp_path)}


def _left(tmp_path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("homing-bench-"))


def test_load_processes_mid_phase_are_ended_at_once_when_the_run_fails():
    """Leaving the `Workers` block on an exception ends the load processes at once: they are in
    a phase nobody will wait for (it took 10 s per process)."""
    opts = {"pipeline": 64, "placement": None, "load_sched": "normal"}
    with BrokerProcess() as broker:
        jobs = scenarios.client_jobs(broker, senders=2, receivers=2, messages=10_000_000,
                                     procs=2, tag="w")
        specs = [("bench.loadgen.clients", scenarios._spec(broker, job, opts)) for job in jobs]
        workers = Workers(specs)
        with pytest.raises(RuntimeError, match="the run failed"), workers:
            workers.gather("ready", 60)
            workers.broadcast(("go", None))
            time.sleep(0.3)
            started = time.monotonic()
            raise RuntimeError("the run failed")
        assert time.monotonic() - started < 5
        assert not any(p.is_alive() for p in workers.procs)


def test_a_failed_scenario_is_a_json_error_and_the_others_figures_are_kept(tmp_path):
    """A phase past --timeout: the CLI's JSON error naming the scenario, exit 1, soon after the
    timeout; the scenario that finished is in the table and the JSON, the failed one under
    `failed`; the failed broker's data directory and log are kept and named."""
    out = tmp_path / "b.json"
    started = time.monotonic()
    run = subprocess.run([*HOMING, "replay", "throughput", *SMALL, "--messages", "10000000",
                          "--replay-events", "2000", "--timeout", "2", "--json", str(out)],
                         capture_output=True, text=True, timeout=120, env=_env(tmp_path))
    elapsed = time.monotonic() - started
    assert run.returncode == 1, run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    error = json.loads(run.stderr.strip().splitlines()[-1])
    assert error["error"] == "bench_failed" and error["code"] == 0
    assert error["message"].startswith("homing bench: throughput failed:"), error
    assert "within 2 s" in error["message"]
    assert elapsed < 30, elapsed
    assert "| replay" in run.stdout and "| throughput" not in run.stdout
    doc = json.loads(out.read_text())
    assert doc["results"]["replay"]["events_per_s"] > 0
    assert "throughput" not in doc["results"]
    assert "within 2 s" in doc["failed"]["throughput"]
    kept = [p for p in _left(tmp_path) if not p.startswith("homing-bench-replay")]
    assert len(kept) == 2 and "kept" in run.stderr  # its data directory and its log
    assert all(name in run.stderr for name in kept)


def test_a_broker_that_does_not_start_is_said_with_its_own_words(tmp_path):
    """A --broker-arg that homing serve refuses: the bench says what serve said (it printed a
    traceback ending in "the broker exited with 2") and keeps its log."""
    run = subprocess.run([*HOMING, "throughput", *SMALL, "--messages", "100",
                          "--broker-arg=--no-such-flag"],
                         capture_output=True, text=True, timeout=60, env=_env(tmp_path))
    assert run.returncode == 1, run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    error = json.loads(run.stderr.strip().splitlines()[-1])
    assert error["error"] == "bench_failed"
    assert "throughput failed: the broker exited with 2" in error["message"]
    assert "--no-such-flag" in error["message"]
    assert _left(tmp_path), "the broker's log is kept"


def _sigint_default() -> None:
    """In a child before it runs: SIGINT back to its default. A shell's background job (`cmd
    &`, as CI may start the tests) ignores it, and a Python started so never turns it into
    KeyboardInterrupt: the Ctrl-C tests would wait for an end that never comes."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _signalled_mid_run(tmp_path, signal_it) -> tuple[subprocess.Popen, str, float]:
    """Start a long throughput run in a session of its own, wait until its phase runs, call
    `signal_it(proc)`; return the process, its stderr and how long it took to end after."""
    proc = subprocess.Popen([*HOMING, "throughput", *SMALL, "--messages", "10000000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(tmp_path), start_new_session=True,
                            preexec_fn=_sigint_default)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not _group_has_load(proc.pid):
            time.sleep(0.2)
        time.sleep(1.0)  # the phase is running
        signal_it(proc)
        started = time.monotonic()
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc, err, time.monotonic() - started


def test_ctrl_c_ends_the_run_at_once_without_tracebacks_or_leftovers(tmp_path):
    """SIGINT to the whole process group, as a terminal's Ctrl-C sends it: exit 130 within
    seconds, no traceback (each load process printed its KeyboardInterrupt), no process of the
    run left, and no data directory kept (an interruption is no failure to look into)."""
    proc, err, took = _signalled_mid_run(
        tmp_path, lambda proc: os.killpg(proc.pid, signal.SIGINT))
    assert proc.returncode == 130, err[-3000:]
    assert took < 8
    assert "Traceback" not in err, err[-3000:]
    assert "interrupted" in err
    assert _group_ends(proc.pid) == []
    assert _left(tmp_path) == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_bench_alone_stops_its_broker_and_load_too(tmp_path, signum):
    """SIGINT or SIGTERM to the bench process only (`kill -INT PID`, a scheduler stopping the
    job): it ends its broker and load processes itself, at once, exit 128 + the signal's number.
    SIGINT took 36 s; SIGTERM killed the bench alone and left its broker running, and its data
    directory behind."""
    proc, err, took = _signalled_mid_run(tmp_path, lambda proc: proc.send_signal(signum))
    assert proc.returncode == 128 + signum, err[-3000:]
    assert took < 8
    assert "Traceback" not in err, err[-3000:]
    assert _group_ends(proc.pid) == []
    assert _left(tmp_path) == []


def _group(pgid: int) -> list[str]:
    """The live processes of the group (an exited one not yet reaped by init holds nothing)."""
    out = subprocess.run(["pgrep", "-g", str(pgid), "-a"], capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if "<defunct>" not in line]


def _group_ends(pgid: int, timeout: float = 20.0) -> list[str]:
    """The group's live processes once none is left, or at `timeout` s: a process the bench
    ended may take a moment to exit after the bench itself did (a fixed 0.5 s was a guess,
    short on a loaded machine); one left running is still there after 20 s."""
    wait_until_sync(lambda: not _group(pgid), timeout)
    return _group(pgid)


def _group_has_load(pgid: int) -> bool:
    return any("spawn_main" in line for line in _group(pgid))


def test_a_later_round_that_fails_keeps_the_rounds_before_it(tmp_path):
    """--repeat 2 whose second run loses its broker (SIGKILLed mid-run): the failure is said
    with its run, exit 1, and the first run's figures are still in the table and the JSON (a
    later round's failure dropped the rounds before it, after all the time they took)."""
    out = tmp_path / "b.json"
    proc = subprocess.Popen([*HOMING, "throughput", *SMALL, "--messages", "60000", "--repeat",
                             "2", "--timeout", "60", "--json", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(tmp_path), start_new_session=True)
    try:
        # A hang guard, not a timing: the first run takes a few seconds alone, but once, with
        # another test beside it (two workers) and more load, it took more than 90 s.
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not _brokers(proc.pid):
            time.sleep(0.05)
        first = _brokers(proc.pid)
        while time.monotonic() < deadline and _brokers(proc.pid) in ([], first):
            time.sleep(0.05)
        second = _brokers(proc.pid)
        assert second and second != first, (first, second)
        while time.monotonic() < deadline and not _group_has_load(proc.pid):
            time.sleep(0.05)
        os.kill(second[0], signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, stderr[-3000:]
    error = json.loads(stderr.strip().splitlines()[-1])
    assert error["error"] == "bench_failed"
    assert "throughput failed: in run 2 of 2 (the table holds the 1 run(s) before it)" in \
        error["message"], error
    assert "| throughput" in stdout and "! throughput failed: in run 2 of 2" in stdout
    doc = json.loads(out.read_text())
    assert doc["results"]["throughput"]["msgs_per_s"] > 0
    assert doc["failed"]["throughput"].startswith("in run 2 of 2")
    # What its figures are made of is said, not the --repeat asked: the one run kept is under
    # `rounds` as with every --repeat entry, and the note under the table does not call its
    # figures medians of 2 runs (both did, with the entry's `rounds` missing).
    entry = doc["results"]["throughput"]
    assert [r["msgs_per_s"] for r in entry["rounds"]] == [entry["msgs_per_s"]]
    assert ("each figure: the median of 2 runs (lowest-highest in brackets), but throughput: "
            "1 run (run 2 of 2 failed); each ratio") in stdout, stdout


def _brokers(pgid: int) -> list[int]:
    """The pids of the group's `homing serve` processes."""
    return [int(line.split()[0]) for line in _group(pgid) if " serve " in line]


def test_ctrl_c_while_the_replay_log_is_built_leaves_no_half_built_log(tmp_path):
    """Ctrl-C while the replay scenario builds its log: exit 130 and the half-built log is
    removed. It was left in the temporary directory (no later run would reuse it, each
    rebuilds it), as big as the part built."""
    from storage.store import LAYOUT

    log = tmp_path / f"homing-bench-replay-v{LAYOUT.decode()}-3000000"
    proc = subprocess.Popen([*HOMING, "replay", "--replay-events", "3000000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(tmp_path), preexec_fn=_sigint_default)
    try:
        assert wait_until_sync(lambda: (log / "data.mdb").exists(), 60)
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_load_process_killed_mid_phase_fails_the_run_and_says_how_it_ended(tmp_path):
    """A load process SIGKILLed mid-phase: the run fails at once, exit 1, naming the process
    and the signal, with nothing of the run left running (it said `exit None` when the pipe's
    end came before the process was reaped)."""
    proc = subprocess.Popen([*HOMING, "throughput", *SMALL, "--messages", "10000000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(tmp_path), start_new_session=True)
    try:
        assert wait_until_sync(lambda: _group_has_load(proc.pid), 60)
        load = next(int(line.split()[0]) for line in _group(proc.pid) if "spawn_main" in line)
        os.kill(load, signal.SIGKILL)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, err[-3000:]
    error = json.loads(err.strip().splitlines()[-1])
    assert error["error"] == "bench_failed", error
    assert "throughput failed: load process 0 died (killed by SIGKILL)" in error["message"]
    assert _group_ends(proc.pid) == []


def test_an_output_file_that_cannot_be_written_at_the_end_is_a_json_error(tmp_path):
    """The --json folder gone by the end of the run (checked at its start): the table is on
    stdout, the plot is still written (where matplotlib, the `bench` extra, is installed), and
    the run ends with `bench_failed` naming the file, exit 1. It was a traceback, and the plot
    was not written."""
    out = tmp_path / "out"
    out.mkdir()
    plot = tmp_path / "b.png"
    drawn = importlib.util.find_spec("matplotlib") is not None
    proc = subprocess.Popen([*HOMING, "throughput", *SMALL, "--messages", "20000",
                             "--json", str(out / "b.json"), *(["--plot", str(plot)] * drawn)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(tmp_path))
    try:
        while "== throughput" not in (line := proc.stderr.readline()):
            assert line, "the run ended before its throughput scenario"
        out.rmdir()
        stdout, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    error = json.loads(err.strip().splitlines()[-1])
    assert error["error"] == "bench_failed", error
    assert error["message"].startswith(f"homing bench: could not write {out / 'b.json'}: ")
    assert "| throughput" in stdout and plot.exists() == drawn


def test_a_killed_bench_leaves_no_broker_running(tmp_path):
    """SIGKILL to the bench mid-phase (it can end nothing itself then): its broker and load
    processes end all the same. The broker served on, busy, for ever (its parent gone)."""
    proc = subprocess.Popen([*HOMING, "throughput", *SMALL, "--messages", "10000000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(tmp_path), start_new_session=True)
    try:
        assert wait_until_sync(lambda: _group_has_load(proc.pid), 60)
        proc.kill()
        proc.communicate(timeout=60)
        assert _group_ends(proc.pid) == []
    finally:
        if _group(proc.pid):  # a broker left running, say: not for the next tests to meet
            os.killpg(proc.pid, signal.SIGKILL)


def test_a_broker_started_from_a_thread_outlives_that_thread():
    """A broker started from a thread other than the main one is not stopped when that thread
    ends: Linux sends PR_SET_PDEATHSIG's signal when the thread that forked the child ends, not
    its process, so the broker was sent SIGTERM as the thread ended and exited at once (a
    `trio.to_thread` thread ends after 10 s idle). Told apart by the signal it stops on."""
    started: dict = {}

    def start() -> None:
        started["broker"] = BrokerProcess(extra=["--log-level", "info"]).start()
        started["tid"] = threading.get_native_id()

    thread = threading.Thread(target=start)
    thread.start()
    thread.join()
    broker = started["broker"]
    try:
        # The kernel sends the signal as the thread exits, before its task leaves /proc.
        assert wait_until_sync(lambda: not os.path.exists(f"/proc/self/task/{started['tid']}"))
        broker.proc.send_signal(signal.SIGINT)
        broker.proc.wait(60)
        lines = [json.loads(line) for line in broker.data.with_suffix(".log").read_text()
                 .splitlines() if line.startswith("{")]
        assert [e["signal"] for e in lines if "signal" in e] == ["SIGINT"], lines[-5:]
    finally:
        broker.stop()
