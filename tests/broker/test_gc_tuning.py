"""`homing serve` tunes the cyclic garbage collector of its own process (docs/OPERATIONS.md)."""

from __future__ import annotations

import subprocess
import sys

# A real `homing serve` (broker.cli.main, as the entry point runs it) in a child process; a
# thread of that process reads the collector's settings once the port takes connections, then
# stops the broker with SIGTERM.
SERVE = """
import gc, os, signal, socket, sys, threading, time
from broker import cli
data, port, threshold = sys.argv[1], int(sys.argv[2]), sys.argv[3]
frozen = gc.get_freeze_count()

def probe():
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.05)
    print("GC", gc.get_threshold()[0], gc.get_freeze_count() > frozen, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=probe, daemon=True).start()
sys.exit(cli.main(["serve", "--data", data, "--port", str(port), "--log-level", "warning",
                   "--gc-young-threshold", threshold]))
"""


def test_serve_freezes_startup_objects_and_sets_the_young_threshold(tmp_path):
    """Run in a child process: the settings are process-wide and must not leak into pytest.
    The child is `homing serve` itself, so the test fails if serve stops tuning the collector
    or ignores --gc-young-threshold (calling `tune_gc` directly could not see either)."""
    from tests.procs import free_port

    proc = subprocess.run([sys.executable, "-c", SERVE, str(tmp_path / "data"),
                           str(free_port()), "1234"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    probed = [line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("GC ")]
    assert probed == [["1234", "True"]], (proc.stdout[-3000:], proc.stderr[-3000:])


def test_the_flag_reaches_the_config():
    """`--gc-young-threshold` is a documented serve flag with the Config default."""
    from broker.cli import build_parser
    from broker.config import Config

    args = build_parser().parse_args(["serve"])
    assert args.gc_young_threshold == Config().gc_young_threshold == 100_000
    args = build_parser().parse_args(["serve", "--gc-young-threshold", "700"])
    assert args.gc_young_threshold == 700
