"""`homing bench`'s rough edges a user met (review of the bench's leftovers, 2026-12-06).

stdout's reader gone before the table (`homing bench ... --json out.json | head -3`) lost the
JSON and the plot; a process holding the connections scenario's idle connections that died
during the hold went unnoticed, and the figures were reported for connections no longer
there; replay caches of older projection layouts stayed in the temporary directory for good;
and `--json` naming a dangling symlink was refused as "File exists". (An unreachable peer
that no scenario used got three lines: tests/bench/test_says_why.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from bench import scenarios
from bench.harness import BrokerProcess, WorkerError, Workers
from storage.store import LAYOUT
from tests.bench.delay_proxy import DelayProxy
from tests.bench.test_failures import _group, _group_ends
from tests.waits import wait_until_sync

HOMING = [sys.executable, "-m", "broker.cli", "bench"]
REPLAY = ["replay", "--replay-events", "2000"]
SMALL = ["--procs", "1", "--senders", "2", "--receivers", "2"]


def _env(tmp_path, **extra: str) -> dict:
    """The bench's temporary files (broker data directories, the replay cache) in tmp_path."""
    return {**os.environ, "TMPDIR": str(tmp_path), **extra}


def _bench(tmp_path, *args: str, **popen: object) -> subprocess.CompletedProcess:
    return subprocess.run([*HOMING, *args], capture_output=True, text=True, timeout=180,
                          env=_env(tmp_path), **popen)


def _error(stderr: str) -> dict:
    return json.loads(stderr.strip().splitlines()[-1])


def test_the_json_is_written_when_stdouts_reader_went_away_before_the_table(tmp_path):
    """stdout a pipe whose reader is gone before the table is printed (`| head -3`, unbuffered
    here so that the table's first write meets it, as a table longer than stdout's buffer
    does): the JSON is written all the same, and the run ends as the other commands do on a
    broken pipe, exit 1 without a traceback. The JSON was lost: the broken pipe ended the run
    at the table, before the files were written."""
    out = tmp_path / "out.json"
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        run = subprocess.run([*HOMING, *REPLAY, "--json", str(out)], stdout=write_end,
                             stderr=subprocess.PIPE, text=True, timeout=180,
                             env=_env(tmp_path, PYTHONUNBUFFERED="1"))
    finally:
        os.close(write_end)
    assert run.returncode == 1, run.stderr[-3000:]
    assert "Traceback" not in run.stderr and "Exception" not in run.stderr, run.stderr[-3000:]
    assert json.loads(out.read_text())["results"]["replay"]["events_per_s"] > 0
    assert f"wrote {out}" in run.stderr


