"""The bot of docs/CLIENT.md ("A bot answering many customers") at scale, with real
processes: `homing serve` and the bot (tests/broker/bot_child.py runs the guide's code) as
children, the customers SDK clients of this process. Review of 2026-12-05 ("botscale"):
the guide described `done` for a bot without showing one; one written from it stalled for
good behind a question that never finished and died on a reply refused `rate_limited`."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from tests.faults.conftest import scaled
from tests.procs import BrokerProcess

ROOT = Path(__file__).resolve().parents[2]


class Bot:
    """tests/broker/bot_child.py as a child process: start, SIGKILL, start again."""

    def __init__(self, bp: BrokerProcess, *flags: str) -> None:
        self.bp, self.flags = bp, flags
        self.proc: subprocess.Popen | None = None
        self.log = bp.data.parent / "bot.log"
        self.kills = 0

    def start(self) -> None:
        env = {**os.environ, "HOMING_TOKEN": self.bp.token("bot", "service"),
               "HOMING_SERVER": self.bp.server,
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.broker.bot_child", *self.flags],
                cwd=ROOT, env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
            self.kills += 1

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def answered(self) -> int:
        """How many questions the bot began to answer, over all its runs (repeats included)."""
        return self.log.read_text(errors="replace").count("answering ")

    def log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])


class Customers:
    """`n` customers, each an SDK client of its own: they ask their questions (`body(i, q)`,
    `cid` customer-q) spread over `spread` seconds, count the replies they are delivered, and
    at `check` read their conversation with the bot back with `history`."""

    def __init__(self, bp: BrokerProcess, n: int, questions: int, spread: float,
                 body) -> None:
        self.bp, self.n, self.k, self.spread, self.body = bp, n, questions, spread, body
        self.replies = 0
        self.all_replied = trio.Event()
        self.check = trio.Event()
        self.convs: dict[str, list] = {}  # customer -> its conversation's messages, oldest first
        self.asked: dict[str, tuple[str, list[int]]] = {}  # customer -> conv, question seqs

    async def run(self) -> None:
        handshakes = trio.Semaphore(100)
        async with trio.open_nursery() as n:
            for i in range(self.n):
                n.start_soon(self._customer, i, handshakes)

    async def _customer(self, i: int, handshakes: trio.Semaphore) -> None:
        user, rng = f"cust{i}", random.Random(i)
        await handshakes.acquire()
        async with self.bp.client(user, "phone", reconnect_timeout=None) as c:
            handshakes.release()
            got = trio.Event()

            async def listen() -> None:
                seen = 0
                async for d in c.deliveries():
                    await c.ack(d)
                    seen += 1
                    self.replies += 1
                    if self.replies >= self.n * self.k:
                        self.all_replied.set()
                    if seen == self.k:
                        got.set()

            async with trio.open_nursery() as n:
                n.start_soon(listen)
                conv, seqs = None, []
                for q in range(self.k):
                    await trio.sleep(rng.uniform(0, self.spread / self.k))
                    r = await c.send(self.body(i, q), to="bot", cid=f"{user}-q{q}")
                    conv = r.conv
                    seqs.append(r.seq)
                self.asked[user] = conv, seqs
                await got.wait()
                await self.check.wait()
                page = await c.history(conv, order="oldest", limit=200)
                assert not page.more
                self.convs[user] = list(page.messages)
                n.cancel_scope.cancel()

    def verify(self) -> int:
        """Every question answered exactly once, by a reply whose cid names it; returns how
        many customers had a reply come before that of an earlier question."""
        assert len(self.convs) == self.n
        out_of_order = 0
        for user, messages in self.convs.items():
            conv, questions = self.asked[user]
            assert [m.seq for m in messages if m.sender == user] == questions, user
            replies = [m.cid for m in messages if m.sender == "bot"]
            assert sorted(replies) == sorted(f"{conv}:{q}" for q in questions), (user, replies)
            out_of_order += replies != [f"{conv}:{q}" for q in questions]
        return out_of_order


def _body(slow_share: float):
    def body(i: int, q: int) -> str:
        slow = random.Random(i * 100 + q).random() < slow_share
        return f"{'slow' if slow else 'quick'} question {q} of cust{i}"
    return body


@pytest.fixture
def broker(tmp_path):
    bp = BrokerProcess(tmp_path / "data")
    bp.start()
    try:
        yield bp
    finally:
        bp.kill()


async def test_bot_killed_and_restarted_answers_every_question_once(broker):
    """500 customers ask 3 questions each over 10 s, one in 20 slow (0.5 s); the bot is
    SIGKILLed at random moments and started again. Each question is answered exactly once in
    the customer's conversation (a reply repeated after a kill is a dup of the first)."""
    await _kill_and_restart(broker, customers=500, kills=3)


