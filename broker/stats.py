"""The `broker_stats` log line: every `--stats-interval` seconds, what the broker holds and what
it did since the line before, for an operator to graph and alert on (docs/OPERATIONS.md,
"Logs"). It reads counters the broker keeps anyway; nothing on the message path counts for it
but the refusals by the rate limits (`rate_limited`), a line each of which would flood the log.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from broker.server import Broker

_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_mib() -> float | None:
    """The process's resident memory in MiB (Linux's /proc/self/statm), or None elsewhere."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return round(int(f.read().split()[1]) * _PAGE_BYTES / (1 << 20), 1)
    except (OSError, IndexError, ValueError):
        return None


async def report_stats(broker: Broker, every: float) -> None:
    """Log `broker_stats` every `every` seconds until cancelled."""
    committer = broker.committer
    then, cpu = time.monotonic(), time.process_time()
    lsn, batches, commands = committer.committed_lsn, committer.batches, committer.commands
    failed, rate_limited = committer.failed, broker.rate_limited
    while True:
        await trio.sleep(every)
        now, cpu_now = time.monotonic(), time.process_time()
        elapsed = max(now - then, 1e-9)
        events_per_s = round((committer.committed_lsn - lsn) / elapsed, 1)
        broker.log.info(
            "broker_stats",
            connections=broker.hub.count, requests_only=broker.hub.requests_only,
            handshaking=broker.handshaking,
            lsn=committer.committed_lsn, queued=committer.queued,
            committing=committer.committing,
            events_per_s=events_per_s,
            commits_per_s=round((committer.batches - batches) / elapsed, 1),
            commands_per_s=round((committer.commands - commands) / elapsed, 1),
            failed_per_s=round((committer.failed - failed) / elapsed, 1),
            rate_limited_per_s=round((broker.rate_limited - rate_limited) / elapsed, 1),
            cpu_pct=round(100 * (cpu_now - cpu) / elapsed, 1), rss_mib=rss_mib())
        if broker.notifier is not None and not broker.stopping:  # `systemctl status` shows it
            broker.notifier.notify(STATUS=f"serving {broker.config.host}:{broker.port}: "
                                          f"{broker.hub.count} connections, "
                                          f"{events_per_s:.0f} events/s, "
                                          f"lsn {committer.committed_lsn}")
        then, cpu = now, cpu_now
        lsn, batches, commands = committer.committed_lsn, committer.batches, committer.commands
        failed, rate_limited = committer.failed, broker.rate_limited
