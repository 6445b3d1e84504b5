"""What a bench run prints and writes: the results table, the environment, the JSON, the plot."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.repeat import spread
from protocol import native as wire_native
from storage import native, rowio

PACKAGES = ("homing", "trio", "msgpack", "lmdb", "structlog", "nats-py", "redis", "hiredis",
            "uvloop", "matplotlib")


def environment(settings: dict) -> dict:
    """CPU, cores, Python, package versions, git commit, which storage hot loops run
    (`storage_native`, `storage_rows` and `protocol_native`: compiled or python, see
    storage/native.py, storage/rowio.py and protocol/native.py) and the run's settings."""
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    root = Path(__file__).resolve().parent.parent
    commit = _git(root, "rev-parse", "HEAD")
    dirty = bool(_git(root, "status", "--porcelain", "--untracked-files=no"))
    return {
        "cpu_model": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
        "platform": platform.platform(), "packages": versions,
        "git_commit": commit, "git_dirty": dirty, "storage_native": native.describe(),
        "storage_rows": rowio.describe(), "protocol_native": wire_native.describe(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "settings": settings,
    }


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


# -- the table ----------------------------------------------------------------------------------

def rows(results: dict) -> list[tuple[str, str, Any, Any, Any]]:
    """(scenario, figure, homing, peer, ratio) rows for every headline figure."""
    out = []

    def add(name: str, entry: dict, keys: tuple[str, ...]) -> None:
        peers = entry.get("peer") or {}
        for key in keys:
            if key not in entry:
                continue
            value = _with_spread(entry, key)
            if peers:
                for peer_name, peer in peers.items():
                    ratio = (entry.get("ratio") or {}).get(peer_name, {}).get(key)
                    out.append((name, key, value, f"{peer_name}: {_fmt(_with_spread(peer, key))}",
                                ratio))
            else:
                out.append((name, key, value, None, None))
        cpu = entry.get("cpu")
        if cpu:
            peer_cpus = [(n, p["cpu"]) for n, p in peers.items() if p.get("cpu")] or [(None, None)]
            for peer_name, peer_cpu in peer_cpus:
                out.append((name, "cpu% broker/load/other", _cpu(cpu),
                            f"{peer_name}: {_cpu(peer_cpu)}" if peer_cpu else None, None))

    if "throughput" in results:
        add("throughput", results["throughput"], ("msgs_per_s", "sends_per_s"))
    for entry in results.get("latency", []):
        add(f"latency {entry['rate']:g}/s", entry,
            ("p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms", "achieved_per_s"))
    for entry in results.get("fanout", []):
        add(f"fanout {entry['subscribers']}", entry,
            ("last_delivery_ms", "last_delivery_p99_ms", "deliveries_per_s"))
    if "connections" in results:
        entry = results["connections"]
        add("connections", entry, ("connections", "rss_mib", "rss_per_connection_kib"))
        if "throughput" in entry:
            add("connections+throughput", entry["throughput"], ("msgs_per_s", "sends_per_s"))
    if "catchup" in results:
        add("catchup", results["catchup"], ("events_per_s", "fill_sends_per_s"))
    if "replay" in results:
        add("replay", results["replay"], ("events_per_s", "events"))
    return out


def fell_behind(results: dict) -> list[str]:
    """The latency runs, homing's and peers', that fell behind the rate asked (`fell_behind`),
    each with the rate it achieved: "latency 200000/s (22,555/s achieved)"."""
    out = []
    for entry in results.get("latency", []):
        label = f"latency {entry['rate']:g}/s"
        for name, run in [(None, entry), *(entry.get("peer") or {}).items()]:
            if run.get("fell_behind"):
                out.append(f"{label}{f' vs {name}' if name else ''} "
                           f"({run['achieved_per_s']:,}/s achieved)")
    return out


def load_bound(results: dict) -> list[str]:
    """The runs whose load processes were CPU-bound (`cpu.load_bound`), homing's and peers'."""
    return _flagged(results, "load_bound")


def disturbed(results: dict) -> list[str]:
    """The runs during which the rest of the machine was busy (`cpu.disturbed`)."""
    return _flagged(results, "disturbed")


def _flagged(results: dict, flag: str) -> list[str]:
    """The labels of the runs whose `cpu.<flag>` is true, homing's and peers'."""
    out = []

    def check(label: str, entry: dict) -> None:
        if (entry.get("cpu") or {}).get(flag):
            out.append(label)
        for peer_name, peer in (entry.get("peer") or {}).items():
            if (peer.get("cpu") or {}).get(flag):
                out.append(f"{label} vs {peer_name}")
        if isinstance(entry.get("throughput"), dict):
            check(f"{label}+throughput", entry["throughput"])

    for name, value in results.items():
        for entry in value if isinstance(value, list) else [value]:
            label = name
            if name == "latency":
                label = f"latency {entry['rate']:g}/s"
            elif name == "fanout":
                label = f"fanout {entry['subscribers']}"
            check(label, entry)
    return out


def _with_spread(entry: dict, key: str) -> Any:
    """`entry[key]`, and when it is the median of several runs, their range: "30,384
    (27,100-33,900)"."""
    value = entry.get(key)
    low_high = spread(entry, key)
    if low_high is None:
        return value
    return f"{_fmt(value)} ({_fmt(low_high[0])}-{_fmt(low_high[1])})"


def _cpu(cpu: dict) -> str:
    """A `cpu` entry as "server / load (max busiest load process) / other", with the part of
    other that was the hypervisor's steal when there was any, * if load-bound and ! if
    disturbed; for a phase too short for the clock ticks (`too_short`), what it lasted instead
    of figures that would be noise."""
    if cpu.get("too_short"):
        return f"- (phase of {cpu['phase_s'] * 1000:.0f} ms: too short for CPU%)"
    steal = cpu.get("steal_pct", 0)
    return (f"{cpu['broker_pct']:.0f} / {cpu['load_pct_total']:.0f} "
            f"(max {cpu['load_pct_max_process']:.0f}) / {cpu.get('other_pct', 0):.0f}"
            f"{f' (steal {steal:.0f})' if steal >= 0.5 else ''}"
            f"{' *' if cpu.get('load_bound') else ''}{' !' if cpu.get('disturbed') else ''}")


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.3f}" if v < 100 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def table(results: dict) -> str:
    """The results as an aligned text table (Markdown-compatible)."""
    data = rows(results)
    has_peer = any(r[3] is not None for r in data)
    head = ["scenario", "figure", "homing"] + (["peer", "homing/peer"] if has_peer else [])
    lines = [[r[0], r[1], _fmt(r[2])] + ([r[3] or "", _fmt(r[4]) if r[4] is not None else ""]
                                         if has_peer else []) for r in data]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines, strict=False)]

    def fmt(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=False)) \
            + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(head), sep, *(fmt(line) for line in lines)])


