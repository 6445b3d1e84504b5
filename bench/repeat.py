"""`homing bench --repeat N`: every scenario N times, every figure the median of its runs.

On a shared or virtual machine one run of a scenario can differ from the next by a fifth or
more (docs/BENCHMARKS.md), so a single run compares badly with a target or with a peer run a
minute later. With `--repeat`, each round runs homing and then each peer back to back, so drift
hits them alike, and the merged entry holds:

* every number: the median over the runs (an int stays an int);
* `ratio.<peer>.<key>`: the median of each round's own homing/peer ratio, not the ratio of
  the medians (the two can differ);
* `cpu.load_bound` (and any other flag): true if it was true in any run;
* `errors`: each error's count summed over the runs;
* `rounds`: each run's own entry, in order, with its round's `ratio` (a peer's runs under
  `peer.<name>.rounds`); fewer than N when a later run of the scenario failed (one, even).
"""

from __future__ import annotations

import statistics
from typing import Any


def merge(runs: list[Any]) -> Any:
    """One scenario result from the results of its runs (dicts, lists of dicts, numbers)."""
    first = runs[0]
    if len(runs) == 1:
        return first
    if isinstance(first, list):  # latency per rate, fanout per size: entry by entry
        if all(isinstance(r, list) and len(r) == len(first) for r in runs):
            return [merge([r[i] for r in runs]) for i in range(len(first))]
        return first
    if isinstance(first, dict):
        out = {}
        for key in first:
            values = [r[key] for r in runs if isinstance(r, dict) and key in r]
            out[key] = _sum_counts(values) if key == "errors" else merge(values)
        return out
    if isinstance(first, bool):
        return any(runs)
    if all(isinstance(r, int | float) and not isinstance(r, bool) for r in runs):
        middle = statistics.median(runs)
        return round(middle) if all(isinstance(r, int) for r in runs) else round(middle, 3)
    return first


def with_rounds(merged: Any, runs: list[Any], repeated: bool = False) -> Any:
    """`merged` with each entry's runs kept under `rounds` (and each peer's under its own).
    An entry of one run has none, but with `repeated` (a run of --repeat N > 1 that kept one
    round, the next having failed): then `merged` must not be that round itself."""
    if len(runs) < 2 and not (repeated and runs):
        return merged
    if isinstance(merged, list):
        for i, entry in enumerate(merged):
            with_rounds(entry, [r[i] for r in runs], repeated)
        return merged
    if isinstance(merged, dict):
        merged["rounds"] = [_without(r, "rounds", "peer") for r in runs]
        for name, peer in (merged.get("peer") or {}).items():
            peer["rounds"] = [r["peer"][name] for r in runs if name in (r.get("peer") or {})]
        if isinstance(merged.get("throughput"), dict):  # connections: the run on top
            with_rounds(merged["throughput"], [r["throughput"] for r in runs], repeated)
    return merged


def spread(entry: dict, key: str) -> tuple[Any, Any] | None:
    """(lowest, highest) of `key` over an entry's runs, None for an entry of one run."""
    values = [r[key] for r in entry.get("rounds") or () if r.get(key) is not None]
    return (min(values), max(values)) if len(values) > 1 else None


def _sum_counts(values: list[Any]) -> Any:
    if not all(isinstance(v, dict) for v in values):
        return values[0]
    out: dict[str, Any] = {}
    for counts in values:
        for name, n in counts.items():
            out[name] = out.get(name, 0) + n
    return out


def _without(entry: Any, *keys: str) -> Any:
    """A run's own figures: not `keys`, nor the run on top (kept under its own `rounds`)."""
    if not isinstance(entry, dict):
        return entry
    return {k: v for k, v in entry.items()
            if k not in keys and not (k == "throughput" and isinstance(v, dict))}
