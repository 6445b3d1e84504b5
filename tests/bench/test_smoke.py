"""Smoke test of `homing bench`: every scenario at a tiny size, so the suite cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from storage.store import LAYOUT as _LAYOUT
from tests.bench.talker import Talker
from tests.procs import read_terminal

LAYOUT = _LAYOUT.decode()

TINY = [
    "--procs", "2", "--senders", "4", "--receivers", "4", "--messages", "2000",
    "--rates", "500", "--duration", "1", "--subscribers", "5", "--posts", "3",
    "--interval", "0.05", "--connections", "50", "--idle-procs", "1",
    "--catchup-messages", "1000", "--replay-events", "2000", "--timeout", "60",
]


def _positive(entry: dict, *keys: str) -> None:
    for key in keys:
        assert key in entry, key
        assert entry[key] > 0, (key, entry[key])


def test_every_scenario_runs_and_reports_its_keys(tmp_path):
    """`homing bench all` at tiny sizes prints a table and writes every documented JSON key."""
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, "-m", "broker.cli", "bench", "all", *TINY, "--json", str(out),
         "--peer", "redis://127.0.0.1:1"],
        capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| throughput" in run.stdout
    assert "not reachable" in run.stderr
    # Piped, as to a log file: no progress line, whose carriage returns and escapes redraw a
    # terminal's line and would fill a file.
    assert "\r" not in run.stderr + run.stdout and "\x1b" not in run.stderr + run.stdout
    doc = json.loads(out.read_text())
    results = doc["results"]
    _positive(results["throughput"], "msgs_per_s", "sends_per_s")
    assert results["throughput"]["received"] == 2000
    (lat,) = results["latency"]
    _positive(lat, "rate", "p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms")
    assert lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"] <= lat["p999_ms"] <= lat["max_ms"]
    assert lat["received"] == lat["messages"] == 500 and lat["errors"] == {}
    (fan,) = results["fanout"]
    _positive(fan, "subscribers", "last_delivery_ms")
    _positive(results["connections"], "connections", "rss_mib")
    assert results["connections"]["connections"] == 50
    _positive(results["catchup"], "events_per_s")
    _positive(results["replay"], "events_per_s")
    env = doc["environment"]
    assert env["cores"] and env["python"] and env["cpu_model"]
    _positive(env["disk"], "pages", "one_page_ms", "scattered_ms", "contiguous_ms")
    assert "scattered pages" in run.stdout
    assert doc["peers"]["redis"]["reachable"] is False


def test_arguments_that_would_fail_late_are_usage_errors_at_once(tmp_path):
    """Numbers out of range, a peer URL naming no peer, two peers of one kind and an output file
    that cannot be written are refused before anything runs: the CLI's JSON usage error, exit
    2. They used to crash with a traceback (--procs 0, --subscribers 0), to run nothing quietly
    (--connections -5, --peer foo://x), or to lose a whole run at its end (--json into a
    missing folder)."""
    cases = [
        (["throughput", "--procs", "0"], "--procs"),
        (["fanout", "--subscribers", "10,0"], "--subscribers"),
        (["latency", "--duration", "nan"], "--duration"),
        (["latency", "--rates", "inf"], "--rates"),
        (["latency", "--rates", "1e30"], "--rates"),
        (["latency", "--rates", "1000", "--duration", "0.001"], "fewer than 10 messages"),
        (["connections", "--connections", "-5"], "--connections"),
        (["throughput", "--peer", "foo://x"], "nats://HOST[:PORT] or redis://HOST[:PORT]"),
        (["throughput", "--peer", "redis://127.0.0.1:99999"], "port"),
        # 2026-12-05: port 0 was taken as the usual port, and a URL without a host as
        # 127.0.0.1 (`nats://`, `redis:/h`: a mistyped URL ran against another server)
        (["throughput", "--peer", "redis://127.0.0.1:0"], "from 1 to 65535"),
        (["throughput", "--peer", "nats://"], "names no HOST"),
        (["throughput", "--peer", "redis://:6379"], "names no HOST"),
        (["throughput", "--peer", "redis:/127.0.0.1"], "names no HOST"),
        (["throughput", "--peer", "redis://a", "--peer", "redis://b:1"], "one peer of each kind"),
        (["throughput", "--json", str(tmp_path / "missing" / "b.json")], "--json"),
        (["throughput", "--plot", str(tmp_path)], "is a folder"),
        # 2026-12-06: a folder this user may write to by its mode bits, where no file can be
        # made (/proc, even for root; a read-only mount): a traceback at the run's end, the
        # JSON lost. An empty name: nothing written, without a word. A plot not named .png:
        # x.jpg was written as a JPEG, and `b` as b.png while the bench said "wrote b".
        (["throughput", "--json", "/proc/homing-bench.json"], "cannot write /proc"),
        (["throughput", "--json", ""], "argument --json: give a file name"),
        (["throughput", "--plot", ""], "argument --plot: give a file name"),
        (["throughput", "--plot", str(tmp_path / "b.jpg")], "a PNG: name it FILE.png"),
        (["throughput", "--plot", str(tmp_path / "b")], "a PNG: name it FILE.png"),
    ]
    for argv, words in cases:
        argv = [*argv, "--messages", "100"]  # short, should one run after all
        run = subprocess.run([sys.executable, "-m", "broker.cli", "bench", *argv],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 2, (argv, run.stderr[-2000:])
        error = json.loads(run.stderr.strip().splitlines()[-1])
        assert error["error"] == "usage" and words in error["message"], (argv, error)
        assert "==" not in run.stderr, argv  # nothing ran


def test_a_plot_without_matplotlib_is_a_usage_error_at_once(tmp_path):
    """`--plot` where matplotlib cannot be imported: the usage error naming the `bench` extra,
    exit 2, before anything runs (not a traceback, nor a run whose plot is skipped)."""
    shadow = tmp_path / "shadow" / "matplotlib"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    path = os.pathsep.join(filter(None, [str(shadow.parent), os.environ.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, "-m", "broker.cli", "bench", "replay",
                          "--plot", str(tmp_path / "b.png")], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "PYTHONPATH": path})
    assert run.returncode == 2, run.stderr[-2000:]
    error = json.loads(run.stderr.strip().splitlines()[-1])
    assert error["error"] == "usage" and "pip install 'homing[bench]'" in error["message"]
    assert "==" not in run.stderr and not (tmp_path / "b.png").exists()


def test_a_peer_url_without_a_port_means_the_usual_one():
    from bench import peers

    assert peers.address("redis://127.0.0.1") == ("127.0.0.1", 6379)
    assert peers.address("nats://example.org") == ("example.org", 4222)
    assert peers.address("nats://[::1]:5222") == ("::1", 5222)


def test_the_peers_clients_run_on_uvloop_where_it_is_installed():
    import asyncio
    import importlib.util

    from bench import peers

    async def loop_module() -> str:
        return type(asyncio.get_running_loop()).__module__

    has_uvloop = importlib.util.find_spec("uvloop") is not None
    assert peers.run_async(loop_module()).split(".")[0] == ("uvloop" if has_uvloop else "asyncio")
    assert peers.clients("nats") == {"event_loop": "uvloop" if has_uvloop else "asyncio"}
    assert ("uvloop" in peers.missing_speedups("nats")) is not has_uvloop


def test_a_peer_whose_client_lacks_its_speedups_is_named(monkeypatch, capsys):
    pytest.importorskip("redis")
    from bench import cli

    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "hiredis", None)
    with Talker(b"+PONG\r\n") as redis_like:  # what the reachability check asks of Redis
        status = cli._reach_peers([f"redis://127.0.0.1:{redis_like.port}"])
    assert status["redis"]["client"] == {"event_loop": "asyncio", "parser": "python"}
    err = capsys.readouterr().err
    assert "peer redis: its client runs without uvloop and hiredis" in err


def test_stdout_holds_the_report_and_says_which_peers_were_not_compared(tmp_path):
    """Piped to a file, stdout is the table and its notes: the replay scenario said that it built
    its log there, above the table (2026-12-05), and it keeps that log in the temporary
    directory ($TMPDIR: it was always /tmp). A peer asked for but not reachable is said there
    too, not only on stderr: a saved report without its peer column said nothing of why."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    run = subprocess.run([sys.executable, "-m", "broker.cli", "bench", "replay", "throughput",
                          "--procs", "1", "--senders", "2", "--receivers", "2", "--messages",
                          "200", "--replay-events", "1500", "--peer", "redis://127.0.0.1:1"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("| scenario"), run.stdout[:500]
    assert "replay: built" in run.stderr
    assert [p.name for p in tmp_path.iterdir()] == [f"homing-bench-replay-v{LAYOUT}-1500"]
    (line,) = [x for x in run.stdout.splitlines() if "not compared" in x]
    assert line.startswith("peer redis (redis://127.0.0.1:1) not compared: not reachable")


