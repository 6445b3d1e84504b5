"""`homing bench SCENARIO...`: end-to-end benchmarks of a real `homing serve` process.

Registered by broker/cli.py through `add_parser(sub)`. Each scenario starts its own broker on a
fresh temporary data directory and a free port, drives it from separate load processes, prints
a results table, and can write every figure with the environment to JSON (`--json`) and a plot
(`--plot`, needs matplotlib from the `bench` extra). `--peer nats://...` or `--peer redis://...`
runs throughput and latency against NATS JetStream or Redis Streams with the same load layout
and prints homing/peer ratios. docs/BENCHMARKS.md has the method and a reference run.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from typing import Any

SCENARIOS = ("throughput", "latency", "fanout", "connections", "catchup", "replay")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


MAX_LIST_VALUE = 10_000_000  # a rate (msg/s) or a channel size beyond any machine's reach


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(float(x)) for x in text.split(",")]
    except (ValueError, OverflowError):  # "abc"; "inf"
        values = []
    if not values or not 1 <= min(values) <= max(values) <= MAX_LIST_VALUE:
        raise argparse.ArgumentTypeError(f"expected whole numbers from 1 to {MAX_LIST_VALUE:,}, "
                                         f"separated by commas, got {text!r}")
    return values


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text!r}")
    return value


def add_parser(sub: Any) -> None:
    """Add the `bench` subcommand to the `homing` parser."""
    from bench.placement import LOAD_SCHEDS

    p = sub.add_parser("bench", help="end-to-end benchmarks (docs/BENCHMARKS.md)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("scenario", nargs="+", choices=(*SCENARIOS, "all"),
                   help="what to run; `all` runs every scenario (replay runs no broker: it "
                        "times the storage's rebuild check; docs/BENCHMARKS.md, \"Scenarios\")")
    g = p.add_argument_group("load")
    g.add_argument("--procs", type=_positive_int, default=4,
                   help="load-generator processes for the senders and receivers, and for "
                        "fanout's subscribers (default %(default)s)")
    g.add_argument("--senders", type=_positive_int, default=16,
                   help="sender connections (default %(default)s)")
    g.add_argument("--receivers", type=_positive_int, default=16,
                   help="receiver connections (default %(default)s)")
    g.add_argument("--messages", type=_positive_int, default=200_000,
                   help="throughput (also on top of the idle connections): messages in total "
                        "(default %(default)s)")
    g.add_argument("--pipeline", type=_positive_int, default=256,
                   help="throughput and catchup: sends in flight per sender connection (the "
                        "latency run sends at its rate; default %(default)s)")
    g.add_argument("--rates", type=_positive_ints, default=[1000, 5000, 20000],
                   help="latency: comma-separated msg/s (default 1000,5000,20000)")
    g.add_argument("--duration", type=_positive_float, default=10.0,
                   help="latency: seconds per rate (default %(default)s)")
    g.add_argument("--subscribers", type=_positive_ints, default=[10, 100, 1000],
                   help="fanout: comma-separated channel sizes (default 10,100,1000)")
    g.add_argument("--posts", type=_positive_int, default=20,
                   help="fanout: posts per size (default %(default)s)")
    g.add_argument("--interval", type=_positive_float, default=0.1,
                   help="fanout: seconds between posts, at least K/1000 (default %(default)s)")
    g.add_argument("--connections", type=_positive_int, default=10_000,
                   help="connections: idle connections to hold (default %(default)s)")
    g.add_argument("--idle-procs", type=_positive_int, default=4,
                   help="connections: processes holding them (default %(default)s)")
    g.add_argument("--no-connections-throughput", dest="connections_throughput",
                   action="store_false", help="connections: skip the throughput run on top")
    g.add_argument("--catchup-messages", type=_positive_int, default=100_000,
                   help="catchup: messages waiting for the device (default %(default)s)")
    g.add_argument("--replay-events", type=_positive_int, default=200_000,
                   help="replay: message events in the log (default %(default)s)")
    g.add_argument("--timeout", type=_positive_float, default=600.0,
                   help="throughput (also against peers and on top of the idle connections) "
                        "and catchup: seconds per phase before the scenario fails (default "
                        "%(default)s)")
    g.add_argument("--repeat", type=_positive_int, default=1, metavar="N",
                   help="run each scenario N times, homing and each peer in turn, and report "
                        "the medians (default %(default)s; docs/BENCHMARKS.md, \"Repeated runs\")")
    g.add_argument("--load-sched", choices=LOAD_SCHEDS, default=None,
                   help="scheduling policy of the load processes: batch (SCHED_BATCH, the "
                        "default on Linux: woken by the server's write, a load process waits "
                        "for a free core instead of preempting the server) or normal "
                        "(docs/BENCHMARKS.md, \"Method\")")
    b = p.add_argument_group("broker")
    b.add_argument("--window", type=_positive_int, default=256,
                   help="homing serve --window (default %(default)s)")
    b.add_argument("--pin", action="store_true",
                   help="run the server under test (homing or the peer) on the first half of "
                        "the CPUs and the load processes on the rest (Linux, at least 2 CPUs; "
                        "docs/BENCHMARKS.md, \"CPU placement\")")
    b.add_argument("--broker-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for homing serve (repeatable, e.g. --broker-arg=--x=1)")
    o = p.add_argument_group("output")
    o.add_argument("--json", metavar="FILE", help="write every figure and the environment")
    o.add_argument("--plot", metavar="FILE.png", help="write a PNG (needs matplotlib)")
    o.add_argument("--peer", action="append", default=[], metavar="URL",
                   help="throughput and latency: compare with nats://HOST:PORT (JetStream) or "
                        "redis://HOST:PORT (Streams); one of each kind at most")
    p.set_defaults(func=cmd_bench)


class Progress:
    """A one-line progress indicator on stderr, shown only when stderr is a terminal."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.shown = False

    def __call__(self, label: str, elapsed: float, done: int, total: int) -> None:
        if self.tty:
            sys.stderr.write(f"\r\033[K  {label}: {elapsed:6.1f} s  ({done}/{total})")
            sys.stderr.flush()
            self.shown = True

    def clear(self) -> None:
        if self.shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
            self.shown = False


