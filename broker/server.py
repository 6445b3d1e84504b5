"""The broker: what one `homing serve` process shares, its accept loop, and clean shutdown.

`Broker` wires the parts together and holds the state they share: the store, the group commit
(broker/committer.py), who is connected (broker/hub.py), the cached rosters (broker/roster.py),
the signing keys and revocations, the rate buckets. Each accepted connection is served by
broker/connection.py (its hello by broker/handshake.py, then its session, broker/session.py);
each durable batch reaches the connected through broker/fanout.py.

`Broker.serve` runs until `Broker.shutdown` is called (SIGTERM, SIGINT or SIGHUP in `homing
serve`): it stops accepting, lets every session finish the commands it has in flight (each is
durable and answered), says bye, commits what is queued, and returns. Nothing acked is ever
lost, because nothing is acked before its commit returned.
"""

from __future__ import annotations

import errno
import functools
import itertools
import os
import socket
import ssl
import time
from typing import Any

import trio

import protocol as wire
from broker import connection, fanout, handshake, listen, tokens
from broker.awaiting import Awaiting
from broker.committer import Committer
from broker.config import Config
from broker.handlers import HANDLERS
from broker.hellos import FailedHellos
from broker.hub import Hub, encode_push
from broker.keyring import Keyring
from broker.logs import Repeated, get_logger
from broker.policy import ContentPolicy
from broker.presence import Presence
from broker.ratelimit import TokenBucket, UserBuckets
from broker.roster import RosterCache
from broker.sdnotify import Notifier, keep_watchdog
from broker.session import Session
from broker.stats import certificate_not_after, report_stats
from broker.turns import Turns
from broker.weight import Weights
from protocol import native as wire_native
from storage import native, rowio

# What a connection the broker has no file descriptor for is told (broker/listen.py).
OUT_OF_FILES_MESSAGE = ("the broker is out of file descriptors (its open-file limit, or the "
                        "system's, is reached); retry later")
IDLE_CHECKS = 10  # looks for idle sessions per idle timeout (see Broker._watch_idle)
# A stop's last commit still running this long after the connections ended is logged
# (`stop_waiting_for_commit`), and again every STOP_WAIT_REPEAT_S while it runs: a disk that
# stopped answering holds the stop, which said nothing until 2026-12-07.
STOP_WAIT_WARN_S = 1.0
STOP_WAIT_REPEAT_S = 10.0
OWN_ACK_DELAY_S = 0.25  # how long the durable ack of a device's own sends may wait