@pytest.mark.long
async def test_bot_of_2000_customers_killed_many_times_answers_every_question_once(broker):
    """As above with HOMING_LONG_SCALE x 2,000 customers and x 4 kills (at least 200 and 3)."""
    await _kill_and_restart(broker, customers=scaled(2000, 200), kills=scaled(4, 3))


async def _kill_and_restart(bp: BrokerProcess, customers: int, kills: int) -> None:
    rng = random.Random(7)
    bot = Bot(bp)
    crowd = Customers(bp, customers, 3, spread=10.0, body=_body(0.05))
    bot.start()
    try:
        with trio.fail_after(120):
            async with trio.open_nursery() as n:
                n.start_soon(crowd.run)
                for _ in range(kills):
                    await trio.sleep(rng.uniform(0.5, 3.0))
                    bot.kill()
                    await trio.sleep(rng.uniform(0, 0.3))
                    bot.start()
                with trio.move_on_after(60):
                    await crowd.all_replied.wait()
                assert crowd.all_replied.is_set(), (
                    f"{crowd.replies} of {customers * 3} questions answered 60 s after "
                    f"{bot.kills} kills")
                # One kill more once all is answered, and a last run: whatever was answered
                # but not acked is handed over again, and answered as a dup.
                bot.kill()
                bot.start()
                await trio.sleep(3)
                assert bot.alive(), bot.log_tail()
                kills = bot.kills
                crowd.check.set()
    finally:
        bot.kill()
    out_of_order = crowd.verify()
    repeats = bot.answered() - customers * 3
    print(f"{customers} customers, {kills} kills, {crowd.replies} replies delivered, "
          f"{repeats} questions answered again after a kill, "
          f"{out_of_order} customers with a reply before an earlier question's")
    assert crowd.replies == customers * 3
    assert repeats > 0, "no kill came while a question was in hand: nothing was tried"


async def test_a_question_that_never_finishes_stalls_the_bot_until_a_per_question_limit(broker):
    """One question whose handling never ends, then thousands of others. `done` acks nothing
    past it, so once the bot holds `--window` deliveries unacked the broker sends it no more:
    the bot answers the window's worth and waits for good, and a restart does not help (it is
    handed the same question first, and hangs on it again). A per-question limit after which
    the bot answers with an apology and calls `done` (CLIENT.md, "A bot answering many
    customers") lets everything through."""
    n = 1000
    bot = Bot(broker)
    bot.start()
    try:
        async with broker.client("stuck", "phone") as stuck:
            await stuck.send("hang on this one", to="bot", cid="stuck-q0")
            crowd = Customers(broker, n, 1, spread=2.0, body=_body(0.0))
            with trio.fail_after(90):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(crowd.run)
                    while crowd.replies < 255:  # the window (256) less the one
                        await trio.sleep(0.05)
                    await trio.sleep(2)
                    stalled = crowd.replies
                    assert stalled == 255  # and no more
                    bot.kill()
                    bot.start()  # the same bot again: it hangs on the same question
                    await trio.sleep(3)
                    assert crowd.replies == stalled
                    bot.kill()
                    bot = Bot(broker, "--limit", "1")
                    bot.start()
                    started = trio.current_time()
                    await crowd.all_replied.wait()
                    took = trio.current_time() - started
                    crowd.check.set()
                sorry = await stuck.deliveries().receive()  # the stuck question: an apology
                assert sorry.sender == "bot" and sorry.body.startswith("Sorry")
                page = await stuck.history(sorry.conv, order="oldest")
                assert [(m.sender, m.cid) for m in page.messages] == [
                    ("stuck", "stuck-q0"), ("bot", f"{sorry.conv}:1")]
    finally:
        bot.kill()
    crowd.verify()
    print(f"window 256: {stalled} of {n} questions answered before the stall; "
          f"with a 1 s limit per question the rest took {took:.1f} s")


async def test_a_bot_answering_faster_than_send_rate_answers_everything(tmp_path):
    """A backlog of 1,000 questions and a broker whose `--send-rate` (200 /s here; 5,000 /s by
    default, which a bot with a large `--window` reaches on a fast machine) is below the rate
    the bot answers at: sends refused `rate_limited` are tried again, and every question is
    answered once. A bot that lets a refused send raise dies with its nursery, and its next
    run is handed the same backlog."""
    bp = BrokerProcess(tmp_path / "data", "--send-rate", "200")
    bp.start()
    bot = Bot(bp)
    try:
        crowd = Customers(bp, 200, 5, spread=0.0, body=_body(0.0))
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(crowd.run)
                while len(crowd.asked) < crowd.n:
                    await trio.sleep(0.05)
                bot.start()
                with trio.move_on_after(30):
                    await crowd.all_replied.wait()
                assert crowd.all_replied.is_set(), (
                    f"{crowd.replies} of 1000 answered; the bot "
                    f"{'runs' if bot.alive() else 'died'}:\n{bot.log_tail()}")
                crowd.check.set()
    finally:
        bot.kill()
        bp.kill()
    crowd.verify()
