"""`homing bench` says why when a run has less to show than asked (review of the bench as a
user, 2026-12-06): a plot with nothing to draw, a run in which every scenario failed, `--peer`
with no scenario that takes one, and a phase too short for its CPU% to mean anything. Before,
these wrote an empty PNG, printed an empty table, left the peer unused without a word, and
flagged a 0.02 s phase's load as CPU-bound at 271 %."""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import subprocess
import sys

import pytest

from bench.scenarios import MIN_PHASE_S

HOMING = [sys.executable, "-m", "broker.cli", "bench"]
SMALL = ["--procs", "1", "--senders", "2", "--receivers", "2"]
# --plot needs matplotlib, the `bench` extra, which the test extra (and CI) does not install.
needs_plot = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                reason="--plot needs matplotlib (the bench extra)")


def _bench(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*HOMING, *args], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "TMPDIR": str(tmp_path)})


def _png_width(path) -> int:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">I", data[16:20])[0]  # IHDR width


@needs_plot
def test_a_plot_with_nothing_to_draw_is_not_written_and_says_why(tmp_path):
    """Idle connections alone have no latency and no rate to draw: no file (it was a PNG of
    two empty panels), a line on stderr, exit 0 and the table and JSON as ever."""
    png, out = tmp_path / "x.png", tmp_path / "b.json"
    run = _bench(tmp_path, "connections", "--no-connections-throughput", "--connections", "20",
                 "--idle-procs", "1", "--plot", str(png), "--json", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    assert not png.exists()
    assert "--plot: nothing to draw" in run.stderr and f"{png} not written" in run.stderr
    assert f"wrote {png}" not in run.stderr
    assert "| connections" in run.stdout
    assert json.loads(out.read_text())["results"]["connections"]["connections"] == 20


@needs_plot
def test_a_plot_of_one_kind_of_figure_has_that_panel_alone(tmp_path):
    """replay has a rate and no latency: the plot is its one panel, not an empty one beside it."""
    png = tmp_path / "r.png"
    run = _bench(tmp_path, "replay", "--replay-events", "2000", "--plot", str(png))
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"wrote {png}" in run.stderr
    assert _png_width(png) < 900  # one panel of 6 in at 110 dpi; both were 12 in, 1320 px


def test_a_run_in_which_every_scenario_failed_says_so_instead_of_an_empty_table(tmp_path):
    run = _bench(tmp_path, "throughput", *SMALL, "--messages", "100",
                 "--broker-arg=--no-such-flag")
    assert run.returncode == 1, run.stderr[-3000:]
    error = json.loads(run.stderr.strip().splitlines()[-1])
    assert error["error"] == "bench_failed"
    assert "| scenario" not in run.stdout
    assert "no scenario finished, so there is no table" in run.stderr
    assert "! throughput failed, so it is not in the table" in run.stdout


def test_peers_with_no_scenario_that_takes_one_are_said_to_be_unused(tmp_path):
    """--peer with replay alone: one line per peer under the table, saying it is not used and
    what peers apply to; the peer is not probed, and it is not an error. Until 2026-12-06 an
    unreachable peer got two more lines besides a line on stderr: probed all the same, it was
    said to be not reachable on stderr and "not compared: not reachable" under the table."""
    url = "redis://127.0.0.1:1"
    out = tmp_path / "b.json"
    run = _bench(tmp_path, "replay", "--replay-events", "2000", "--peer", url, "--json", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    assert [line for line in run.stderr.splitlines() if url in line] == []
    (line,) = [line for line in run.stdout.splitlines() if url in line]
    assert line == (f"peer redis ({url}) not used: --peer applies to throughput and latency, "
                    "and neither of them runs")
    assert json.loads(out.read_text())["peers"] == {}  # the peers compared with: none


def test_peers_with_a_scenario_that_takes_one_are_not_said_to_be_unused(tmp_path):
    run = _bench(tmp_path, "throughput", *SMALL, "--messages", "200",
                 "--peer", "redis://127.0.0.1:1")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "not used" not in run.stderr


def test_a_phase_too_short_for_the_clock_ticks_is_not_flagged_and_has_no_cpu_figure(tmp_path):
    """catchup of one message: phases of a few ms, read from 10 ms ticks, gave a load process
    271 % and flagged it CPU-bound. Now the `cpu` entry says the phase was too short, is not
    flagged, and the table's CPU cell says so instead of a figure."""
    out = tmp_path / "b.json"
    run = _bench(tmp_path, "catchup", *SMALL, "--catchup-messages", "1", "--json", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    catchup = json.loads(out.read_text())["results"]["catchup"]
    for cpu in (catchup["cpu"], catchup["fill_cpu"]):
        assert cpu["phase_s"] < MIN_PHASE_S and cpu["too_short"] is True
        assert cpu["load_bound"] is False and cpu["disturbed"] is False
        for key in ("broker_pct", "load_pct_total", "load_pct_max_process", "load_pct",
                    "other_pct", "steal_pct"):
            assert key in cpu, key  # the figures stay, for whoever reads them
    (row,) = [line for line in run.stdout.splitlines() if "cpu% broker/load/other" in line]
    assert "too short" in row and "*" not in row
    assert "CPU-bound" not in run.stdout


def test_a_phase_long_enough_keeps_its_cpu_figures_and_flags(tmp_path):
    out = tmp_path / "b.json"
    run = _bench(tmp_path, "latency", *SMALL, "--rates", "200", "--duration", "1",
                 "--json", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    (lat,) = json.loads(out.read_text())["results"]["latency"]
    assert lat["cpu"]["phase_s"] >= MIN_PHASE_S and lat["cpu"]["too_short"] is False
    (row,) = [line for line in run.stdout.splitlines() if "cpu% broker/load/other" in line]
    assert "too short" not in row and " / " in row


def test_the_cpu_summary_of_a_short_phase_keeps_its_figures_but_flags_nothing():
    """The 271 % of one load process over a 20 ms phase, and a busy rest of the machine: kept
    as measured, neither flag set; the same figures over a long phase are flagged."""
    from bench.scenarios import _cpu_summary

    cpu = {"broker": 50.0, "load0": 271.0, "other": 316.0}
    short = _cpu_summary(cpu, {"placement": None}, 0.02)
    assert short["load_pct_max_process"] == 271.0 and short["too_short"] is True
    assert not short["load_bound"] and not short["disturbed"]
    long = _cpu_summary(cpu, {"placement": None}, MIN_PHASE_S)
    assert long["load_bound"] and long["disturbed"] and long["too_short"] is False


@needs_plot
def test_the_plot_gives_each_broker_one_colour_and_each_rate_one_style():
    """In the latency panel a broker's lines share its colour, whatever the rate, and a rate's
    lines share a style, whatever the broker; the bars use the same colours and are labelled
    with their figures (one colour a line, nine at three rates and two peers, matched nothing
    across the panels, and a fan-out's bar beside the replay's could not be read)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.report import _throughput_bars, figure

    def figures(ms: float) -> dict:
        return {"p50_ms": ms, "p90_ms": ms, "p99_ms": ms, "p999_ms": ms, "max_ms": ms}

    latency = [{"rate": rate, **figures(rate / 1000),
                "peer": {"redis": figures(rate / 900), "nats": figures(rate / 800)}}
               for rate in (1000, 5000, 20000)]
    results = {"throughput": {"msgs_per_s": 31_111,
                              "peer": {"redis": {"msgs_per_s": 77_673},
                                       "nats": {"msgs_per_s": 25_262}}},
               "fanout": [{"subscribers": 10, "deliveries_per_s": 3_572}],
               "replay": {"events_per_s": 259_807}}
    fig = figure(plt, latency, _throughput_bars(results))
    try:
        left, right = fig.axes
        lines = {line.get_label(): line for line in left.get_lines()}
        assert len(lines) == 9, sorted(lines)
        for name in ("homing", "nats", "redis"):
            assert len({lines[f"{name} {r}/s"].get_color() for r in (1000, 5000, 20000)}) == 1
        for rate in (1000, 5000, 20000):
            styles = {(lines[f"{n} {rate}/s"].get_linestyle(), lines[f"{n} {rate}/s"].get_marker())
                      for n in ("homing", "nats", "redis")}
            assert len(styles) == 1, (rate, styles)
        assert len({lines[f"{n} 1000/s"].get_color() for n in ("homing", "nats", "redis")}) == 3
        bar_colour = {c.get_label(): c.patches[0].get_facecolor() for c in right.containers}
        assert bar_colour["homing"] == matplotlib.colors.to_rgba(lines["homing 1000/s"].get_color())
        assert bar_colour["redis"] == matplotlib.colors.to_rgba(lines["redis 5000/s"].get_color())
        texts = {t.get_text() for t in right.texts}
        assert {"31,111", "77,673", "25,262", "3,572", "259,807"} <= texts, texts
    finally:
        plt.close(fig)


@needs_plot
def test_the_plot_keeps_a_brokers_colour_when_a_peer_is_missing_from_a_panel():
    """A peer that failed in one scenario (`nats` here, at its first latency rate, after its
    throughput) is in one panel only: colours given out per panel made `redis` orange in the
    latency panel and green among the bars, where orange was `nats`. And a fifth rate (or any up
    to RATE_STYLES_DISTINCT) has a line style and marker of its own: the fifth took the
    first's, the same colour too, so homing's two lines looked one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.report import RATE_STYLES_DISTINCT, _throughput_bars, figure

    def figures(ms: float) -> dict:
        return {"p50_ms": ms, "p90_ms": ms, "p99_ms": ms, "p999_ms": ms, "max_ms": ms}

    rates = [1000 * (k + 1) for k in range(RATE_STYLES_DISTINCT)]
    latency = [{"rate": rate, **figures(1.0), "peer": {"redis": figures(2.0)}} for rate in rates]
    results = {"throughput": {"msgs_per_s": 31_111,
                              "peer": {"redis": {"msgs_per_s": 77_673},
                                       "nats": {"msgs_per_s": 25_262}}}}
    fig = figure(plt, latency, _throughput_bars(results))
    try:
        left, right = fig.axes
        lines = {line.get_label(): line for line in left.get_lines()}
        bar_colour = {c.get_label(): c.patches[0].get_facecolor() for c in right.containers}
        for name in ("homing", "redis"):
            assert bar_colour[name] == matplotlib.colors.to_rgba(
                lines[f"{name} 1000/s"].get_color()), name
        assert len(set(bar_colour.values())) == 3
        homing = [lines[f"homing {rate}/s"] for rate in rates]
        assert len({(h.get_linestyle(), h.get_marker()) for h in homing}) == len(rates)
    finally:
        plt.close(fig)