def note(text: str) -> None:
    from bench.harness import say

    say(text)


def cmd_bench(args: argparse.Namespace) -> int:
    from bench import placement, report
    from broker.backup_cli import sigterm_as_exit

    _check_usage(args)
    chosen = list(SCENARIOS) if "all" in args.scenario else list(dict.fromkeys(args.scenario))
    # A peer that no chosen scenario takes is not probed: the line under the table that says
    # it is not used is all there is to say of it (it was said to be unreachable as well).
    compared = args.peer if any(name in PEER_KEYS for name in chosen) else []
    opts = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    opts["placement"] = None
    opts["load_sched"] = args.load_sched or placement.default_load_sched()
    if args.pin:
        try:
            opts["placement"] = placement.plan()
        except placement.PlacementError as exc:
            note(f"homing bench: {exc}")
            return 2
    progress = Progress()
    failed: dict[str, str] = {}
    started = time.monotonic()
    try:
        with sigterm_as_exit():
            disk, peers, results = _measure(chosen, compared, opts, progress, failed)
    except (KeyboardInterrupt, SystemExit) as exc:  # Ctrl-C; SIGTERM, as `homing backup`
        progress.clear()
        note("homing bench: " + ("interrupted" if isinstance(exc, KeyboardInterrupt)
                                 else "stopped by SIGTERM"))
        raise
    doc = {"results": results, "failed": failed, "peers": peers,
           "environment": {**report.environment(opts), "disk": disk},
           "elapsed_s": round(time.monotonic() - started, 1)}
    status = 0
    try:
        _print_report(doc, opts, unused_peers=[] if compared else args.peer)
    except BrokenPipeError:
        # stdout's reader went away (`homing bench ... --json out.json | head -3`): the rest of
        # the report is for nobody, but the files asked for are still written below, and the
        # run ends as the other commands do then (exit 1, stdout on /dev/null).
        from broker.cli import _reader_gone

        status = _reader_gone()
    lost = _write_outputs(args, doc, results)
    if failed or lost:
        from broker.cli import EXIT_REFUSED, CliError

        raise CliError(EXIT_REFUSED, "bench_failed", "homing bench: " + "; ".join(
            [*(f"{name} failed: {why}" for name, why in failed.items()), *lost]))
    return status


