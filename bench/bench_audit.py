"""A data directory to time `homing audit` on: a mixed log of about N events.

Run `python -m bench.bench_audit --events 1000000 --data DIR` (DIR is replaced). 300 users; 40
groups of 20 made first; then batches of 4,096 commands through `Store.execute`, one second of
log time apart: 65 % direct messages between random users (each new pair's first one creates
the conversation), 23 % posts into the groups, 9 % acks (up to the sender's inbox head after the
previous batch, on one of two devices), 2.5 % read marks, a few invites and leaves; refused
commands (a non-member's) are left out of the log. Seeded, so the same N gives the same log.
docs/OPERATIONS.md ("Limits", what grows with the data) gives the audit commands' times and
memory on it. This is not a test.
"""

from __future__ import annotations

import argparse
import logging
import random
import shutil
import time

import structlog

from storage.commands import Ack, CreateConv, Invite, Leave, MarkRead, SendMessage
from storage.store import Store

USERS = [f"user{i:03d}" for i in range(300)]
GROUPS, GROUP_SIZE, BATCH = 40, 20, 4096
START_US = 1_795_000_000_000_000


def build(path: str, events: int, seed: int = 7) -> int:
    """Write the mixed log into a fresh data directory at `path`; return its last LSN."""
    shutil.rmtree(path, ignore_errors=True)
    rnd = random.Random(seed)
    store = Store.open(path, map_size=1 << 32)
    try:
        members = [rnd.sample(USERS, GROUP_SIZE) for _ in range(GROUPS)]
        outs = store.execute([CreateConv(m[0], "d1", "user", "group", f"g{g}", False,
                                         tuple(m[1:]), f"mk{g}")
                              for g, m in enumerate(members)], now_us=START_US)
        groups = [out.reply["conv"] for out in outs]
        heads: dict[str, int] = {}
        now, n = START_US, 0
        while store.last_lsn() < events:
            cmds = []
            for _ in range(BATCH):
                n += 1
                x, a, g = rnd.random(), rnd.choice(USERS), rnd.randrange(GROUPS)
                if x < 0.65:
                    b = rnd.choice(USERS)
                    if b != a:
                        cmds.append(SendMessage(a, "d1", "user", f"c{n}", "hello " * 6, to=b))
                elif x < 0.88:
                    cmds.append(SendMessage(rnd.choice(members[g]), "d1", "user", f"c{n}",
                                            "group post " * 4, conv=groups[g]))
                elif x < 0.97:
                    if heads.get(a):
                        cmds.append(Ack(a, rnd.choice(("d1", "d2")), "user", heads[a]))
                elif x < 0.995:
                    cmds.append(MarkRead(rnd.choice(members[g]), "d1", "user", groups[g],
                                         1 << 40))
                elif x < 0.998:
                    cmds.append(Invite(members[g][0], "d1", "user", groups[g], a))
                else:
                    cmds.append(Leave(rnd.choice(members[g][1:]), "d1", "user", groups[g]))
            now += 1_000_000
            for out in store.execute(cmds, now_us=now):
                if out.error is None:
                    heads.update(out.effects.inbox_heads)
        return store.last_lsn()
    finally:
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="events, about")
    parser.add_argument("--data", required=True, help="data directory to (re)create")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    started = time.perf_counter()
    last = build(args.data, args.events)
    print(f"built {args.data}: {last:,} events in {time.perf_counter() - started:.1f}s")


if __name__ == "__main__":
    main()
