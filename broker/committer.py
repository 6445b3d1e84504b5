"""Group commit: many trio tasks submit commands; one task makes them durable in batches.

Rules kept here:
- An appender is told its outcome only after `Store.execute` returned, i.e. after the batch's
  single durable commit (fsync). Never before: that is the at-least-once promise.
- The commit runs in a worker thread (broker/worker.py, one for the committer's life), so the
  event loop keeps serving while the disk syncs. The next batch is handed to that thread before
  the replies and fan-out of the last one run here, so a commit's sync overlaps that work.
- Each user's commands are committed in their submission order; a batch holds everything queued
  when the previous commit finished (at most `max_batch`), so batches grow with load and latency
  stays one sync. With more queued than `max_batch`, the batch takes the users' commands in
  turns (`_fair`), not the queue's first: one user's thousands queued do not hold up another's
  one for the commits they fill (users act on each other's commands only once durable, so the
  order between users is free).
- A batch is bounded by the rows it writes, too: each command comes with a weight (`weigh`,
  the broker's estimate: a post, an inbox entry per member of its conversation), and a batch
  whose commands weigh more than `max_batch_rows` is cut in the same turns, at the first
  command that would pass it, but never below one command. A commit of 4,096 posts into a
  channel of 300 held the commit thread, and Python's lock, about 2 s (`_fair`). The estimate
  may be wrong (a channel the broker has not seen a post into since it started weighs 64), so
  the store holds the bound as it writes (`Store.execute`'s `max_rows`): it stops once the
  commands it ran wrote `max_batch_rows` rows and commits them, and the commands it did not
  run go back to the head of the queue, in their order (`_put_back`). Each stop is counted
  (`stopped`, `broker_stats`) and logged `batch_stopped`, at most once per 10 s.
- A batch that fails on a damaged projection row (`CorruptProjection`) fails only the commands
  that read it: its commands run again in halves, down to single commands (`_settle`,
  broker/isolate.py); the others commit in their order and are told as in any batch. A batch
  holding a command of a kind the store saw fail alone on a damaged row (`Store.set_aside`)
  runs it alone, and the commands around it, from the start, without a try of the whole.
- Device acks are coalesced: a later ack of the same device merges into a queued one (acks are
  cumulative high-water marks, so only the largest matters). A batch of nothing but acks waits
  up to ACK_LINGER_S for other work, since nobody waits on an ack's durability.
"""

from __future__ import annotations

import collections
import contextlib
import math
import operator
import time
from collections.abc import Callable, Iterable
from typing import Any

import structlog
import trio

from broker.isolate import Isolated, isolate
from broker.logs import Repeated
from broker.worker import Call, WorkerThread
from storage.commands import Ack, SendMessage
from storage.errors import CorruptProjection, InternalError, StorageError

log = structlog.get_logger("homing")

Done = Callable[["Pending"], None]


# The rows a batch may write, as its commands' weights estimate them (`_fair`), and as the store
# counts them while it writes (`Store.execute`'s `max_rows`: it stops there, `_put_back`): a
# batch of 4,096 direct sends weighs 8,192 (12,288 with as many acks) and is never cut by it;
# posts into a channel of 304 members are cut at 107, where 4,096 of them made a commit of
# about 2 s.
# Chosen from one run each of bench.fairness's channel flood: 16,384 cost a fifth of the posts
# committed, 65,536 doubled the quiet send's wait for about as many (docs/OPERATIONS.md, "One noisy
# service beside quiet ones").
MAX_BATCH_ROWS = 32768
ACK_LINGER_S = 0.005  # how long a batch of only acks waits for other work to share its commit
# A batch that follows one with acks, and would hold at least this many sends and nothing but
# sends and acks, takes the sends alone: the acks wait one commit, merging with their devices'
# next ones (`Committer._take`).
ACKS_EVERY_OTHER_FROM = 8


class ShuttingDown(Exception):
    """Raised to submitters once the committer stopped taking commands."""