def _print_report(doc: dict, opts: dict, unused_peers: list[str]) -> None:
    """Print the table and the lines under it on stdout (the run's notes go to stderr)."""
    from bench import report, scenarios
    from bench.disk import describe
    from bench.peers import peer_name

    results, failed, peers, repeat = doc["results"], doc["failed"], doc["peers"], opts["repeat"]
    if results:
        print(report.table(results))
    else:  # a table of headers alone looked like a run that measured nothing, not a failed one
        note("homing bench: no scenario finished, so there is no table; why each failed is "
             "said below")
    if repeat > 1 and results:
        print(f"\neach figure: the median of {repeat} runs (lowest-highest in brackets)"
              f"{_fewer_runs(results, failed, repeat)}; each ratio: the median of the "
              "rounds' own ratios")
    env = doc["environment"]
    if results:  # a blank line after the table
        print()
    print(f"{env['cpu_model']}, {env['cores']} cores, Python {env['python']}, "
          f"commit {(env['git_commit'] or '?')[:12]}{' (dirty)' if env['git_dirty'] else ''}, "
          f"storage hot loops {env['storage_native']}, rows {env['storage_rows']}, "
          f"frame codec {env['protocol_native']}")
    print(describe(env["disk"]))
    for line in _not_compared(peers):
        print(line)
    for url in unused_peers:
        # Not an error: a script may pass --peer to every run; but a peer not used, without a
        # word, reads as if it had been compared.
        print(f"peer {peer_name(url)} ({url}) not used: --peer applies to "
              f"{' and '.join(PEER_KEYS)}, and neither of them runs")
    for name, why in failed.items():
        print(f"! {name} failed" + ("" if name in results else ", so it is not in the table")
              + f": {why}")
    if opts["load_sched"] == "batch":
        print("load processes: SCHED_BATCH (--load-sched): woken, they wait for a free core "
              "instead of preempting the server")
    behind = report.fell_behind(results)
    if behind:
        print(f"~ fell behind the rate asked (deliveries at less than "
              f"{scenarios.FELL_BEHIND_PCT} % of it) in: {', '.join(behind)}; the broker or the "
              "load could not keep up, so those latencies measure a queue that grew all run: "
              "ask a lower rate (docs/BENCHMARKS.md, \"Scenarios\")")
    bound = report.load_bound(results)
    if bound:
        print(f"* the load processes were CPU-bound in: {', '.join(bound)}; those figures "
              "measure the clients as much as the server (docs/BENCHMARKS.md, \"CPU placement\")")
    busy = report.disturbed(results)
    if busy:
        print(f"! the rest of the machine (other processes, or the hypervisor's steal) took "
              f"{scenarios.DISTURBED_PCT} % of a core or more in: {', '.join(busy)}; those "
              "figures are not the server's and the load's alone: rerun them on a quiet machine "
              "(docs/BENCHMARKS.md, \"Method\")")
    if opts["placement"]:
        cpus = opts["placement"]
        print(f"pinned: server on CPUs {_cpu_list(cpus['server'])}, "
              f"load on CPUs {_cpu_list(cpus['load'])}")


def _fewer_runs(results: dict[str, Any], failed: dict[str, str], repeat: int) -> str:
    """The scenarios whose figures hold fewer runs than `repeat` (a later one failed), for the
    note under the table: ", but NAME: K run(s) (run K + 1 of N failed)", or ""."""
    fewer = []
    for name in failed:
        if name in results:
            entry = results[name]
            if isinstance(entry, list):  # latency per rate, fanout per size: alike
                entry = entry[0] if entry else {}
            kept = len(entry.get("rounds") or ())
            fewer.append(f"{name}: {kept} run{'s' * (kept != 1)} (run {kept + 1} of {repeat} "
                         "failed)")
    return ", but " + ", ".join(fewer) if fewer else ""


def _measure(chosen: list[str], peer_urls: list[str], opts: dict, progress: Progress,
             failed: dict[str, str]) -> tuple[dict, dict, dict[str, Any]]:
    """The disk's figures, the status of the peers compared with and every chosen scenario's
    results."""
    from bench import repeat
    from bench.disk import synced_writes

    note("== disk")
    disk = synced_writes()  # before any broker runs: the machine is idle
    peers = _reach_peers(peer_urls)
    results: dict[str, Any] = {}
    for name in chosen:
        runs = _run_scenario(name, opts, peers, progress, failed)
        if runs:  # one run of several asked: a copy, so that it is not its own round
            merged = repeat.merge(runs) if len(runs) > 1 else copy.deepcopy(runs[0])
            results[name] = repeat.with_rounds(merged, runs, repeated=opts["repeat"] > 1)
    return disk, peers, results


