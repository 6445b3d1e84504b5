"""Tailing the event log: follow durable events as they are committed, without polling.

The log itself (storage/) never waits; this is the trio side. A tail reads what is durable in
chunks and then sleeps on the committer's "LSN moved" event until more is durable. It is what a
replicator to another log backend (e.g. NATS JetStream) or a live audit feed builds on.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from broker.committer import Committer

CHUNK_EVENTS = 1024


async def tail(store: Any, committer: Committer, from_lsn: int = 1) -> AsyncIterator[Any]:
    """Yield every event with lsn >= `from_lsn`, in order, forever, as each becomes durable."""
    next_lsn = from_lsn
    while True:
        last = committer.committed_lsn
        while next_lsn <= last:
            upto = min(last, next_lsn + CHUNK_EVENTS - 1)
            for event in store.read_events(next_lsn, upto):
                yield event
            next_lsn = upto + 1
        await committer.wait_lsn_above(last)