class Pending:
    """One submitted command, waiting for its durable outcome."""

    __slots__ = ("also", "command", "context", "done", "error", "event", "outcome")

    def __init__(self, command: object, done: Done | None, context: Any = None) -> None:
        self.command = command
        self.done = done
        self.context = context  # whatever `done` needs (the request id, a reply builder)
        self.outcome: Any = None
        self.error: BaseException | None = None
        self.event: trio.Event | None = None
        self.also: list[Callable[[BaseException | None], None]] | None = None

    def when_done(self, callback: Callable[[BaseException | None], None]) -> None:
        """Call `callback(None)` after `done`, once the command is durable, or
        `callback(error)` if it failed (its batch, or the rules); at once if it is done
        already. No caller asks then now (each finds its Pending among those still on their
        way, let go before or as they are done); until 2026-12-07 one that did was never
        called, its request left unanswered."""
        if self.outcome is not None or self.error is not None:  # done (`finish`)
            callback(self.error or getattr(self.outcome, "error", None))
            return
        if self.also is None:
            self.also = [callback]
        else:
            self.also.append(callback)

    def finish(self, outcome: Any, error: BaseException | None) -> None:
        """Record the outcome and tell each waiter; raises nothing (every callback is guarded
        here, so the committer's loops call this bare)."""
        self.outcome, self.error = outcome, error
        if self.done is not None:
            # guarded here, not only by the caller: the waiters below are other requests
            # (refused resends waiting on this send, `after_sends_on_way`), each counted in its
            # session's inflight; until 2026-12-05 a `done` that raised left them unanswered
            try:
                self.done(self)
            except Exception:
                log.exception("commit_callback_failed")
        if self.event is not None:
            self.event.set()
        also = self.also
        if also is not None:
            # Let go of them: each is called once, and a callback that names this Pending (a
            # create's cid on its way, handlers._submit_create) made a cycle with it, which held
            # its session, queues and all, after the connection ended until the cyclic GC came
            # (until 2026-12-07: 1,352 sessions alive with 17 connected in a churn of groups
            # made, 589 with none once it was idle).
            self.also = None
            failed = error or getattr(outcome, "error", None)
            for callback in also:  # each its own: the others' requests still get answers
                try:
                    callback(failed)
                except Exception:
                    log.exception("commit_callback_failed")


class _Batch:
    """One batch on its way: submitted to the worker thread, then durable, then fanned out."""

    __slots__ = ("ack_pending", "acks", "aside", "call", "commands", "errors", "outcomes",
                 "pending")

    def __init__(self, pending: list[Pending], commands: list[object],
                 acks: list[tuple[tuple[str, str], int]], ack_pending: list[Pending],
                 call: Call, aside: int = 0) -> None:
        self.pending = pending
        self.commands = commands
        self.acks = acks  # ((user, device), upto) of the batch's acks
        self.ack_pending = ack_pending  # their Pending, in the same order
        self.call = call
        self.aside = aside  # commands set aside (its call is `isolate`'s, not `execute`)
        self.outcomes: list[Any] = []
        # Split (`Committer._settle`): each command's error, None for those committed (whose
        # outcomes are in `outcomes`, None for the others). None for a batch committed whole.
        self.errors: list[BaseException | None] | None = None