def write_json(path: str, doc: dict) -> None:
    Path(path).write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")


# -- the plot ------------------------------------------------------------------------------------

def plot(path: str, results: dict) -> str | None:
    """Latency percentiles per rate, and throughput per scenario, as one PNG: a panel for each
    of the two that the run has. With neither (idle connections alone), no file is written and
    the reason is returned (the caller says it): a PNG of two empty panels said nothing."""
    latency, bars = results.get("latency", []), _throughput_bars(results)
    if not latency and not bars:
        return "nothing to draw (no latency percentiles and no rates in this run)"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "needs matplotlib: pip install 'homing[bench]' (or pip install matplotlib)"
    fig = figure(plt, latency, bars)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def figure(plt: Any, latency: list[dict], bars: list[tuple[str, dict, str]]) -> Any:
    """The plot's matplotlib Figure (`plt`, matplotlib.pyplot): a panel for the `latency`
    entries, if any, and one for the throughput `bars` (`_throughput_bars`), if any; the caller
    closes it."""
    panels = bool(latency) + bool(bars)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)
    axes = list(axes[0])
    colour = _colours(latency, bars)
    if latency:
        _plot_latency(axes.pop(0), latency, colour)
    if bars:
        _plot_bars(axes.pop(0), bars, colour)
    fig.tight_layout()
    return fig