def test_the_help_gives_every_default():
    """`homing bench --help` gives each option's default, as docs/BENCHMARKS.md does (--senders,
    --receivers, --posts, --idle-procs, --catchup-messages, --replay-events and --timeout gave
    none)."""
    import argparse

    from broker.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    bench = sub.choices["bench"]
    silent = [a.option_strings[0] for a in bench._actions
              if a.option_strings and a.default not in (None, False, True, [], argparse.SUPPRESS)
              and "default" not in (a.help or "")]
    assert silent == []


def test_a_note_on_a_terminal_does_not_land_on_the_progress_line(tmp_path):
    """On a terminal the progress line is redrawn in place; a note written meanwhile (the replay
    log built, a broker's data kept) starts a line of its own: it ran on after the progress line
    ("... (0/1)replay: built ...")."""
    import pty

    master, slave = pty.openpty()
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    try:
        run = subprocess.run([sys.executable, "-m", "broker.cli", "bench", "replay",
                              "--replay-events", "1200"], stdout=subprocess.PIPE, stderr=slave,
                             env=env, timeout=120)
    finally:
        os.close(slave)
    err = read_terminal(master)
    assert run.returncode == 0
    assert b"  replay: preparing the log" in err  # the progress line was drawn
    assert b"\r\x1b[Kreplay: built" in err, err
