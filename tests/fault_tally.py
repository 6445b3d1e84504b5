"""The fault summary: what each test of tests/faults tried (its `tally` fixture) and how it
ended, written as JSON to $HOMING_FAULT_SUMMARY (default: <tmp>/homing-fault-summary.json) at the
end of the run, the source of the table in docs/OPERATIONS.md.

A plugin of the whole suite (tests/conftest.py loads it), not of tests/faults alone: under
pytest-xdist the tests run in workers, each of which hands its share to the controller
(`workeroutput`), and the controller, which collects nothing, loads only the suite's top
conftest. It merges the shares and writes the file once.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path

import pytest

SUMMARY = Path(os.environ.get("HOMING_FAULT_SUMMARY",
                              Path(tempfile.gettempdir()) / "homing-fault-summary.json"))
_TALLY: dict[str, dict] = defaultdict(lambda: {"count": 0, "tests": set(), "failed": 0})


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    t = getattr(item, "_fault_tally", None)
    if t is None or report.when != "call":
        return
    for fault, n in t.counts.items():
        row = _TALLY[fault]
        row["count"] += n
        row["tests"].add(item.name)
        row["failed"] += int(report.failed)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """A worker's share, merged where the run ends (a worker that wrote the file itself would
    leave only its own tests in it)."""
    for fault, row in getattr(node, "workeroutput", {}).get("fault_tally", {}).items():
        merged = _TALLY[fault]
        merged["count"] += row["count"]
        merged["tests"].update(row["tests"])
        merged["failed"] += row["failed"]


def pytest_sessionfinish(session, exitstatus):
    rows = {k: {"count": v["count"], "tests": sorted(v["tests"]), "failed": v["failed"]}
            for k, v in sorted(_TALLY.items())}
    worker = getattr(session.config, "workeroutput", None)
    if worker is not None:  # an xdist worker: the controller writes the file
        worker["fault_tally"] = rows
        return
    if not rows:
        return
    scale = float(os.environ.get("HOMING_LONG_SCALE", "1.0"))
    try:
        SUMMARY.write_text(json.dumps({"scale": scale, "faults": rows}, indent=1))
    except OSError:
        pass
