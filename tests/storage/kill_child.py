"""Child process for the kill test: append through a Store, print each acked send.

Usage: python kill_child.py DATA_DIR SEED MODE. A line `ACK <lsn> <cid>` is printed (and
flushed) for every accepted send, only once its commit is durable:

- MODE `batch`: random batches of sends and acks go straight to `Store.execute` (one write
  transaction, one durable commit a batch); the lines of a batch follow its return.
- MODE `committer`: 16 trio tasks submit sends (and device acks) through the broker's group
  commit (`broker.committer.Committer`, the commit in its worker thread); each task prints its
  line when `submit` returned, i.e. when the committer told it the outcome.

It runs until it is killed; it never exits by itself (an exit means it failed).
"""

from __future__ import annotations

import random
import sys

from storage.commands import Ack, SendMessage
from storage.store import Store

BODY = "x" * 200
USERS = [f"u{i}" for i in range(6)]


def _ack_line(lsn: int, cid: str) -> None:
    sys.stdout.write(f"ACK {lsn} {cid}\n")
    sys.stdout.flush()


def run_batches(store: Store, seed: int) -> None:
    rng = random.Random(seed)
    n = 0
    while True:
        batch = []
        for _ in range(rng.randint(1, 64)):
            a, b = rng.sample(USERS, 2)
            n += 1
            if rng.random() < 0.1:
                batch.append(Ack(a, "d", "user", store.inbox_head(a)))
            else:
                batch.append(SendMessage(a, "d", "user", f"{seed}-{n}", BODY, to=b))
        outcomes = store.execute(batch)
        for command, outcome in zip(batch, outcomes, strict=True):
            if type(command) is SendMessage and outcome.error is None:
                _ack_line(outcome.lsn, command.cid)


def run_committer(store: Store, seed: int) -> None:
    import trio

    from broker.committer import Committer

    async def main() -> None:
        committer = Committer(store)

        async def appender(k: int) -> None:
            rng = random.Random(seed * 100 + k)
            n = 0
            while True:
                a, b = rng.sample(USERS, 2)
                n += 1
                if rng.random() < 0.1:
                    committer.ack_nowait(Ack(a, f"d{k}", "user", store.inbox_head(a)))
                cid = f"{seed}-{k}-{n}"
                outcome = await committer.submit(SendMessage(a, f"d{k}", "user", cid, BODY, to=b))
                if outcome.error is None:
                    _ack_line(outcome.lsn, cid)

        async with trio.open_nursery() as nursery:
            await nursery.start(committer.serve)
            for k in range(16):
                nursery.start_soon(appender, k)

    trio.run(main)


def main() -> None:
    path, seed, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    store = Store.open(path)
    {"batch": run_batches, "committer": run_committer}[mode](store, seed)
    raise SystemExit("the appends stopped")


if __name__ == "__main__":
    main()
