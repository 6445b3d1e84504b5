"""Tailing the event log: follow durable events as they are committed, without polling.

The log itself (storage/) never waits; this is the trio side. A tail reads what is durable in
chunks and then sleeps on the committer's "LSN moved" event until more is durable. It is what a
replicator to another log backend (e.g. NATS JetStream) or a live audit feed builds on.

A read that fails (`StorageError`: the reader table full of other processes' readers) is
transient to the broker, which answers that one request `unavailable` and goes on; a tail,
which keeps its own place, logs `tail_read_failed` and reads again after a pause that doubles
from `retry_first_s` to `retry_max_s`, so its consumer sees no error and no gap. A `CorruptLog`
is no passing condition: it ends the tail.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import structlog
import trio

from broker.committer import Committer
from storage.errors import CorruptLog, StorageError

log = structlog.get_logger("homing")

CHUNK_EVENTS = 1024
RETRY_FIRST_S = 0.05  # the pause after a failed read; it doubles while reads fail
RETRY_MAX_S = 2.0  # up to this (a log line each time)


async def tail(store: Any, committer: Committer, from_lsn: int = 1, *,
               retry_first_s: float = RETRY_FIRST_S,
               retry_max_s: float = RETRY_MAX_S) -> AsyncIterator[Any]:
    """Yield every event with lsn >= `from_lsn`, in order, forever, as each becomes durable;
    reads that fail are retried (see above)."""
    next_lsn = from_lsn
    pause = retry_first_s
    while True:
        last = committer.committed_lsn
        while next_lsn <= last:
            upto = min(last, next_lsn + CHUNK_EVENTS - 1)
            try:
                # Read whole before any is yielded: a failure part-way repeats none of them.
                events = list(store.read_events(next_lsn, upto))
            except CorruptLog:
                raise
            except StorageError as exc:
                log.error("tail_read_failed", from_lsn=next_lsn, retry_in=pause, reason=str(exc))
                await trio.sleep(pause)
                pause = min(pause * 2, retry_max_s)
                continue
            pause = retry_first_s
            for event in events:
                yield event
            next_lsn = upto + 1
        await committer.wait_lsn_above(last)
