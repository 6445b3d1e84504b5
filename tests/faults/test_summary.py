"""The fault summary ($HOMING_FAULT_SUMMARY, the source of docs/OPERATIONS.md's table) holds
what every test tried, whether the tests ran one at a time or in pytest-xdist's workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Two quick tests of two files, each adding a fault of its own to the tally, picked by name
# from the whole suite as `python -m pytest` collects it (named by path, tests/faults's conftest
# would be loaded where the run ends; run whole, it is not).
PICK = "test_half_a_frame_then_close_is_dropped_cleanly or test_bad_tokens_are_unauthorized"


@pytest.mark.parametrize("workers", ["0", "2"])
def test_the_summary_holds_the_faults_of_every_test(tmp_path, workers):
    """With two workers, each ran one of the tests: the file holds both (each worker wrote
    its own half over the other's before the controller merged them)."""
    summary = tmp_path / "summary.json"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", workers, "-k", PICK],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HOMING_FAULT_SUMMARY": str(summary)})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    faults = json.loads(summary.read_text())["faults"]
    half = faults["client writes half a frame and closes"]
    assert half["tests"] == ["test_half_a_frame_then_close_is_dropped_cleanly"]
    assert half["count"] > 0 and half["failed"] == 0
    assert faults["auth: garbage token"]["tests"] == ["test_bad_tokens_are_unauthorized"]