def _run_scenario(name: str, opts: dict, peers: dict, progress: Progress,
                  failed: dict[str, str]) -> list[Any]:
    """Each round of scenario `name` (with the peers'). When one fails, `failed[name]` says
    why (and in which run, with --repeat) and the rounds before it are returned: the other
    scenarios still run, and every figure measured is printed and written."""
    from bench.harness import BrokerError, WorkerError

    runs = []
    for round_ in range(1, opts["repeat"] + 1):
        which = f"run {round_} of {opts['repeat']}" if opts["repeat"] > 1 else ""
        note(f"== {name}" + (f", {which}" if which else ""))
        try:
            runs.append(RUNNERS[name](opts, progress))
        except (BrokerError, WorkerError) as exc:
            failed[name] = str(exc)
        except Exception as exc:  # a scenario failing must not lose the others' figures
            failed[name] = f"{type(exc).__name__}: {exc}"
        finally:
            progress.clear()
        if name in failed:
            if runs:
                failed[name] = (f"in {which} (the table holds the {len(runs)} run(s) "
                                f"before it): "
                                f"{failed[name]}")
            elif which:
                failed[name] = f"in {which}: {failed[name]}"
            note(f"{name} failed: {failed[name]}")
            return runs
        if name in PEER_KEYS:
            _run_peers(name, runs[-1], peers, opts, progress)
    return runs


def _check_usage(args: argparse.Namespace) -> None:
    """Refuse, before anything runs, what would fail or be lost only at the end of a long run:
    a peer URL that names no peer, two peers of one kind, an output file that cannot be written
    (or a plot not named .png), a plot without matplotlib. Raises the CLI's `usage` error."""
    from bench import peers
    from broker.cli import EXIT_USAGE, CliError

    def usage(message: str) -> CliError:
        return CliError(EXIT_USAGE, "usage", f"homing bench: {message}")

    chosen = set(SCENARIOS) if "all" in args.scenario else set(args.scenario)
    if "latency" in chosen and min(args.rates) * args.duration < 10:
        raise usage(f"argument --duration: {args.duration:g} s at {min(args.rates):,}/s is "
                    "fewer than 10 messages to measure; give a longer --duration")
    kinds = set()
    for url in args.peer:
        problem = peers.url_problem(url)
        if problem:
            raise usage(f"argument --peer: {problem}")
        if peers.peer_name(url) in kinds:
            raise usage(f"argument --peer: one peer of each kind, not two {peers.peer_name(url)}")
        kinds.add(peers.peer_name(url))
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        if path is None:
            continue
        problem = _output_problem(path, png=option == "--plot")
        if problem:
            raise usage(f"argument {option}: {problem}")
    if args.load_sched == "batch" and not hasattr(os, "SCHED_BATCH"):
        raise usage("argument --load-sched: batch needs SCHED_BATCH (Linux)")
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise usage("argument --plot: needs matplotlib: pip install 'homing[bench]' (or pip "
                        "install matplotlib)") from None


def _output_problem(path: str, *, png: bool) -> str | None:
    """Why the bench could not write its output file `path` at the end of the run, or None.

    Tried now by opening the file (a new one is made and removed again): a folder's mode bits
    say nothing of /proc, a read-only mount or ACLs, and nothing at all to root. A plot must be
    named .png: matplotlib takes its format from the name, so `x.jpg` was a JPEG and `x` became
    `x.png`, while the bench said it wrote `x`.

    A symlink is followed, as the write at the end follows it (and a shell's `>`): one to a
    file not made yet (dangling) is tried by making that file; it was refused as `cannot write
    LINK: File exists`, the test file's O_EXCL meeting the link itself."""
    if not path:
        return "give a file name"
    if os.path.isdir(path):
        return f"{path} is a folder; name the file to write"
    if png and not path.lower().endswith(".png"):
        return f"{path}: the plot is a PNG: name it FILE.png"
    dangling = os.path.islink(path) and not os.path.exists(path)
    target = os.path.realpath(path) if dangling else path
    try:
        if not os.path.exists(target):
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            os.unlink(target)
        elif os.path.isfile(target):
            open(target, "ab").close()  # writes nothing: its content stays until the end
        elif not os.access(target, os.W_OK):  # a FIFO or a device: opening one may wait
            return f"cannot write {path}: permission denied"
    except OSError as exc:
        why = exc.strerror or str(exc)
        if dangling:
            return (f"cannot write {path}: it is a symlink to {target}, which does not exist "
                    f"and cannot be made: {why}")
        return f"cannot write {path}: {why}"
    return None


def _write_outputs(args: argparse.Namespace, doc: dict, results: dict) -> list[str]:
    """Write the --json and --plot files (no plot when the run has nothing to draw: said on
    stderr); the ones that could not be written, with why (the run's figures are on stdout
    already, so one lost file does not lose the other)."""
    from bench import report

    lost = []
    for option, path, write in (
            ("--json", args.json, lambda: report.write_json(args.json, doc)),
            ("--plot", args.plot, lambda: report.plot(args.plot, results))):
        if path is None:
            continue
        try:
            unwritten = write()
        except OSError as exc:
            lost.append(f"could not write {path}: {exc.strerror or exc}")
            continue
        if unwritten:  # nothing to put in it: said, not an error (the figures are all there)
            note(f"homing bench: {option}: {unwritten}; {path} not written")
        else:
            note(f"wrote {path}")
    return lost