class Broker:
    """Everything one `homing serve` process shares between its connections."""

    def __init__(self, config: Config, store: Any, notifier: Notifier | None = None,
                 keyring: Keyring | None = None) -> None:
        self.config = config
        self.store = store
        self.notifier = notifier  # systemd's (broker/sdnotify.py), under `Type=notify`
        self.log = get_logger()
        # The token-signing keys (broker/keyring.py): `homing serve`'s, read as it started,
        # or read here.
        self.keyring = keyring if keyring is not None else Keyring(config.data_dir)
        self._keys_unreadable: str | None = None  # why the key files last failed (logged once)
        self.log.info("signing_keys_loaded", key_id=tokens.key_id(self.keyring.current),
                      previous_key_id=self.keyring.previous_id, sessions_ended=0)
        self.hub = Hub(store)
        self.rosters = RosterCache(store, config.roster_cache_members)
        self.roster = self.rosters.get  # who is in a conversation (cached; broker/roster.py)
        self.presence = Presence(self.hub, self.roster, self.log)
        # What each command weighs in a batch, learnt from the commits (broker/weight.py).
        self.weights = Weights(self.rosters)
        self.committer = Committer(
            store, max_batch=config.max_batch, max_batch_rows=config.max_batch_rows,
            weigh=self.weights.of,
            on_committed=functools.partial(fanout.on_committed, self),
            fanout=functools.partial(fanout.deferred_writes, self))
        self.deferring = False  # inside a commit's fan-out: sessions defer their writes
        self.deferred: list[Session] = []
        # Sessions whose cursor passed their own sends, to ack durably (Session._ack_own_sends).
        self.own_acks: dict[Session, None] = {}
        self.handlers = HANDLERS
        self.policy = (ContentPolicy.load(config.content_policy, config.content_action)
                       if config.content_policy else None)
        self.stopping = False
        self.handshaking = 0  # connections accepted and not yet past hello
        self.check_waiters = 0  # and past --max-handshakes, waiting for theirs (handshake.py)
        self.arriving = 0  # taken off the listen backlog, their tasks not started (`_room`)
        # The check waiters' waits (handshake.past_limit), by when each began, in that order.
        self.check_waits: dict[trio.CancelScope, float] = {}
        # The sessions reading deliveries from the store in one turn of the event loop:
        # --catch-up-per-turn (broker/turns.py).
        self.turns = Turns(config.catch_up_per_turn)
        # Requests answered `rate_limited`: counted for `broker_stats`, logged now and then
        # (`rate_limited`), naming the session of the refusal logged.
        self.rate_limits = Repeated()
        self.started = time.monotonic()  # for `stats`' uptime_s
        # Refusals at --max-handshakes and at --max-connections: a crowd meets them once per
        # client and attempt, so they are counted and logged now and then, not each.
        self.handshakes_full = Repeated()
        # Places of silent connections given up to connections that spoke (broker/awaiting.py).
        self.places_given_up = Repeated()
        self.connections_full = Repeated()
        # Connections refused for want of a file descriptor (broker/listen.py): their own
        # lines, so that refusals at --max-connections do not hide them.
        self.out_of_files = Repeated()
        # `accept` failing with the system short of memory or descriptors (broker/listen.py):
        # logged now and then (`accept_failed`), each retried after listen.ACCEPT_RETRY_S.
        self.accept_failures = Repeated()
        # Failed hellos by peer address, throttled past --auth-fail-rate (broker/hellos.py).
        self.failed_hellos = FailedHellos(config.auth_fail_rate, config.auth_fail_addresses)
        # The connections waiting for their hello, cancelled at shutdown; one gives its place
        # up to a connection that spoke when every place is taken (broker/awaiting.py).
        self.awaiting = Awaiting()
        # Devices whose start at the inbox head is on its way (handshake._start_at_head): set
        # once that hello is answered; the device's other hellos wait for it (`_after_start`).
        self.head_starts: dict[tuple[str, str], trio.Event] = {}
        self.port: int | None = None
        self.user_sends = UserBuckets(config.sends_per_s_per_user)
        self.user_typing = UserBuckets(config.typing_per_s_per_user)
        self.user_changes = UserBuckets(config.changes_per_s_per_user)
        self.user_reads = UserBuckets(config.reads_per_s_per_user)
        self.user_buckets = (self.user_sends, self.user_typing, self.user_changes,
                             self.user_reads)
        self.conn_ids = itertools.count(1)
        self._listen_scope: trio.CancelScope | None = None
        self.tls: ssl.SSLContext | None = None  # set by `serve` under --tls-cert
        self.tls_not_after: float | None = None  # when its certificate expires (Unix seconds)
        self._stopped = trio.Event()
        # Admins' revocations on their way to disk: user -> their cut-offs (handlers.on_revoke).
        self.revoking: dict[str, list[int]] = {}
        # Creates with a cid on their way to disk: (user, cid) -> the last one submitted, so a
        # repeat past --change-rate waits for it and is answered as a dup (handlers.on_create).
        self.creating: dict[tuple[str, str], Any] = {}

    # -- shared helpers used by sessions and handlers -----------------------------------------

    @property
    def secret(self) -> bytes:
        """The current token-signing key (`homing token` signs with it)."""
        return self.keyring.current

    @property
    def rate_limited(self) -> int:
        """Requests answered `rate_limited` since the start (`broker_stats`)."""
        return self.rate_limits.total

    def refresh_keys(self) -> None:
        """Take up a rotate or a retire: read the key files again if they changed (docs/
        OPERATIONS.md, "Rotating the signing secret"), and end the sessions opened with a
        token of a key no longer held, as a revocation does. Files that cannot be read (a
        `secret.key` deleted or cut short, no descriptor left) are tried again at each look,
        logged once for each reason, and the current key is kept; a previous key whose file
        is gone is not."""
        before = set(self.keyring.keys)
        try:
            if not self.keyring.refresh():
                return
            self._keys_unreadable = None
        except (tokens.SecretError, OSError) as exc:
            if str(exc) != self._keys_unreadable:
                self._keys_unreadable = str(exc)
                self.log.error("signing_keys_unreadable", reason=str(exc),
                               key_id=tokens.key_id(self.keyring.current))
            if set(self.keyring.keys) == before:
                return
        held, ended = self.keyring.keys, 0
        for session in list(self.hub.all_sessions()):
            if session.key_id not in held:
                session.key_retired()
                ended += 1
        self.log.info("signing_keys_loaded", key_id=tokens.key_id(self.keyring.current),
                      previous_key_id=self.keyring.previous_id, sessions_ended=ended)

    def revoked_before(self, user: str) -> int:
        """The cut-off hello applies to `user`'s tokens: the stored one, or a revocation's still
        committing."""
        return max(self.store.revoked_before(user), *self.revoking.get(user, (0,)))

    def revoke_settled(self, user: str, cut: int) -> None:
        """A revocation's commit ended (durable: the store has its cut-off; failed: it has none)."""
        cuts = self.revoking[user]
        cuts.remove(cut)
        if not cuts:
            del self.revoking[user]

    def new_send_limiter(self) -> TokenBucket:
        return TokenBucket(self.config.sends_per_s_per_connection)

    # -- lifecycle ---------------------------------------------------------------------------

    async def serve(self, *, sockets: list[socket.socket] | None = None,
                    task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Accept connections until `shutdown`; then drain, commit and return.

        `sockets`: bound, not yet listening (broker/listen.py), as `homing serve` binds them
        before it opens the store; None: bind the configured host and port here."""
        cfg = self.config
        async with trio.open_nursery() as outer:
            await outer.start(self.committer.serve)
            self.presence.start(outer)  # long presence walks (cancelled with the idle watch)
            outer.start_soon(self._watch_idle)
            outer.start_soon(self._ack_own_sends)
            if cfg.stats_interval_s > 0:
                outer.start_soon(report_stats, self, cfg.stats_interval_s)
            async with trio.open_nursery() as connections:
                with trio.CancelScope() as self._listen_scope:
                    if sockets is None:
                        listeners = await trio.open_tcp_listeners(cfg.port, host=cfg.host)
                    else:
                        listeners = listen.listen(sockets)
                    if cfg.tls_cert:  # each connection is wrapped in `connection.handle`
                        self.tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                        self.tls.load_cert_chain(str(cfg.tls_cert), str(cfg.tls_key),
                                                 password=no_passphrase)
                        self.tls_not_after = certificate_not_after(cfg.tls_cert)
                    refusal = None if cfg.tls_cert else encode_push(wire.error_frame(
                        wire.ErrorCode.LIMIT_EXCEEDED, OUT_OF_FILES_MESSAGE, None, close=True))
                    listeners = [listen.Listener(each, refusal, self._out_of_files,
                                                 self._accept_failed, self._room,
                                                 self._taken, self._crowded)
                                 for each in listeners]
                    self.port = listeners[0].socket.getsockname()[1]
                    self.log.info("broker_listening", host=cfg.host, port=self.port,
                                  tls=bool(cfg.tls_cert), data=str(cfg.data_dir),
                                  storage_native=native.describe(),
                                  storage_rows=rowio.describe(),
                                  protocol_native=wire_native.describe())
                    if self.notifier is not None:
                        self.notifier.notify(READY=1, STATUS=f"serving {cfg.host}:{self.port}")
                        if self.notifier.watchdog_s is not None:
                            outer.start_soon(keep_watchdog, self.notifier, self.committer)
                    task_status.started(self.port)
                    if self.stopping:  # shutdown() came before this scope could be cancelled
                        self._listen_scope.cancel()
                    await trio.serve_listeners(functools.partial(connection.handle, self),
                                               listeners, handler_nursery=connections)
                # Listener cancelled: stop every session gracefully; those still waiting for
                # their hello are told `shutting_down` at once.
                for waiting in list(self.awaiting.scopes.values()):
                    waiting.cancel()
                for session in self.hub.all_sessions():
                    session.begin_shutdown()
                connections.cancel_scope.deadline = trio.current_time() + cfg.shutdown_grace_s
            async with trio.open_nursery() as last_commit:
                last_commit.start_soon(self._say_stop_waits)
                await self.committer.close()
                last_commit.cancel_scope.cancel()
            outer.cancel_scope.cancel()  # the idle watch, the own sends' acks, the stats
        self.log.info("broker_stopped", batches=self.committer.batches,
                      commands=self.committer.commands)
        self._stopped.set()

    async def _say_stop_waits(self) -> None:
        """Log `stop_waiting_for_commit` while the stop's last commit runs past
        STOP_WAIT_WARN_S (then every STOP_WAIT_REPEAT_S): the commands it waits for, and how
        long the commit under way has run. Nothing is said with no command committing or
        queued: the last commit ended, and the stop ends in this turn of the event loop."""
        started = trio.current_time()
        await trio.sleep(STOP_WAIT_WARN_S)
        while True:
            c = self.committer
            if c.committing or c.queued:
                self.log.warning("stop_waiting_for_commit",
                                 waited_s=round(trio.current_time() - started, 1),
                                 committing=c.committing, queued=c.queued,
                                 commit_running_ms=int(c.commit_running_s() * 1000),
                                 hint="the stop commits what it took before it exits; a disk "
                                      "that does not answer holds it (SIGKILL loses nothing "
                                      "acknowledged)")
            await trio.sleep(STOP_WAIT_REPEAT_S)

    def _room(self) -> int:
        """Connections the broker takes off the listen backlog now (broker/listen.py): as many
        as it has handshake places free (--max-handshakes), and places of a connection past
        them waiting for a monitor's hello (`handshake.past_limit`). The others wait in the
        backlog, as before."""
        return (max(0, self.config.max_handshakes - self.handshaking)
                + max(0, handshake.CHECK_WAITERS - self.check_waiters) - self.arriving)

    def _crowded(self) -> None:
        """Connections wait in the listen backlog and the broker has no room for them
        (broker/listen.py): the connections past --max-handshakes that have waited
        handshake.CHECK_CROWDED_S for their hello give their places up, the longest waiting
        first (refused `limit_exceeded` as they would be at CHECK_WAIT_S)."""
        began_by = time.monotonic() - handshake.CHECK_CROWDED_S
        for waiting, began in list(self.check_waits.items()):
            if began > began_by:
                return
            del self.check_waits[waiting]
            waiting.cancel()

    def _taken(self) -> None:
        """A connection is handed to its task, which has yet to start (`connection.handle`)."""
        self.arriving += 1

    def _out_of_files(self) -> None:
        """A connection refused for want of file descriptors (broker/listen.py): counted and
        logged as the broker's --max-connections refusals are, now and then, with a count of
        their own."""
        refused = self.out_of_files.count(time.monotonic())
        if refused is not None:
            self.log.warning("connections_full", limit="open_files",
                             connections=self.hub.count, handshaking=self.handshaking,
                             refused=refused)

    def _accept_failed(self, exc: OSError) -> None:
        """`accept` failed for want of memory or descriptors (broker/listen.py, which tries
        again): counted, and logged now and then as a warning of ours, where trio's own loop
        logged a traceback every 100 ms."""
        failed = self.accept_failures.count(time.monotonic())
        if failed is not None:
            self.log.warning("accept_failed", errno=errno.errorcode.get(exc.errno, exc.errno),
                             reason=os.strerror(exc.errno) if exc.errno else str(exc),
                             failed=failed, connections=self.hub.count,
                             handshaking=self.handshaking,
                             retry_s=listen.ACCEPT_RETRY_S)

    async def _watch_idle(self) -> None:
        """Time out every session whose reader has waited `idle_timeout_s` for a frame.

        One task looks over all sessions IDLE_CHECKS times per timeout, with 10 ms to 1 s
        between looks, so a silent session is closed up to a tenth of the timeout (1 s at most)
        after it expired. A reader held up by flow control is not waiting for bytes; it ends
        the session itself (`Session._wait_drained`). Each look also ends the sessions whose
        tokens expired, takes up a rotate or retire of the signing keys, and forgets the rate
        buckets of users gone long enough for theirs to have refilled.
        """
        idle = self.config.idle_timeout_s
        every = max(0.01, min(1.0, idle / IDLE_CHECKS))
        while True:
            await trio.sleep(every)
            now = time.monotonic()
            self.refresh_keys()
            self._look_idle(idle, now, time.time())
            for buckets in self.user_buckets:
                buckets.prune(now)

    def _look_idle(self, idle: float, now: float, wall: float) -> None:
        """One look of `_watch_idle` at every session. A function of its own, so that the last
        session looked at is not held by the watch's loop until its next look (one that ended
        since, with its queues, for good on a broker left with no session: until 2026-12-05)."""
        for session in self.hub.all_sessions():
            if session.idle_for(now) >= idle:
                session.time_out(idle)  # its end is logged with reason "timeout"
            elif session.expires <= wall:
                session.token_expired()

    async def _ack_own_sends(self) -> None:
        """Every OWN_ACK_DELAY_S, submit the durable acks of the devices whose cursors moved
        past their own sends (one each, however many commits passed)."""
        while True:
            await trio.sleep(OWN_ACK_DELAY_S)
            self._flush_own_acks()

    def _flush_own_acks(self) -> None:
        """One round of `_ack_own_sends`; a function of its own, as `_look_idle` is."""
        due, self.own_acks = self.own_acks, {}
        for session in due:
            session.flush_own_ack()

    def shutdown(self, signal: str | None = None) -> None:
        """Begin a clean shutdown (idempotent); `signal` is the name of the one that asked,
        for the log to say what stopped the broker."""
        if not self.stopping:
            self.stopping = True
            self.log.info("broker_stopping", signal=signal)
            if self.notifier is not None:
                self.notifier.notify(STOPPING=1, STATUS="stopping: draining connections")
            if self._listen_scope is not None:
                self._listen_scope.cancel()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


class KeyNeedsPassphrase(Exception):
    """The --tls-key file is encrypted: serve takes no passphrase."""


def no_passphrase() -> bytes:
    """`load_cert_chain`'s password callback: an encrypted key is refused (KeyNeedsPassphrase),
    where OpenSSL would prompt for its passphrase on the terminal, and wait there."""
    raise KeyNeedsPassphrase

