"""`homing serve` tunes the cyclic garbage collector of its own process (docs/OPERATIONS.md)."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import gc
from broker.cli import tune_gc
frozen = gc.get_freeze_count()
tune_gc(1234)
print(gc.get_threshold()[0], gc.get_freeze_count() > frozen)
"""


def test_serve_freezes_startup_objects_and_sets_the_young_threshold():
    """Run in a child process: the settings are process-wide and must not leak into pytest."""
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True,
                         check=True, timeout=60).stdout.split()
    assert out == ["1234", "True"]


def test_the_flag_reaches_the_config():
    """`--gc-young-threshold` is a documented serve flag with the Config default."""
    from broker.cli import build_parser
    from broker.config import Config

    args = build_parser().parse_args(["serve"])
    assert args.gc_young_threshold == Config().gc_young_threshold == 100_000
    args = build_parser().parse_args(["serve", "--gc-young-threshold", "700"])
    assert args.gc_young_threshold == 700