# One colour per broker in both panels (homing first, the peers in name order), one line style
# and marker per rate in the latency panel: each rate's brokers are then told apart by colour,
# and each broker's rates by style (a colour per line, nine of them at three rates and two
# peers, matched nothing across the panels). The colours are given out once for both panels,
# from every peer either has: a peer that failed in one scenario is missing from the other's
# figures, and colours counted per panel then gave it, or another peer, two (until 2026-12-07).
# Four line styles and seven markers (coprime): a style and marker pair differs from rate to
# rate up to RATE_STYLES_DISTINCT rates (four pairs in turn made the fifth rate's lines the
# first's).
_LINE_STYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X")
RATE_STYLES_DISTINCT = len(_LINE_STYLES) * len(_MARKERS)


def _rate_style(k: int) -> tuple[str, str]:
    """The line style and marker of the latency panel's `k`-th rate."""
    return _LINE_STYLES[k % len(_LINE_STYLES)], _MARKERS[k % len(_MARKERS)]


def _colours(latency: list[dict], bars: list[tuple[str, dict, str]]) -> dict[str, str]:
    """A colour per broker, the same in both panels: homing's, then each peer's that either
    panel has, in name order."""
    entries = [*latency, *(entry for _, entry, _ in bars)]
    peers = sorted({n for entry in entries for n in entry.get("peer") or {}})
    return {name: f"C{k}" for k, name in enumerate(["homing", *peers])}


def _plot_latency(ax: Any, latency: list[dict], colour: dict[str, str]) -> None:
    labels = ["p50", "p90", "p99", "p99.9", "max"]
    keys = ["p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms"]
    for k, entry in enumerate(latency):
        line, marker = _rate_style(k)
        runs = [("homing", entry), *sorted((entry.get("peer") or {}).items())]
        for name, figures in runs:
            ax.plot(labels, [figures[key] for key in keys], color=colour[name], linestyle=line,
                    marker=marker, label=f"{name} {entry['rate']:g}/s")
    ax.set_yscale("log")
    ax.set_ylabel("send -> delivery, ms")
    ax.set_title("latency (open loop)")
    ax.legend(fontsize="x-small", ncol=len(latency) or 1, loc="upper left")


def _plot_bars(ax: Any, bars: list[tuple[str, dict, str]], colour: dict[str, str]) -> None:
    names, values, peer_values = [], [], []
    for label, entry, key in bars:
        names.append(label)
        values.append(entry[key])
        peer_values.append({n: p.get(key) for n, p in (entry.get("peer") or {}).items()})
    xs = range(len(names))
    peer_names = sorted({n for pv in peer_values for n in pv})
    width = 0.8 / (1 + len(peer_names))
    drawn = [ax.bar([x - 0.4 + width / 2 for x in xs], values, width=width, label="homing",
                    color=colour["homing"])]
    for k, name in enumerate(peer_names, start=1):
        drawn.append(ax.bar([x - 0.4 + width * (k + 0.5) for x in xs],
                            [pv.get(name) or 0 for pv in peer_values], width=width, label=name,
                            color=colour[name]))
    for bars_drawn in drawn:  # the figure on each bar: a scale that fits the replay's hides
        # the fan-out's 10 subscribers
        ax.bar_label(bars_drawn, labels=[f"{v:,.0f}" if v else "" for v in bars_drawn.datavalues],
                     fontsize="xx-small", rotation=90, padding=2)
    ax.margins(y=0.15)
    ax.set_xticks(list(xs), names, rotation=20, fontsize="small")
    ax.set_ylabel("per second")
    ax.set_title("throughput per scenario")
    ax.legend(fontsize="small")


def _throughput_bars(results: dict) -> list[tuple[str, dict, str]]:
    bars = []
    if "throughput" in results:
        bars.append(("throughput msgs/s", results["throughput"], "msgs_per_s"))
    if "throughput" in results.get("connections", {}):
        bars.append(("with idle conns", results["connections"]["throughput"], "msgs_per_s"))
    for entry in results.get("fanout", []):
        bars.append((f"fanout {entry['subscribers']} deliv/s", entry, "deliveries_per_s"))
    if "catchup" in results:
        bars.append(("catchup events/s", results["catchup"], "events_per_s"))
    if "replay" in results:
        bars.append(("replay events/s", results["replay"], "events_per_s"))
    return bars
