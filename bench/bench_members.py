"""Membership changes in a big group: what an invite, a join and the post after one cost.

In a group of `--members` (10,000: the `--max-members` default), on a fresh data directory
each run, with the store as `homing serve` drives it (`Store.execute` is the commit thread's
work: the rules, the projections, the durable commit):

* invites one per commit: the time of each `execute` (wall, and the thread's CPU: the part
  that is not the disk's sync), against a commit of the same kind that changes nothing (an
  invite of a member: the floor, mostly the sync);
* invites 100 to a commit: the time of each batch, and per invite;
* an admin stepping down, one a commit: made a member (after being made an admin again), and
  leaving (after being invited as an admin), each after a change to the group as after any
  invite or join; the rules ask whether someone who can invite is left;
* a post right after a join (one commit each) against a post after a post: the post's
  fan-out writes an inbox entry per member either way, and read the member list again after
  each change;
* the broker's side of a join: `fanout.on_committed` of the join, then the next
  `Broker.roster` of the group (what a receipt or a typing notice asks first), on the event
  loop, against a roster already cached.

Each figure is the median over the runs (`--runs`, 3) of each run's median. The CPU figures
are steadier than the wall ones where other work shares the machine (the syncs wait for it). Run
`python -m bench.bench_members [--members N] [--runs K] [--invites N]`. Prints figures; this
is not a test.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from broker.config import Config
from broker.fanout import on_committed
from broker.server import Broker
from storage.commands import CreateConv, Invite, Join, Leave, SendMessage, SetMute, SetRole
from storage.rules import Limits
from storage.store import Store

BATCH = 100


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    """Run `fn`; return its wall and thread CPU time in ms."""
    wall, cpu = time.perf_counter(), time.thread_time()
    fn()
    return (time.perf_counter() - wall) * 1e3, (time.thread_time() - cpu) * 1e3


def _ok(outcomes) -> None:
    for out in outcomes:
        assert out.error is None, out.error


def one_run(members: int, invites: int) -> dict[str, float]:
    """One fresh directory: a group of `members`, then the measures; medians in ms."""
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="homing-bench-members-") as tmp:
        # Room for the batches' invites past `members` (the limit is not what is measured).
        limit = members + invites + 2 * BATCH * 5 + 100
        store = Store.open(str(Path(tmp) / "data"), map_size=2 << 30,
                           limits=Limits(max_members=limit))
        try:
            first = tuple(f"m{i:06d}" for i in range(members - 1))
            (made,) = store.execute([CreateConv("own", "d1", "user", "group", "big", True,
                                                first)])
            conv = made.reply["conv"]
            post = iter(range(1_000_000))

            def send() -> None:
                _ok(store.execute([SendMessage("own", "d1", "user", f"p{next(post)}", "hi",
                                               conv=conv)]))

            send()  # the member list cached by the commit thread, as after any post

            def invite(user: str) -> Callable[[], None]:
                return lambda: _ok(store.execute([Invite("own", "d1", "user", conv, user,
                                                         "member")]))

            def mute(i: int) -> Callable[[], None]:
                return lambda: _ok(store.execute([SetMute("own", "d1", "user", conv,
                                                          i % 2 == 0)]))

            mutes = [_timed(mute(i)) for i in range(invites)]
            single = [_timed(invite(f"i{i:06d}")) for i in range(invites)]
            out["mute_wall"] = statistics.median(w for w, _ in mutes)
            out["mute_cpu"] = statistics.median(c for _, c in mutes)
            out["invite_wall"] = statistics.median(w for w, _ in single)
            out["invite_cpu"] = statistics.median(c for _, c in single)

            batches = []
            for b in range(5):
                cmds = [Invite("own", "d1", "user", conv, f"b{b}x{i:04d}", "member")
                        for i in range(BATCH)]
                batches.append(_timed(lambda cmds=cmds: _ok(store.execute(cmds))))
            out["batch_wall"] = statistics.median(w for w, _ in batches)
            out["batch_cpu"] = statistics.median(c for _, c in batches)

            def role(user: str, to: str) -> Callable[[], None]:
                return lambda: _ok(store.execute([SetRole("own", "d1", "user", conv, user, to)]))

            demotes, leaves = [], []
            for i in range(invites):
                role("m000000", "admin")()
                demotes.append(_timed(role("m000000", "member")))
                _ok(store.execute([Invite("own", "d1", "user", conv, f"s{i:06d}", "admin")]))
                leaves.append(_timed(lambda i=i: _ok(store.execute(
                    [Leave(f"s{i:06d}", "d1", "user", conv)]))))
            out["demote_cpu"] = statistics.median(c for _, c in demotes)
            out["leave_cpu"] = statistics.median(c for _, c in leaves)

            after_post, after_join = [], []
            for i in range(20):
                after_post.append(_timed(send))
                _ok(store.execute([Join(f"j{i:04d}", "d1", "user", conv)]))
                after_join.append(_timed(send))
            out["post_after_post"] = statistics.median(w for w, _ in after_post)
            out["post_after_post_cpu"] = statistics.median(c for _, c in after_post)
            out["post_after_join"] = statistics.median(w for w, _ in after_join)
            out["post_after_join_cpu"] = statistics.median(c for _, c in after_join)

            broker = Broker(Config(data_dir=Path(tmp) / "data", port=0), store)
            broker.roster(conv)
            cached, changed = [], []
            for i in range(20):
                cached.append(_timed(lambda: broker.roster(conv))[0])
                cmds = [Join(f"k{i:04d}", "d1", "user", conv)]
                outs = store.execute(cmds)
                _ok(outs)

                def after_commit(cmds=cmds, outs=outs) -> None:
                    on_committed(broker, cmds, outs)
                    broker.roster(conv)

                changed.append(_timed(after_commit)[0])
            out["roster_cached"] = statistics.median(cached)
            out["roster_after_join"] = statistics.median(changed)
            assert len(broker.roster(conv).users) == len(store.members(conv))
        finally:
            store.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--invites", type=int, default=100)
    args = parser.parse_args()
    logging.disable(logging.CRITICAL)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    runs = [one_run(args.members, args.invites) for _ in range(args.runs)]

    def fig(name: str) -> str:
        values = [r[name] for r in runs]
        return f"{statistics.median(values):.3f} ms (runs: {', '.join(f'{v:.2f}' for v in values)})"

    print(f"group of {args.members} members, {args.runs} runs, medians")
    print(f"invite one a commit:        {fig('invite_wall')} wall, {fig('invite_cpu')} CPU")
    print(f"  a mute, one a commit:     {fig('mute_wall')} wall, {fig('mute_cpu')} CPU")
    print(f"{BATCH} invites in one commit:   {fig('batch_wall')} wall, {fig('batch_cpu')} CPU")
    print(f"admin made a member:        {fig('demote_cpu')} CPU")
    print(f"admin leaving:              {fig('leave_cpu')} CPU")
    print(f"post after a post:          {fig('post_after_post')} wall, "
          f"{fig('post_after_post_cpu')} CPU")
    print(f"post after a join:          {fig('post_after_join')} wall, "
          f"{fig('post_after_join_cpu')} CPU")
    print(f"broker roster, cached:      {fig('roster_cached')}")
    print(f"broker join commit+roster:  {fig('roster_after_join')}")


if __name__ == "__main__":
    main()