class Committer:
    """The group-commit coordinator; run `serve` in a nursery, then `submit` from any task."""

    def __init__(
        self,
        store: Any,
        *,
        max_batch: int = 4096,
        max_batch_rows: int = MAX_BATCH_ROWS,
        weigh: Callable[[object], int] | None = None,
        on_committed: Callable[[list[Any], list[Any]], None] | None = None,
        fanout: Callable[[], contextlib.AbstractContextManager] | None = None,
        ack_linger_s: float = ACK_LINGER_S,
    ) -> None:
        if max_batch_rows < 1:  # (the store refuses it: a batch would run nothing)
            raise ValueError(f"max_batch_rows must be at least 1, not {max_batch_rows}")
        self._store = store
        self._max_batch = max_batch
        self._max_rows = max_batch_rows
        # A command's weight: the broker's estimate of the rows it writes (broker/weight.py),
        # asked as a batch is taken, so that it holds what the commits before taught; 1 each
        # without one.
        self._weigh = weigh or _one
        self.ack_linger_s = ack_linger_s
        self._queue: list[Pending] = []
        self._acks: dict[tuple[str, str], Pending] = {}
        # Each device's last ack queued or being committed, until it is durable.
        self._last_acks: dict[tuple[str, str], Pending] = {}
        self._unsynced_acks: dict[tuple[str, str], int] = {}
        # Devices whose ack was lost with a failed batch: their sessions' cursors moved on, so
        # the conversations a later ack of theirs names cover only the entries since, not all
        # that it acks durably. Their acks go without them (the rules read the inbox) until one
        # as far as the highest lost (the value) is durable: a lower one (the own-sends ack of
        # a session replaced meanwhile, as it ends) leaves the cursor's entries past it uncounted.
        self._acks_lost: dict[tuple[str, str], int] = {}
        # Devices without a session whose last ack is still queued or committing: their mark
        # in `_acks_lost`, if any, goes when that ack is done (`device_gone`).
        self._gone: set[tuple[str, str]] = set()
        self._wake = trio.Event()
        self._closing = False
        self._idle = trio.Event()
        self._on_committed = on_committed or (lambda commands, outcomes: None)
        # Wraps the callbacks and `on_committed` of one batch (the broker writes then).
        self._fanout = fanout or contextlib.nullcontext
        self.batches = 0
        self.commands = 0  # committed (answered as their rules said)
        # Answered `unavailable` because their commit failed (a full disk, a damaged row): with
        # no commits, what tells a broker refusing every write from an idle one (broker_stats).
        self.failed = 0
        # Whether the last commit failed as a whole (a full disk): true until one succeeds.
        # A `stats` request says it (broker/stats.py): a broker refusing every write, seen
        # between two writes.
        self.failing = False
        self.commit_s = 0.0  # the time the commits counted in `batches` took (`stats`)
        # The commits of `batches` the store stopped at `max_batch_rows` rows written, their
        # commands not run put back (`_put_back`): how often the weights fell short. Its
        # `total` is the `stats`' `commits_stopped`; a line `batch_stopped` says them, the
        # first at once, then at most one per 10 s (until 2026-12-06 nothing did).
        self.stopped = Repeated()
        self.committed_lsn = store.last_lsn()
        self._lsn_moved = trio.Event()
        self._thread = WorkerThread("homing-commit")
        self._acks_last = False  # whether the last batch started held acks
        # time.monotonic() when the commit in the worker thread started (a split: its half)
        self._running_since: float | None = None
        self._running: _Batch | None = None  # the batch in the worker thread
        # Counts the sends queued and the batches started and done (what changes the sends
        # `on_way`), and those sends by owner, as of a count (`sends_on_way_of`).
        self._changes = 0
        self._sends_by: tuple[int, dict[int, list[Pending]]] | None = None

    @property
    def queued(self) -> int:
        """Commands waiting for a commit (not those of the one running). A queued ack is in
        `_queue` as well as in `_acks` (the acks still open to merging): counted once."""
        return len(self._queue)

    @property
    def committing(self) -> int:
        """Commands of the batch in the worker thread (0 when none is): with `queued`, what a
        commit that does not end holds up."""
        running = self._running
        return 0 if running is None else len(running.pending)

    def enqueue(self, command: object, done: Done | None = None, context: Any = None) -> Pending:
        """Queue `command` now, in submission order; `done(pending)` runs after the commit."""
        if self._closing:
            raise ShuttingDown("the broker is shutting down")
        pending = Pending(command, done, context)
        self._queue.append(pending)
        if type(command) is SendMessage:  # (acks, queued as sessions end, change no group)
            self._changes += 1
        self._wake.set()
        return pending

    async def submit(self, command: object) -> Any:
        """Queue `command` and return its outcome once durable (raises the batch's StorageError)."""
        pending = self.enqueue(command)
        pending.event = trio.Event()
        await pending.event.wait()
        if pending.error is not None:
            raise pending.error
        return pending.outcome

    def ack_nowait(self, command: Ack) -> None:
        """Queue a device ack, merging it with one of the same device still waiting."""
        if self._closing:
            return
        key = (command.user, command.device)
        if key in self._acks_lost and command.convs is not None:
            command = command._replace(convs=None)
        self._unsynced_acks[key] = max(command.upto, self._unsynced_acks.get(key, 0))
        queued = self._acks.get(key)
        if queued is not None and queued.outcome is None and queued.error is None:
            queued.command = _merge_acks(queued.command, command)
            return
        pending = self.enqueue(command)
        self._acks[key] = self._last_acks[key] = pending

    def when_acks_durable(self, user: str, device: str,
                          callback: Callable[[BaseException | None], None]) -> None:
        """Call `callback(None)` once every ack of the device queued so far is durable (now, if
        none is waiting), or `callback(error)` if the commit that held the last one failed.
        Batches commit in order, so the device's last ack is durable last."""
        pending = self._last_acks.get((user, device))
        if pending is None:
            callback(None)
        else:
            pending.when_done(callback)

    def after_sends_on_way(self, user: str,
                           callback: Callable[[BaseException | None], None]) -> bool:
        """Call `callback(failed)` once every send of `user` queued or being committed now is
        done (durable or failed: `failed` is then the last one's error, else None), and return
        True; return False, calling nothing, if no send of theirs is on its way. A user's sends
        are committed in their submission order (acks may stay behind them, `_take`; other
        users' commands may go ahead, `_fair`), so their last one queued is done last; with
        none queued, their last one in the batch in the worker thread. Off the hot path: a
        scan of the queue from its end (`on_send`'s refusals ask it; until 2026-12-06 for any
        user's send, so a refusal waited behind every other user's sends queued). Until
        2026-12-06 it waited for the running batch's last command, whoever's: since a batch
        the store stops at the row bound puts its commands not run back in the queue
        (`_put_back`), that one may be done before the user's own sends put back with it."""
        for pending in reversed(self._queue):
            command = pending.command
            if type(command) is SendMessage and command.user == user:
                pending.when_done(callback)
                return True
        running = self._running
        if running is not None:
            for pending in reversed(running.pending):
                command = pending.command
                if type(command) is SendMessage and command.user == user:
                    pending.when_done(callback)
                    return True
        return False

    def on_way(self) -> list[Pending]:
        """Every command queued or being committed now, the batch in the worker thread first.
        Off the hot path: a shutdown asks it, once for all sessions (`sends_on_way_of`)."""
        running = self._running
        return ([] if running is None else running.pending) + self._queue

    def sends_on_way_of(self, owner: object) -> list[Pending]:
        """The sends queued or being committed now whose context is `owner`'s (its first item:
        a session), the batch in the worker thread first. Off the hot path: a stop asks it of
        each session with requests waiting (`handlers.answer_known_repeats`), so the sends are
        grouped by owner once, and again only after a send was queued or a batch started or
        ended (until 2026-12-05 each session scanned every command on its way: a send waiting
        on each of 8,000 sessions held the event loop 4.6 s)."""
        grouped = self._sends_by
        if grouped is None or grouped[0] != self._changes:
            by: dict[int, list[Pending]] = {}
            for p in self.on_way():
                context = p.context
                if type(p.command) is SendMessage and type(context) is tuple and context:
                    # by id: the cached Pending holds its owner, so no other object has that id
                    by.setdefault(id(context[0]), []).append(p)
            grouped = self._sends_by = (self._changes, by)
        return grouped[1].get(id(owner), [])

    def commit_running_s(self) -> float:
        """How long the commit now in the worker thread has been running (0.0 if none is): a
        split's current half, each a commit of its own (the watchdog goes by this: until
        2026-12-05 a long split counted as one commit that made no progress)."""
        since = self._running_since
        return 0.0 if since is None else time.monotonic() - since

    @property
    def closing(self) -> bool:
        """Whether `close` was called: commands are refused, acks dropped."""
        return self._closing

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Commit batches until `close` was called and the queue is empty."""
        self._thread.start()
        try:
            task_status.started()
            await self._serve()
        finally:
            self._thread.stop()

    async def _serve(self) -> None:
        # Batch N+1 goes to the worker thread before batch N's replies and fan-out run here, so
        # N+1's commit (its sync above all, which needs no GIL) overlaps N's fan-out. N+1 holds
        # what was queued while N committed, as before: the fan-out reads no frames.
        committed: _Batch | None = None  # durable; its replies and fan-out still to do
        while True:
            started = None
            if self._queue and (committed is None or not self._only_acks()):
                if self._only_acks():
                    await self._linger()
                started = self._start(self._take())
            if committed is not None:
                self._fan_out(committed)
                committed = None
            if started is not None:
                committed = await self._finish(started)
                continue
            if not self._queue:
                if self._closing:
                    self._idle.set()
                    return
                await self._wake.wait()
                self._wake = trio.Event()

    def _only_acks(self) -> bool:
        return len(self._acks) == len(self._queue) and not self._closing

    def _take(self) -> list[Pending]:
        """The next batch: the queue's first `max_batch` commands (in turns by user when it holds
        more, `_fair`), or, under load, its sends alone.

        When the batch before held acks and the queue holds only sends and acks, at least
        ACKS_EVERY_OTHER_FROM sends among them, the sends go alone and the acks stay queued
        (each device's newer acks merge into them) for the next batch. At 5,000 msgs/s the acks
        then cost their rows, rules and receipts every other commit instead of every one:
        p50 7.27 -> 6.45 ms and p99 14.65 -> 12.8 ms (medians of 8 alternating pairs,
        docs/BENCHMARKS-JOURNAL.md). An `ack` request with an id waits one commit longer for
        its `ok`, and the delivered receipts it makes go out one commit later; an ack only moves
        marks over entries already committed, so the log may hold it after later sends. Other
        commands keep their order with acks: with one queued, no batch skips. More than
        `max_batch` to choose from, or more than `max_batch_rows` of weight, the batch takes
        them in turns by user (`_fair`).
        """
        queue = self._queue
        if self._acks_last and len(queue) - len(self._acks) >= ACKS_EVERY_OTHER_FROM:
            sends = [p for p in queue if type(p.command) is SendMessage]
            if len(sends) + len(self._acks) == len(queue):
                batch, rest = self._cut(sends)
                self._queue = [p for p in queue if type(p.command) is not SendMessage]
                self._queue += rest
                return batch
        batch, self._queue = self._cut(queue)
        return batch

    def _cut(self, queue: list[Pending]) -> tuple[list[Pending], list[Pending]]:
        """`_fair` of `queue` under both bounds; by its count alone when `weigh` raises.

        The weights are the broker's code, run here in `serve`: an exception leaving it ended
        the committer's task, and with it the broker (every queued command unanswered). A
        failed estimate costs the cut by weight, logged each time, never a commit; the store
        still stops the batch at `max_batch_rows` rows written (`_put_back`)."""
        try:
            return _fair(queue, self._max_batch, self._max_rows, self._weigh)
        except Exception:
            log.exception("batch_weigh_failed", commands=len(queue))
            return _fair(queue, self._max_batch)

    async def _linger(self) -> None:
        """Only acks are queued: give other work up to ACK_LINGER_S to join their commit.

        Nobody waits for an ack to be durable (a lost ack only means a redelivery), and a commit
        costs two syncs, so at low rates this spares a commit per message without delaying any
        send: a send arriving meanwhile ends the wait at once.
        """
        with trio.move_on_after(self.ack_linger_s):
            while self._only_acks():
                self._wake = trio.Event()
                await self._wake.wait()

    def _start(self, batch: list[Pending]) -> _Batch:
        """Hand `batch` to the worker thread; its acks are no longer open to merging."""
        acks = self._acks
        batch_acks, ack_pending = [], []
        for p in batch:
            if isinstance(p.command, Ack):
                key = (p.command.user, p.command.device)
                batch_acks.append((key, p.command.upto))
                ack_pending.append(p)
                if acks.get(key) is p:
                    del acks[key]
        self._acks_last = bool(batch_acks)
        commands = [p.command for p in batch]
        aside = self._store.set_aside(commands) if len(commands) > 1 else ()
        if aside:  # known to meet a damaged row: apart from the start (broker/isolate.py)
            call = self._thread.submit(isolate, self._execute_run, commands, aside)
        else:
            call = self._thread.submit(self._execute, commands)
        self._running_since = time.monotonic()
        self._running = _Batch(batch, commands, batch_acks, ack_pending, call, len(aside))
        self._changes += 1  # taken from the queue, now committing
        return self._running

    def _execute(self, commands: list[object]) -> list[Any]:
        """`Store.execute` of a batch (in the worker thread), stopped at `max_batch_rows` rows
        written: the outcomes of the commands it ran, a prefix of `commands`."""
        return self._store.execute(commands, max_rows=self._max_rows)

    def _execute_run(self, commands: list[object]) -> list[Any]:
        """`Store.execute` of one run of a split (in the worker thread): each a commit of its
        own, timed from its start (`commit_running_s`), stopped at the row bound as any batch
        (broker/isolate.py runs the rest next)."""
        self._running_since = time.monotonic()  # a float's store: the trio thread reads it
        return self._store.execute(commands, max_rows=self._max_rows)

    async def _finish(self, started: _Batch) -> _Batch | None:
        """Wait for a started batch to be durable; None if it failed (its commands are told)."""
        ran = 0.0  # how long its commit took (not added for a split: rare, timed per run)
        try:
            if started.aside:
                return self._settle(started, await self._thread.wait(started.call), None)
            started.outcomes = await self._thread.wait(started.call)
            if len(started.outcomes) < len(started.commands):
                self._log_stop(started)
                self._put_back(started)
        except StorageError as exc:
            if isinstance(exc, CorruptProjection) and len(started.commands) > 1:
                done = await self._thread.run(isolate, self._execute_run, started.commands)
                return self._settle(started, done, exc)
            _log_failed(exc, len(started.commands))
            # A damaged row failed this one command, not the commit: as when a split fails it
            # (`_settle`), the broker is not `failing` for it (until 2026-12-06 it was, alone in
            # its batch: `homing health` said "a full disk?" until the next commit).
            self.failing = self.failing or not isinstance(exc, CorruptProjection)
            self.failed += len(started.commands)
            self._lose_acks(started.acks)
            for p in started.pending:
                p.finish(None, exc)
            return None
        finally:
            if self._running_since is not None:
                ran = time.monotonic() - self._running_since
            self._running_since, self._running = None, None
            self._changes += 1
            unsynced, last = self._unsynced_acks, self._last_acks
            for p, (key, upto) in zip(started.ack_pending, started.acks, strict=True):
                # durable now, or lost with the batch (redelivered)
                if unsynced.get(key) == upto:
                    del unsynced[key]
                if last.get(key) is p:
                    del last[key]
                    if key in self._gone:  # lost or durable, nothing is ahead of it now
                        self._gone.discard(key)
                        self._acks_lost.pop(key, None)
        if self._acks_lost:  # a device's ack durable since its loss: its marks are whole again
            for p, outcome in zip(started.pending, started.outcomes, strict=True):
                if type(p.command) is Ack and outcome.error is None:
                    self._found_acks(p.command)
        last = _last_lsn(started.outcomes)
        if last > self.committed_lsn:
            self.committed_lsn = last
            self._lsn_moved.set()
            self._lsn_moved = trio.Event()
        self.batches += 1
        self.commit_s += ran
        self.commands += len(started.pending)
        self.failing = False
        return started

    def _log_stop(self, started: _Batch) -> None:
        """Count that the store stopped `started` at the row bound, and log it if a line is due
        (`batch_stopped`: the first at once, then at most one per 10 s, `stopped` counting the
        stops since the line before, this one included)."""
        said = self.stopped.count(time.monotonic())
        if said is not None:
            ran = len(started.outcomes)
            log.info("batch_stopped", rows=sum(o.rows for o in started.outcomes),
                     bound=self._max_rows, committed=ran, put_back=len(started.commands) - ran,
                     stopped=said)

    def _put_back(self, started: _Batch) -> None:
        """The store stopped `started` at the row bound (`Store.execute`'s `max_rows`): it holds
        the commands committed now, and those not run go back to the head of the queue, in
        their order, for the next batch (taken after this one's `_finish`, so nothing queued
        since goes before them: each user's order holds). Their acks were not committed:
        their bookkeeping stays as for a queued ack (`_finish` sees only the acks that ran),
        and a device keeps one ack queued (`_merge_back`)."""
        ran = len(started.outcomes)
        rest = started.pending[ran:]
        del started.pending[ran:], started.commands[ran:]
        back = [p for p in rest if isinstance(p.command, Ack)]
        if back:
            kept = len(started.acks) - len(back)
            del started.acks[kept:], started.ack_pending[kept:]
            self._acks_last = kept > 0
            merged = self._merge_back(back)
            if merged:
                rest = [p for p in rest if p not in merged]
        self._queue[:0] = rest

    def _merge_back(self, back: list[Pending]) -> set[Pending]:
        """The acks `back` are put back (`_put_back`): each device keeps one ack queued, its
        newest, open to merging (`_acks`): one queued while they committed, else the last of
        its put back; its others merge into it, their waiters with them (acks come from
        `ack_nowait`: no `done`, no `event`), and commit in its place: an ack only moves marks
        over entries committed, so it may follow commands queued after it (`_take`). Return
        those merged away.

        Until 2026-12-06 each stayed queued: a device's acks put back together, or behind one
        queued meanwhile, were several queued acks of one device, which nothing else expects.
        When a full disk failed the first, `_lose_acks` left its conversations to the rules
        in the one open to merging alone, and the next, naming only the conversations it
        covered, made the device's mark whole again: the lost ack's messages were never
        marked received (their senders never told)."""
        acks, merged = self._acks, set()
        for p in reversed(back):  # the newest first
            key = (p.command.user, p.command.device)
            newest = acks.get(key)
            if newest is None:
                acks[key] = p
                continue
            newest.command = _merge_acks(p.command, newest.command)
            for callback in p.also or ():
                newest.when_done(callback)
            merged.add(p)
        return merged

    def _settle(self, started: _Batch, done: Isolated, exc: CorruptProjection | None
                ) -> _Batch:
        """`started` was split (broker/isolate.py, in the worker thread): after it failed on
        the damaged row `exc`, in halves down to single commands; or around the commands it
        set aside from the start (`exc` None). Only those whose own work meets a damaged row
        failed; the others committed in their order and are told as in any batch
        (`_fan_out_split`, every command in submission order, the failed ones too)."""
        results = done.results
        errors = [r if isinstance(r, BaseException) else None for r in results]
        outcomes = [None if e is not None else r for r, e in zip(results, errors, strict=True)]
        if exc is None:  # the first damaged row met, if any
            exc = next((e for e in errors if isinstance(e, CorruptProjection)), None)
        log.error("batch_split", commands=len(results), failed=len(results) - errors.count(None),
                  commits=done.commits, set_aside=started.aside,
                  error=None if exc is None else str(exc))
        if done.stopped is not None:  # a full disk (or a bug) failed the commands left
            _log_failed(*done.stopped)
        lost = []
        for p, outcome in zip(started.pending, outcomes, strict=True):
            if type(p.command) is Ack:
                key = (p.command.user, p.command.device)
                if outcome is None:
                    lost.append((key, p.command.upto))
                elif outcome.error is None:  # durable: its device's marks are whole again
                    self._found_acks(p.command)
        self._lose_acks(lost)
        started.outcomes, started.errors = outcomes, errors
        last = max((o.lsn for o in outcomes if o is not None), default=0)
        if last > self.committed_lsn:
            self.committed_lsn = last
            self._lsn_moved.set()
            self._lsn_moved = trio.Event()
        self.batches += done.commits
        self.commands += errors.count(None)
        self.failing = done.stopped is not None  # the disk filled meanwhile
        self.failed += len(errors) - errors.count(None)
        return started

    def _lose_acks(self, acks: Iterable[tuple[tuple[str, str], int]]) -> None:
        """These acks ((user, device), upto) failed: until an ack of the device as far as the
        highest of them is durable, its acks (the one queued now too) leave their conversations
        to the rules (`ack_lost`)."""
        lost = self._acks_lost
        for key, upto in acks:
            lost[key] = max(upto, lost.get(key, 0))
            queued = self._acks.get(key)
            if queued is not None and queued.command.convs is not None:
                queued.command = queued.command._replace(convs=None)

    def _found_acks(self, ack: Ack) -> None:
        """`ack` is durable: its device's marks are whole again if it reaches as far as its
        lost acks did (it read their conversations, `ack_nowait`)."""
        key = (ack.user, ack.device)
        if ack.upto >= self._acks_lost.get(key, math.inf):
            del self._acks_lost[key]

    def _fan_out(self, done: _Batch) -> None:
        """Tell each submitter of a durable batch its outcome, then run `on_committed`."""
        if done.errors is not None:
            self._fan_out_split(done)
            return
        with self._fanout():
            for p, outcome in zip(done.pending, done.outcomes, strict=True):
                p.finish(outcome, None)
            try:
                self._on_committed(done.commands, done.outcomes)
            except Exception:
                log.exception("commit_fanout_failed")

    def _fan_out_split(self, done: _Batch) -> None:
        """`_fan_out` of a split batch: each command told its outcome or its error, in
        submission order; `on_committed` runs over the commands committed, if any."""
        with self._fanout():
            for p, outcome, error in zip(done.pending, done.outcomes, done.errors, strict=True):
                p.finish(outcome, error)
            kept = [i for i, error in enumerate(done.errors) if error is None]
            if not kept:
                return
            try:
                self._on_committed([done.commands[i] for i in kept],
                                   [done.outcomes[i] for i in kept])
            except Exception:
                log.exception("commit_fanout_failed")

    def ack_lost(self, user: str, device: str) -> bool:
        """Whether an ack of this device failed with its batch and none of its acks as far has
        been durable since (its session's cursor is ahead of its durable mark)."""
        return (user, device) in self._acks_lost

    def device_gone(self, user: str, device: str) -> None:
        """The device's session ended (not replaced): forget that its acks were lost, now or
        once its last ack queued or committing is done. Only a live session's cursor can be
        ahead of the durable mark; the device's next session starts from `acked_mark` or the
        durable mark. (Until 2026-12-05 a device that never acked again stayed in `_acks_lost`
        for the broker's life: one entry per device that acked during a storage failure.)"""
        key = (user, device)
        if key in self._last_acks:
            self._gone.add(key)
        else:
            self._acks_lost.pop(key, None)

    def device_back(self, user: str, device: str) -> None:
        """The device has a session again (its cursor taken from `acked_mark`): an ack still
        on its way that fails must mark it."""
        self._gone.discard((user, device))

    def acked_mark(self, user: str, device: str) -> int:
        """The highest ack of this device that is queued or being committed (0 if none)."""
        return self._unsynced_acks.get((user, device), 0)

    async def wait_lsn_above(self, lsn: int) -> int:
        """Wait until an LSN greater than `lsn` is durable; return the last durable LSN."""
        while self.committed_lsn <= lsn:
            await self._lsn_moved.wait()
        return self.committed_lsn

    async def close(self) -> None:
        """Stop taking commands, commit what is queued, and return when all is durable."""
        self._closing = True
        self._wake.set()
        await self._idle.wait()


def _log_failed(exc: StorageError, commands: int) -> None:
    """Log a batch (or the rest of a split) that `exc` failed, its `commands` answered."""
    if isinstance(exc, InternalError):  # a bug: once, with its traceback
        log.error("batch_internal_error", commands=commands, error=str(exc), exc_info=exc)
    else:
        log.error("batch_failed", commands=commands, error=str(exc))


def _last_lsn(outcomes: list[Any]) -> int:
    """The LSN of the last event a committed batch's `outcomes` appended (0 if none did): the
    last nonzero one, as the LSNs of a batch's events rise in its commands' order. Found from
    the end, not by a pass over all of them (in the trio thread, each outcome looked at is
    memory the commit thread wrote: that `max` took 0.8 % of the trio thread's py-spy
    samples in `homing bench throughput`, 2026-12-06)."""
    for outcome in reversed(outcomes):
        if outcome.lsn:
            return outcome.lsn
    return 0


def _one(command: object) -> int:
    return 1


_command_of = operator.attrgetter("command")


def _fair(queue: list[Pending], limit: int, rows: float = math.inf,
          weigh: Callable[[object], int] = _one) -> tuple[list[Pending], list[Pending]]:
    """Split `queue` into a batch of at most `limit` commands weighing at most `rows` in all
    (`weigh` of each; but one command at least, whatever it weighs) and the rest, taking the
    users' commands in turns.

    The turns are the same under both bounds: the batch is the longest run, in turn order (every
    user's first command, then every user's second, ..., each turn in queue order), within
    both. The cut by count is made first, in O(n) (`_in_turns`); only when its batch weighs
    more than `rows` is the queue cut again by weight (`_in_turns_by_weight`), sorting it in
    turn order. Until 2026-12-06 a batch was bounded by its count alone: 4,096 posts into a
    channel of 300 subscribers wrote 1.2 million inbox entries in one commit, about 2 s of
    the commit thread, holding Python's lock most of it, and every other user's send waited
    one and a half such commits (docs/OPERATIONS.md, "One noisy service beside quiet ones").
    Each command is weighed here, as its batch is taken (0.33 ms for 4,096 direct sends),
    so that a weight learnt from a commit counts for the commands queued before it."""
    batch, rest = _in_turns(queue, limit)
    if sum(map(weigh, map(_command_of, batch))) <= rows:
        return batch, rest
    return _in_turns_by_weight(queue, limit, rows, weigh)


def _in_turns_by_weight(queue: list[Pending], limit: int, rows: float,
                        weigh: Callable[[object], int]) -> tuple[list[Pending], list[Pending]]:
    """`_fair`'s cut by weight: the queue's commands in turn order (a stable sort by each
    one's rank among its user's) are taken until the next would bring the batch past `rows`
    or `limit` commands (the first is taken whatever it weighs); the batch and the rest keep
    the queue's order."""
    seen: dict[Any, int] = {}
    ranks = []
    for p in queue:
        user = p.command[0]
        n = seen.get(user, 0)
        seen[user] = n + 1
        ranks.append(n)
    taken, weight = [False] * len(queue), 0
    for count, i in enumerate(sorted(range(len(queue)), key=ranks.__getitem__)):
        weight += weigh(queue[i].command)
        if count == limit or (weight > rows and count):
            break
        taken[i] = True
    batch = [p for p, t in zip(queue, taken, strict=True) if t]
    rest = [p for p, t in zip(queue, taken, strict=True) if not t]
    return batch, rest


def _in_turns(queue: list[Pending], limit: int) -> tuple[list[Pending], list[Pending]]:
    """Split `queue` into a batch of at most `limit` commands and the rest, taking the users'
    commands in turns: every user's first, then every user's second, ..., the last turn cut in
    queue order. Each user's commands in the batch are the first of theirs, in their order,
    and the batch and the rest keep the queue's order; a queue of one user is cut as before
    (its first `limit`). A command's user is its first field (storage/commands.py: the actor).

    Until 2026-12-06 a batch was the queue's first `limit`: 4 users with 3 connections each
    pipelining 1,024 sends at the default limits kept about 12,000 queued, and a quiet user's
    one send waited behind them all, 3 commits (docs/OPERATIONS.md, "One noisy service
    beside quiet ones"). It goes in the next commit now. O(n) over the queue, and only when
    it holds more than `limit`: the batch of a queue that fits is the queue, as before."""
    if len(queue) <= limit:
        return queue, []
    users = [p.command[0] for p in queue]
    counts = collections.Counter(users)
    if len(counts) == 1:
        return queue[:limit], queue[limit:]
    # Whole turns: the most `turns` with sum(min(n, turns)) over the users' counts <= limit.
    turns, taken, left = 0, 0, len(counts)  # left: users with more than `turns` commands
    for size in sorted(counts.values()):
        if taken + (size - turns) * left > limit:
            break
        taken, turns, left = taken + (size - turns) * left, size, left - 1
    more, extra = divmod(limit - taken, left)  # (left > 0: the queue holds more than limit)
    turns += more
    batch, rest, seen = [], [], dict.fromkeys(counts, 0)
    for p, user in zip(queue, users, strict=True):
        n = seen[user]
        seen[user] = n + 1
        if n < turns:
            batch.append(p)
        elif n == turns and extra:  # the last turn, cut in queue order
            extra -= 1
            batch.append(p)
        else:
            rest.append(p)
    return batch, rest


def _merge_acks(first: Ack, second: Ack) -> Ack:
    """One ack covering both (acks are cumulative; conversation marks take the higher seq)."""
    if first.convs is None or second.convs is None:
        convs = None  # one of them did not know its conversations: the rules will read them
    else:
        merged = dict(first.convs)
        for conv, seq in second.convs:
            if seq > merged.get(conv, 0):
                merged[conv] = seq
        convs = tuple(merged.items())
    return Ack(first.user, first.device, first.role, max(first.upto, second.upto), convs)