def test_a_holder_of_the_idle_connections_that_dies_during_the_hold_fails_the_scenario(
        tmp_path):
    """The process holding the idle connections SIGKILLed while the throughput run on top of
    them starts: the connections scenario fails, naming the process and how it ended, instead
    of reporting its figures (and `connections`: 20) for connections no longer held."""
    out = tmp_path / "b.json"
    proc = subprocess.Popen([*HOMING, "connections", *SMALL, "--connections", "20",
                             "--idle-procs", "1", "--messages", "3000", "--json", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(tmp_path), start_new_session=True)
    try:
        # The holder is the first load process; the second is the throughput's, started once
        # every idle connection is open.
        assert wait_until_sync(lambda: len(_load_pids(proc.pid)) >= 2, 120), \
            "no throughput load process came"
        os.kill(min(_load_pids(proc.pid)), signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, stderr[-3000:]
    error = _error(stderr)
    assert error["error"] == "bench_failed", error
    assert ("connections failed: load process 0, holding 20 of the 20 idle connections, died "
            "(killed by SIGKILL) during the throughput run on top of them") in error["message"]
    assert "| connections" not in stdout
    assert "connections" not in json.loads(out.read_text())["results"]
    assert _group_ends(proc.pid) == []


def test_idle_connections_closed_under_a_live_holder_fail_the_check():
    """Connections closed during the hold (here the proxy in front of the broker goes away)
    while their holder lives on: the check after the phase says how many of how many closed,
    rather than the figures being reported for them; before they closed, it passes."""
    with BrokerProcess() as broker, DelayProxy(broker.server, 0.0) as proxy:
        spec = {"server": proxy.address, "ping_s": 10,
                "conns": [(broker.token(f"h{i}"), "idle") for i in range(3)]}
        with Workers([("bench.loadgen.idle", spec)]) as workers:
            ready = workers.gather("ready", 60)
            assert ready[0]["connected"] == 3
            scenarios._check_held(workers, ready, "during the idle hold")
            proxy.__exit__(None, None, None)  # stopping it closes its connections; again: a no-op
            said = _said_closed(workers, ready)
            assert workers.dead() == {}
    assert said == ("3 of the 3 idle connections closed during the idle hold: the figures "
                    "would be for connections no longer held")


def _said_closed(workers: Workers, ready: list[dict]) -> str:
    """What the check says once the closed connections are seen (they close a moment after
    the proxy went)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            scenarios._check_held(workers, ready, "during the idle hold")
        except WorkerError as exc:
            if "3 of the 3" in str(exc) or time.monotonic() > deadline:
                return str(exc)
        assert time.monotonic() < deadline, "the closed connections were never seen"
        time.sleep(0.05)


def _load_pids(pgid: int) -> list[int]:
    """The pids of the group's load processes (multiprocessing's spawned children)."""
    return [int(line.split()[0]) for line in _group(pgid) if "spawn_main" in line]


def _stale_cache(tmp_path, layout: int, events: int, size: int) -> os.PathLike:
    stale = tmp_path / f"homing-bench-replay-v{layout}-{events}"
    stale.mkdir()
    (stale / "data.mdb").write_bytes(b"\0" * size)
    (stale / "bench-complete").touch()
    return stale


def test_replay_caches_of_older_layouts_are_removed_when_a_new_one_is_built(tmp_path):
    """Building a replay cache removes the caches of older projection layouts (no homing of
    this layout or later reads them), says which and how big they were, and leaves alone
    everything else: the current layout's caches of other sizes, a newer layout's, a file of
    the same pattern that is no directory, and names of other patterns. They stayed for good."""
    current = int(LAYOUT.decode())
    old = [_stale_cache(tmp_path, current - 1, 2000, 3 << 20),
           _stale_cache(tmp_path, current - 2, 500, 1 << 20)]
    kept = [_stale_cache(tmp_path, current, 500, 10), _stale_cache(tmp_path, current + 1, 2000, 10),
            tmp_path / f"homing-bench-replay-v{current - 1}-77",  # a file
            tmp_path / f"homing-bench-replay-v{current - 1}-x", tmp_path / "mine-v6-2000",
            tmp_path / f"homing-bench-replay-v{current - 1}-9"]  # a symlink to a folder
    kept[2].write_text("a file, not a cache")
    kept[3].mkdir()
    kept[4].mkdir()
    kept[5].symlink_to(kept[4])
    run = _bench(tmp_path, *REPLAY)
    assert run.returncode == 0, run.stderr[-3000:]
    assert not any(p.exists() for p in old)
    assert all(p.exists() for p in kept)
    assert (tmp_path / f"homing-bench-replay-v{current}-2000" / "bench-complete").exists()
    assert (f"replay: removed 2 replay caches of older layouts (4.0 MiB): "
            f"{', '.join(sorted(str(p) for p in old))}") in run.stderr, run.stderr


def test_a_cache_of_the_current_layout_is_reused_and_removes_nothing(tmp_path):
    """A run that finds its cache builds nothing, and so removes nothing either."""
    current = int(LAYOUT.decode())
    first = _bench(tmp_path, *REPLAY)
    assert first.returncode == 0, first.stderr[-3000:]
    old = _stale_cache(tmp_path, current - 1, 2000, 10)
    again = _bench(tmp_path, *REPLAY)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "built" not in again.stderr and "removed" not in again.stderr
    assert old.exists()


def test_json_through_a_dangling_symlink_writes_the_file_it_names(tmp_path):
    """`--json link` where the link names a file not made yet: the run writes that file, as a
    shell's `>` does, and the link stays a link. It was refused as `cannot write link: File
    exists`, for the check made its test file with O_EXCL on the link."""
    target, link = tmp_path / "results" / "b.json", tmp_path / "b.json"
    target.parent.mkdir()
    link.symlink_to(target)
    run = _bench(tmp_path, *REPLAY, "--json", str(link))
    assert run.returncode == 0, run.stderr[-3000:]
    assert link.is_symlink()
    assert json.loads(target.read_text())["results"]["replay"]["events_per_s"] > 0


def test_a_dangling_symlink_into_a_missing_folder_is_refused_saying_so(tmp_path):
    """A link to a file whose folder does not exist cannot be written: a usage error that says
    the name is a symlink, to what, and why that cannot be made (it said "File exists")."""
    target, link = tmp_path / "gone" / "b.json", tmp_path / "b.json"
    link.symlink_to(target)
    started = time.monotonic()
    run = _bench(tmp_path, *REPLAY, "--json", str(link))
    assert run.returncode == 2, run.stderr[-3000:]
    assert time.monotonic() - started < 30  # before anything runs
    assert _error(run.stderr)["message"] == (
        f"homing bench: argument --json: cannot write {link}: it is a symlink to {target}, "
        "which does not exist and cannot be made: No such file or directory")
    assert not target.parent.exists()
