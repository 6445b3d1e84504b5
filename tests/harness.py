"""A real broker inside the test's trio run: loopback port 0, real LMDB in a temp directory."""

from __future__ import annotations

import gc
from collections.abc import Callable, Collection
from contextlib import asynccontextmanager
from pathlib import Path

import trio
from structlog.testing import capture_logs

from broker import tokens
from broker.client import open_client
from broker.config import Config
from broker.server import Broker
from storage.rules import Limits
from storage.store import Store


class Census:
    """The objects of a type (and `where` holds of them) that the cyclic GC tracks and that
    were made since this census began, for the tests that run with the GC off and count what
    an ended session leaves alive. Those alive before (another test's in this xdist worker,
    held by its own leftovers) are left out, and held here meanwhile so that no new object
    takes the id of one. Call it after `gc.collect()`: cyclic garbage already left is
    garbage the census would leave out."""

    def __init__(self, kind: type, where: Callable[[object], bool] = lambda o: True) -> None:
        self.kind, self.where = kind, where
        self.before = [o for o in gc.get_objects() if type(o) is kind]
        self.ids = {id(o) for o in self.before}

    def __call__(self) -> int:
        """How many of them are alive now."""
        return sum(type(o) is self.kind and id(o) not in self.ids and self.where(o)
                   for o in gc.get_objects())


class Harness:
    """A running broker plus helpers to mint tokens and open SDK clients."""

    def __init__(self, broker: Broker, config: Config, logs: list[dict] | None = None) -> None:
        self.broker = broker
        self.config = config
        self.logs = [] if logs is None else logs  # the broker's log events so far
        self.server = f"127.0.0.1:{broker.port}"

    def token(self, user: str, role: str = "user", ttl: int = 3600) -> str:
        return tokens.issue(self.broker.secret, user, role, ttl)

    def client(self, user: str, device: str = "d1", role: str = "user", **kw):
        return open_client(self.server, self.token(user, role), device, **kw)


@asynccontextmanager
async def running_broker(data: Path, *, expected_errors: Collection[str] = (), **overrides):
    """A broker over a real Store, as `homing serve` builds it; the test fails if it logged an
    error (an exception in a callback, a connection handler that crashed) but for the events
    named in `expected_errors` (a test that breaks the store on purpose)."""
    config = Config(data_dir=Path(data), port=0, **overrides)
    store = Store.open(str(config.data_dir), record_cache=config.record_cache,
                       table_cache_rows=config.table_cache_rows, limits=Limits(
        max_members=config.max_members, max_body_bytes=config.max_body_bytes))
    try:
        with capture_logs() as logs:
            broker = Broker(config, store)
            async with trio.open_nursery() as nursery:
                await nursery.start(broker.serve)
                yield Harness(broker, config, logs)
                broker.shutdown()
                await broker.wait_stopped()
        errors = [e for e in logs if e.get("log_level") in ("error", "critical")
                  and e.get("event") not in expected_errors]
        assert not errors, f"the broker logged errors: {errors}"
    finally:
        store.close()