def _cpu_list(cpus: list[int]) -> str:
    return ",".join(map(str, cpus))


def _broker(opts: dict):
    from bench.harness import BrokerProcess
    from bench.placement import server_cpus

    return BrokerProcess(window=opts["window"], extra=list(opts["broker_arg"]),
                         cpus=server_cpus(opts))


def run_throughput(opts: dict, progress: Progress) -> dict:
    from bench import scenarios

    with _broker(opts) as broker:
        return scenarios.throughput(broker, opts, progress)


def run_latency(opts: dict, progress: Progress) -> list[dict]:
    from bench import scenarios

    out = []
    for rate in opts["rates"]:
        with _broker(opts) as broker:
            out.append(scenarios.latency(broker, opts, rate, progress))
    return out


def run_fanout(opts: dict, progress: Progress) -> list[dict]:
    from bench import scenarios

    with _broker(opts) as broker:
        return [scenarios.fanout(broker, opts, k, progress) for k in opts["subscribers"]]


def run_connections(opts: dict, progress: Progress) -> dict:
    from bench import scenarios

    with _broker(opts) as broker:
        return scenarios.connections(broker, opts, progress)


def run_catchup(opts: dict, progress: Progress) -> dict:
    from bench import scenarios

    with _broker(opts) as broker:
        return scenarios.catchup(broker, opts, progress)


def run_replay(opts: dict, progress: Progress) -> dict:
    from bench import scenarios

    return scenarios.replay(opts, progress)


RUNNERS = {"throughput": run_throughput, "latency": run_latency, "fanout": run_fanout,
           "connections": run_connections, "catchup": run_catchup, "replay": run_replay}


# The scenarios run against peers too, and the figures compared (homing/peer) in each.
PEER_KEYS = {"throughput": ("msgs_per_s", "sends_per_s"),
             "latency": ("p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms", "achieved_per_s")}


def _reach_peers(urls: list[str]) -> dict:
    """Each peer's status by name: reachable or why not (an unreachable one is skipped)."""
    from bench import peers

    status = {}
    for url in urls:
        name = peers.peer_name(url)
        problem = peers.unreachable(url)
        if problem:
            note(f"peer {url} not reachable ({problem}); going on without it")
            status[name] = {"url": url, "reachable": False, "reason": problem}
        else:
            status[name] = {"url": url, "reachable": True, "client": peers.clients(name)}
            missing = peers.missing_speedups(name)
            if missing:
                note(f"peer {name}: its client runs without {' and '.join(missing)}, so its "
                     "figures will measure the Python client more than the server (pip install "
                     "'homing[bench]'; docs/BENCHMARKS.md, \"Method\")")
    return status


def _not_compared(status: dict) -> list[str]:
    """A line for each peer asked for that was not reachable or failed, for the report."""
    out = []
    for name, st in status.items():
        if not st["reachable"]:
            out.append(f"peer {name} ({st['url']}) not compared: not reachable ({st['reason']})")
        elif "error" in st:
            out.append(f"peer {name} ({st['url']}) failed and was not run again: "
                       f"{st['error']}")
    return out


def _run_peers(name: str, result: Any, status: dict, opts: dict, progress: Progress) -> None:
    """Run scenario `name` against each reachable peer that has not failed; attach its figures
    and the homing/peer ratios to homing's `result` of the same round."""
    from bench import peers

    for peer_name, st in status.items():
        if not st["reachable"] or "error" in st:
            continue
        url = st["url"]
        try:
            if name == "throughput":
                note(f"== throughput vs {peer_name}")
                _attach(result, peer_name, peers.throughput(url, opts, progress), PEER_KEYS[name])
            else:
                for entry in result:
                    note(f"== latency {entry['rate']:g}/s vs {peer_name}")
                    _attach(entry, peer_name, peers.latency(url, opts, entry["rate"], progress),
                            PEER_KEYS[name])
        except Exception as exc:  # a peer failing mid-run must not lose homing's figures
            note(f"peer {url} failed: {type(exc).__name__}: {exc}")
            st["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            progress.clear()


def _attach(entry: dict, name: str, peer: dict, keys: tuple[str, ...]) -> None:
    entry.setdefault("peer", {})[name] = peer
    entry.setdefault("ratio", {})[name] = {
        k: round(entry[k] / peer[k], 3) for k in keys if peer.get(k) and k in entry}
