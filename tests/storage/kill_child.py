"""Child process for the kill test: append batches through a Store, print each acked LSN.

Usage: python kill_child.py DATA_DIR SEED. A line `ACK <lsn>` is printed (and flushed) only
after `Store.execute` returned, i.e. after the durable commit.
"""

from __future__ import annotations

import random
import sys

from storage.commands import Ack, SendMessage
from storage.store import Store


def main() -> None:
    path, seed = sys.argv[1], int(sys.argv[2])
    rng = random.Random(seed)
    store = Store.open(path)
    users = [f"u{i}" for i in range(6)]
    n = store.last_lsn()
    while True:
        batch = []
        for _ in range(rng.randint(1, 64)):
            a, b = rng.sample(users, 2)
            n += 1
            if rng.random() < 0.1:
                batch.append(Ack(a, "d", "user", store.inbox_head(a)))
            else:
                batch.append(SendMessage(a, "d", "user", f"{seed}-{n}", "x" * 200, to=b))
        outcomes = store.execute(batch)
        last = max((o.lsn for o in outcomes), default=0)
        sys.stdout.write(f"ACK {max(last, store.last_lsn())}\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
