"""The broker: accept loop, handshake, group commit, fan-out, and clean shutdown.

`Broker.serve` runs until `Broker.shutdown` is called (SIGTERM, SIGINT or SIGHUP in `homing
serve`): it stops accepting, lets every session finish the commands it has in flight (each is
durable and answered), says bye, commits what is queued, and returns. Nothing acked is ever
lost, because nothing is acked before its commit returned.
"""

from __future__ import annotations

import contextlib
import itertools
import secrets
import socket
import ssl
import time
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import structlog
import trio

import protocol as wire
from broker import listen, tokens
from broker.committer import Committer
from broker.config import Config
from broker.errors import CloseReason, wire_error
from broker.handlers import HANDLERS, MONITOR_HANDLERS, REQUESTS_ONLY_HANDLERS
from broker.hub import Fresh, Hub, encode_push
from broker.keyring import Keyring
from broker.logs import Repeated, get_logger
from broker.policy import ContentPolicy
from broker.presence import Presence
from broker.ratelimit import TokenBucket, UserBuckets
from broker.sdnotify import Notifier, keep_watchdog
from broker.session import Session
from broker.stats import report_stats
from protocol import native as wire_native
from storage import native, rowio
from storage.commands import Ack, SetMute
from storage.errors import StorageError
from storage.rules import MANAGERS

# The welcome's caps (docs/PROTOCOL.md §3.3): the optional features this broker has.
CAPS = (wire.CAP_CREATE_CID, wire.CAP_START_HEAD, wire.CAP_REQUESTS_ONLY)


@dataclass(frozen=True, slots=True)
class Roster:
    """The members of one conversation, and the views of them that fan-out needs."""

    members: list[tuple[str, str]]
    users: list[str]
    posters: list[str]  # owners and admins
    user_set: frozenset[str]  # `users`, for membership tests in O(1) (a receipt each)

    @classmethod
    def of(cls, members: list[tuple[str, str]]) -> Roster:
        users = [u for u, _ in members]
        return cls(members, users, [u for u, role in members if role in MANAGERS],
                   frozenset(users))

    def changed(self, user: str, role: str | None) -> Roster:
        """This roster with `user`'s role `role` (None: not a member), as a new Roster: this
        one may be held by a walk in progress, and stays as it is. The lists a change leaves
        as they were are shared (none is ever changed)."""
        members = self.members
        at = bisect_left(members, user, key=_first)
        was = members[at][1] if at < len(members) and members[at][0] == user else None
        if was == role:
            return self
        members = members.copy()
        users, user_set = self.users, self.user_set
        if role is None:
            del members[at]
            users, user_set = [*users[:at], *users[at + 1:]], user_set - {user}
        elif was is None:
            members.insert(at, (user, role))
            users, user_set = [*users[:at], user, *users[at:]], user_set | {user}
        else:
            members[at] = (user, role)
        posters = self.posters
        if (was in MANAGERS) != (role in MANAGERS):
            i = bisect_left(posters, user)
            posters = ([*posters[:i], user, *posters[i:]] if role in MANAGERS else
                       [*posters[:i], *posters[i + 1:]])
        return Roster(members, users, posters, user_set)


_first = itemgetter(0)


IDLE_CHECKS = 10  # looks for idle sessions per idle timeout (see Broker._watch_idle)
OWN_ACK_DELAY_S = 0.25  # how long the durable ack of a device's own sends may wait
ROSTER_CACHE_MAX = 50_000  # conversations whose member lists the broker keeps in memory
# And the members in those lists, in all (full of groups of 1,000: 116 MiB of RSS). Uncounted
# until 2026-12-05: a presence walk keeps the list of every group of its user, so a service in
# 800 groups of 1,000 members that connected once left 800,000 of them held (173 MiB), for good.
ROSTER_CACHE_MEMBERS = 500_000
LINGER_S = 1.0  # how long a connection we end waits for the peer's EOF (see _linger)
LINGER_BYTES = 1 << 20  # and how much of what it still sends is read and dropped meanwhile
# How long the last writes to a peer may take: a closing error frame (`_refuse`), and the close
# (TLS's close_notify). A peer that reads nothing costs this much; one to which TLS never began
# costs nothing, as nothing is written (tests lengthen it to tell the two apart).
PARTING_S = 1.0
# Ends where the peer has stopped sending already: nothing to wait for.
_NO_LINGER = (None, CloseReason.PEER_EOF, CloseReason.PEER_BYE, CloseReason.BROKEN)


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
        self.presence = Presence(self.hub, self.roster, self.log)
        self.committer = Committer(store, max_batch=config.max_batch,
                                   on_committed=self._on_committed, fanout=self._fanout)
        self.deferring = False  # inside a commit's fan-out: sessions defer their writes
        self.deferred: list[Session] = []
        # Sessions whose cursor passed their own sends, to ack durably (Session._ack_own_sends).
        self.own_acks: dict[Session, None] = {}
        self.handlers = HANDLERS
        self.policy = (ContentPolicy.load(config.content_policy, config.content_action)
                       if config.content_policy else None)
        self.stopping = False
        self.handshaking = 0  # connections accepted and not yet past hello
        self.rate_limited = 0  # requests answered `rate_limited` (`broker_stats`)
        self.started = time.monotonic()  # for `stats`' uptime_s
        # Refusals at --max-handshakes and at --max-connections: a crowd meets them once per
        # client and attempt, so they are counted and logged now and then, not each.
        self.handshakes_full = Repeated()
        self.connections_full = Repeated()
        self._awaiting_hello: dict[Session, trio.CancelScope] = {}  # cancelled at shutdown
        # Devices whose start at the inbox head is on its way (`_start_at_head`): set once
        # that hello is answered; the device's other hellos wait for it (`_after_start`).
        self._starting: dict[tuple[str, str], trio.Event] = {}
        self.port: int | None = None
        self.user_sends = UserBuckets(config.sends_per_s_per_user)
        self.user_typing = UserBuckets(config.typing_per_s_per_user)
        self.user_changes = UserBuckets(config.changes_per_s_per_user)
        self._user_buckets = (self.user_sends, self.user_typing, self.user_changes)
        # Oldest first: an OrderedDict drops its first entry in O(1), where `next(iter(dict))`
        # walks past the slot of every entry deleted since the dict last grew (`_trim_rosters`).
        self._rosters: OrderedDict[str, Roster] = OrderedDict()
        self._roster_members = 0  # the members of the rosters in `_rosters`
        self.roster_cache_max = ROSTER_CACHE_MAX
        self.roster_cache_members = ROSTER_CACHE_MEMBERS
        self._ids = itertools.count(1)
        self._listen_scope: trio.CancelScope | None = None
        self._tls: ssl.SSLContext | None = None  # set by `serve` under --tls-cert
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


    def roster(self, conv: str) -> Roster:
        """Who is in `conv` (cached; each membership commit updates it, `_on_committed`)."""
        cache = self._rosters
        found = cache.get(conv)
        if found is None:
            found = Roster.of(self.store.members(conv))
            size = len(found.members)
            # An empty conversation is not cached, nor one past the bound of members alone.
            if 0 < size <= self.roster_cache_members:
                self._trim_rosters(1, size)
                cache[conv] = found
                self._roster_members += size
        return found

    def _trim_rosters(self, convs: int, members: int) -> None:
        """Drop the oldest cached rosters until `convs` more conversations of `members` more
        members fit `roster_cache_max` and `roster_cache_members` (bounded memory)."""
        cache = self._rosters
        while cache and (len(cache) + convs > self.roster_cache_max
                         or self._roster_members + members > self.roster_cache_members):
            self._roster_members -= len(cache.popitem(last=False)[1].members)

    def _roster_changed(self, conv: str, user: str, role: str | None) -> None:
        """A committed change of `user`'s role in `conv` (None: no longer a member): applied to
        the cached roster, as a new one. Dropping it made the next receipt, typing notice or
        presence walk read the whole member list again (a join in a group of 10,000: 8 ms of
        the event loop, with its fan-out). A roster read since the change committed holds it
        already: applied again, it changes nothing; one read after later batches committed
        too is set back by this batch's changes and brought forward again by theirs, whose
        fan-outs follow in order."""
        cache = self._rosters
        was = cache.get(conv)
        if was is None:
            return
        found = was.changed(user, role)
        self._roster_members += len(found.members) - len(was.members)
        if found.members:
            cache[conv] = found
            self._trim_rosters(0, 0)  # a join past the bound drops the oldest (this one, maybe)
        else:  # as `roster`: an empty conversation is not cached
            del cache[conv]

    # -- after each durable batch ---------------------------------------------------------------

    @contextlib.contextmanager
    def _fanout(self) -> Iterator[None]:
        """Around one batch's replies and fan-out: then write to every touched session."""
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
            deferred, self.deferred = self.deferred, []
            for session in deferred:
                try:
                    session.flush_now()
                except Exception:  # one session's failure must not stop the others' writes
                    session.log.exception("fanout_flush_failed")
                    session.abort(CloseReason.BROKEN)

    def _on_committed(self, commands: list[Any], outcomes: list[Any]) -> None:
        hub = self.hub
        # The batch's membership changes first, all of them: a failure below (one push)
        # must not leave a roster behind the store.
        for outcome in outcomes:
            if outcome.error is None:
                for conv, user, role in outcome.effects.membership:
                    self._roster_changed(conv, user, role)
        for command, outcome in zip(commands, outcomes, strict=True):
            if outcome.error is not None:
                continue
            effects = outcome.effects
            if isinstance(command, SetMute):
                for session in hub.sessions(command.user):
                    session.mute_changed(command.conv)
            if effects.inbox_heads:
                ev = effects.message
                hub.inbox_advanced(effects.inbox_heads, None if ev is None else Fresh(
                    ev.lsn, ev.data["conv"], effects.seq, ev.user, ev.device, ev.data["body"],
                    ev.data["cid"], ev.ts_us))
            for conv, user, kind, seq in effects.receipts:
                self._push_receipt(conv, user, kind, seq)

    def _push_receipt(self, conv: str, user: str, kind: str, seq: int) -> None:
        try:
            roster = self.roster(conv)
        except StorageError as exc:  # pushes are ephemeral: this one is dropped, said why
            self.log.error("push_dropped", user=user, conv=conv, push="receipt", reason=str(exc))
            return
        if user not in roster.user_set:
            # Gone by the end of the batch: the others no longer hear of this user's marks.
            # (An ack made while out of it is no receipt at all: storage.projections decides
            # that at the ack, since an invite in the same batch puts the user back in here.)
            return
        # A delivered mark goes to the others (the user's own devices need not hear of their
        # acks); a read mark to the user's devices too, so unread counts agree everywhere.
        # In channels, only those who post hear of others' marks; so in groups of more than
        # --receipt-audience-max members, where a post read by all n online is n x n pushes.
        # Only the members online are looked at: in a group of 10,000 with 100 online, each
        # receipt walked the 10,000 (0.56 ms of the event loop; a message read by all of them
        # is 10,000 receipts).
        if conv.startswith("chn:") or (conv.startswith("grp:")  # a direct one is two, always
                                       and len(roster.users) > self.config.receipt_audience_max):
            others = roster.posters
            inside = user in others
            if kind == "delivered":
                audience = [u for u in others if u != user] if inside else others
            else:
                audience = others if inside else [*others, user]
        else:  # the user is a member (above): the others hear of a delivery, all of a read
            audience = self.hub.online_among(roster.user_set)
            if kind == "delivered":
                audience.discard(user)
        frame = (wire.Receipt(conv=conv, user=user, delivered=seq, read=None) if kind == "delivered"
                 else wire.Receipt(conv=conv, user=user, delivered=None, read=seq))
        self.hub.push(audience, encode_push(frame))

    # -- connections ------------------------------------------------------------------------------

    async def _handle(self, stream: trio.abc.Stream) -> None:
        conn_id = next(self._ids)
        peer = _peer_name(stream)
        if self._tls is not None:  # its first byte is looked at before TLS starts (_check_tls)
            stream = trio.SSLStream(stream, self._tls, server_side=True, https_compatible=False)
        session = Session(self, stream, conn_id, peer)
        session.tls_unchecked = self._tls is not None
        attached = False
        try:
            if self.handshaking >= self.config.max_handshakes:
                session.reason = CloseReason.LIMIT
                if (refused := self.handshakes_full.count(time.monotonic())) is not None:
                    session.log.warning("handshakes_full", handshaking=self.handshaking,
                                        limit=self.config.max_handshakes, refused=refused)
                if session.tls_unchecked:  # in TLS if it speaks TLS, as ever (1 s at most)
                    with trio.move_on_after(1):
                        if not await self._check_tls(session):
                            return
                await self._refuse(session, None, wire.ErrorCode.LIMIT_EXCEEDED,
                                   "too many connections waiting for their hello; retry later")
                return
            self.handshaking += 1
            try:
                attached = await self._handshake(session)
            except StorageError as exc:  # a read of the store failed: say so, and end
                session.reason = CloseReason.STORAGE
                session.log.error("hello_failed", reason=str(exc))
                await self._refuse(session, None, *wire_error(exc))
            finally:
                self.handshaking -= 1
            if attached:
                await session.run_open()
        except Exception:
            session.log.exception("connection_failed")
            session.reason = session.reason or CloseReason.BROKEN
        finally:
            session.flush_due_own_ack()
            self._detach(session)  # attached or not: the hub knows whether it holds it
            session.ended()  # before the close: its fd number may be reused at once
            said_nothing = session.tls_unchecked  # a TLS port and not a byte from the peer
            if said_nothing:  # TLS never began: closing it would begin it
                session.stream = session.stream.transport_stream
            stream = session.stream  # the TCP stream, if the TLS check answered in the clear
            if session.reason not in _NO_LINGER and not said_nothing:
                with trio.CancelScope(shield=True), trio.move_on_after(LINGER_S):
                    await _linger(stream)
            with trio.CancelScope(shield=True), trio.move_on_after(PARTING_S):
                try:
                    await stream.aclose()  # TLS: its close_notify, then the socket's close
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass  # closed all the same (trio closes the socket when TLS fails)
            said = structlog.get_context(session.log)  # user and device, once the hello named them
            session.log.info(
                "connection_closed", user=said.get("user"), device=said.get("device"),
                reason=(session.reason or CloseReason.PEER_EOF).value,
                duration_s=round(time.monotonic() - session.opened, 3),
                frames_in=session.frames_in, frames_out=session.frames_out,
                frames_rejected=session.frames_rejected)

    async def _handshake(self, session: Session) -> bool:
        """Read hello, authenticate, and answer welcome; False if the session must end."""
        cfg = self.config
        hello = None
        with trio.move_on_after(cfg.handshake_timeout_s) as waiting:
            self._awaiting_hello[session] = waiting
            try:
                if not self.stopping:
                    hello = await self._read_hello(session)
            finally:
                del self._awaiting_hello[session]
        if hello is None:
            if session.reason is None and self.stopping:
                session.reason = CloseReason.SHUTDOWN
                await self._refuse(session, None, wire.ErrorCode.SHUTTING_DOWN, "shutting down")
            elif session.reason is None:
                session.reason = CloseReason.TIMEOUT
                await self._refuse(session, None, wire.ErrorCode.TIMEOUT,
                                   f"no hello within {cfg.handshake_timeout_s:g} s")
            return False
        if wire.PROTOCOL_VERSION not in hello.versions:
            session.reason = CloseReason.PROTOCOL_ERROR
            # Its device, as a forged token's `auth_failed` names it (the token is not read):
            # the one line of the refusal says which client is too old (null until 2026-12-06).
            session.log = session.log.bind(device=hello.device)
            await self._refuse(session, hello.id, wire.ErrorCode.UNSUPPORTED_VERSION,
                               f"this broker speaks protocol version {wire.PROTOCOL_VERSION}")
            return False
        try:
            try:
                claims = tokens.verify(self.keyring.keys, hello.token)
            except tokens.UnknownKey:  # minted since a rotate? The files say (two stat calls)
                self.refresh_keys()
                claims = tokens.verify(self.keyring.keys, hello.token)
        except tokens.TokenError as exc:
            session.reason = CloseReason.AUTH_FAILED
            # An expired token is genuine: whose it was is what the operator asks (a bot's
            # token that ran out). A forged one's claims are anyone's: no user.
            user = {"user": exc.user} if isinstance(exc, tokens.TokenExpired) else {}
            session.log = session.log.bind(**user, device=hello.device)
            session.log.info("auth_failed", reason=str(exc))
            await self._refuse(session, hello.id, wire.ErrorCode.UNAUTHORIZED, str(exc))
            return False
        # Bound now, so that a hello refused after this (revoked, a connection limit) is
        # logged with whose it was to its `connection_closed` as well.
        session.log = session.log.bind(user=claims.user, device=hello.device)
        if claims.role == "monitor" and hello.deliver:
            # Its figures only (PROTOCOL.md §10): no inbox, no cursor, nothing it could ack.
            session.reason = CloseReason.AUTH_FAILED
            why = "a monitor token opens requests-only sessions only (hello deliver: false)"
            session.log.info("auth_failed", reason=why)
            await self._refuse(session, hello.id, wire.ErrorCode.UNAUTHORIZED, why)
            return False
        if hello.deliver:  # a requests-only session does not take up the device's cursor
            await self._after_start(claims.user, hello.device)
        if not await self._admitted(session, hello, claims):
            return False
        # The hello's reads first: should one fail (StorageError), nothing is left to undo
        # (the user's rate buckets are taken below, and given back only by a detach).
        acked = max(  # an ack still on its way to disk counts
            self.store.delivered(claims.user, hello.device),
            self.committer.acked_mark(claims.user, hello.device))
        if acked or hello.start != "head" or not hello.deliver:
            return self._welcome(session, hello, claims, acked)
        # A new device at the head: durable first, admitted again, and the device's other
        # hellos held until this one is answered (or refused).
        key = (claims.user, hello.device)
        self._starting[key] = starting = trio.Event()
        try:
            acked = await self._start_at_head(session, claims.user, claims.role, hello.device)
            if not await self._admitted(session, hello, claims):
                return False
            return self._welcome(session, hello, claims, acked)
        finally:
            del self._starting[key]
            starting.set()

    def _welcome(self, session: Session, hello: Any, claims: tokens.Claims, acked: int) -> bool:
        """Attach an admitted session (replacing the device's last one, unless either is
        requests-only) and answer `welcome`."""
        cfg = self.config
        head = self.store.inbox_head(claims.user)
        session.user, session.device, session.role = claims.user, hello.device, claims.role
        session.expires, session.issued = claims.expires, claims.issued
        session.key_id = claims.key
        session.user_sends = self.user_sends.of(claims.user)
        session.user_typing = self.user_typing.of(claims.user)
        session.user_changes = self.user_changes.of(claims.user)
        max_frame = wire.agree_max_frame(hello.max_frame, cfg.max_frame_bytes)
        session.acked = session.sent = acked
        session.head = head
        delivers = session.delivers = hello.deliver
        if not delivers:
            # Requests-only (PROTOCOL.md §9): outside the hub's delivery map its head never
            # moves, and at its cursor it has nothing to write but replies; not online.
            session.head = acked
            session.handlers = (MONITOR_HANDLERS if claims.role == "monitor"
                                else REQUESTS_ONLY_HANDLERS)
        first = delivers and not self.hub.online(claims.user)  # not when it replaces the only one
        old = self.hub.attach(session)
        if delivers:
            self.committer.device_back(claims.user, hello.device)
        if old is not None:
            old.close(CloseReason.REPLACED, wire.Bye(reason=wire.BYE_REPLACED))
            # Stop its reader too, as `Session._end` does: it then has FLUSH_ON_CLOSE_S to say
            # bye. Out of the hub, the idle watch no longer looks at it, so a dead old
            # connection (its socket full, its peer gone) would otherwise stay for good.
            old.begin_shutdown()
        session.reply(wire.Welcome(
            id=hello.id, version=wire.PROTOCOL_VERSION, session=secrets.token_hex(8),
            user=claims.user, time=int(time.time() * 1000), max_frame=max_frame,
            heartbeat=cfg.heartbeat_s, acked=acked, head=head, caps=list(CAPS),
            role=claims.role, max_body=cfg.max_body_bytes,
            receipt_audience=cfg.receipt_audience_max))
        session.conn.max_frame_bytes = max_frame
        session.log.info("connection_opened", role=claims.role, acked=acked, head=head,
                         key_id=claims.key, deliver=delivers)
        if first:
            self.presence.announce(claims.user, True)
        return True

    async def _after_start(self, user: str, device: str) -> None:
        """Wait until no hello of the device is starting it at the inbox head: one that came
        meanwhile was welcomed at once, at a start not yet durable, and was then replaced by
        the first (until 2026-12-05). Raises StorageError past the handshake timeout."""
        limit = self.config.handshake_timeout_s
        with trio.move_on_after(limit):
            while (starting := self._starting.get((user, device))) is not None:
                await starting.wait()
            return
        raise StorageError(f"the device's start at the inbox head was not answered within "
                           f"{limit:g} s")

    async def _admitted(self, session: Session, hello: Any, claims: tokens.Claims) -> bool:
        """Refuse (and False) an authenticated hello whose token is revoked, expired or of a
        key no longer held, or that comes as the broker stops, or would pass a connection
        limit; asked again after an await. The token was verified before the hello waited
        (for the device's start at the head, behind a slow commit): a key retired or an
        expiry passed meanwhile was not looked at again, and the session was welcomed with it
        (until 2026-12-06), the retired key's for as long as its token lasted, since the
        broker ends such sessions only when the key files change."""
        refused = None
        if claims.issued < self.revoked_before(claims.user):
            refused = CloseReason.REVOKED, "token revoked"
        elif claims.key not in self.keyring.keys:
            refused = CloseReason.REVOKED, tokens.retired_message(claims.key)
        elif claims.expires <= time.time():
            refused = CloseReason.AUTH_FAILED, tokens.expired_message(claims.expires)
        if refused is not None:
            session.reason, why = refused
            session.log.info("auth_failed", reason=why)
            await self._refuse(session, hello.id, wire.ErrorCode.UNAUTHORIZED, why)
            return False
        if self.stopping or self.committer.closing:
            session.reason = CloseReason.SHUTDOWN
            await self._refuse(session, hello.id, wire.ErrorCode.SHUTTING_DOWN, "shutting down")
            return False
        replacing = hello.deliver and any(  # a requests-only session replaces none
            s.device == hello.device for s in self.hub.sessions(claims.user))
        full = None if replacing else self._connections_full(claims.user, hello.deliver)
        if full is not None:
            limit, connections, message = full
            session.reason = CloseReason.LIMIT
            # The broker's limit is met by a crowd (devices past it retry as long as it is
            # full): logged now and then. A user's limit, by that user: each is logged.
            refused = (1 if limit == "per_user"
                       else self.connections_full.count(time.monotonic()))
            if refused is not None:
                session.log.warning("connections_full", limit=limit, connections=connections,
                                    refused=refused)
            await self._refuse(session, hello.id, wire.ErrorCode.LIMIT_EXCEEDED, message)
            return False
        return True

    async def _start_at_head(self, session: Session, user: str, role: str, device: str) -> int:
        """Start a device that has no cursor at `user`'s inbox head (`hello.start` "head",
        PROTOCOL.md §9): ack the head on its behalf, as the device's own ack would be (the
        entries count as delivered to the user), and return it once durable, so that a crash
        and a rebuild give the cursor the welcome names. Queued as its acks are, the start is
        the device's mark (`acked_mark`) from now on; the device's other hellos wait for this
        one (`_after_start`). Entries committed while it waits come after it: the session is
        delivered them. 0 if the broker began to stop before the ack was queued (`_admitted`
        refuses the hello then). Raises StorageError if the ack failed or was not durable
        within the handshake timeout (the hello is answered `unavailable`); the device is then
        new still, unless the ack became durable later: then it resumes after it."""
        head = self.store.inbox_head(user)
        if not head:
            return 0  # nothing to pass over: entry 1 is the first after the head
        committer = self.committer
        durable = trio.Event()
        failed: list[BaseException | None] = []

        def done(error: BaseException | None) -> None:
            failed.append(error)
            durable.set()

        limit = self.config.handshake_timeout_s
        with trio.move_on_after(limit):
            # The conversations it covers are read here, in a thread, not by the rules in the
            # commit: there, on 100,000 entries no device had acked, it held every other
            # user's commit for 130 ms (until 2026-12-05). The marks it makes are the same.
            convs = await trio.to_thread.run_sync(self.store.ack_convs, user, head,
                                                  abandon_on_cancel=True)
            if self.stopping or committer.closing:
                return 0  # nothing queued: the hello is refused shutting_down
            committer.ack_nowait(Ack(user, device, role, head, convs))
            committer.when_acks_durable(user, device, done)
            await durable.wait()
        if not durable.is_set() or failed[0] is not None:
            # The start goes as a session's end would: unless a session of the device is
            # connected (default start, nothing acked before; its acks merge with the start):
            # its cursor may be past the durable mark, and the loss must stay marked for it
            # (until 2026-12-05 it was forgotten, and its next ack named only the
            # conversations delivered since).
            if not any(s.device == device for s in self.hub.sessions(user)):
                committer.device_gone(user, device)
            if failed and failed[0] is not None:
                raise failed[0]
            raise StorageError(f"the start at the inbox head was not durable within {limit:g} s")
        session.log.info("device_started", user=user, device=device, acked=head)
        return head

    def _connections_full(self, user: str, deliver: bool = True) -> tuple[str, int, str] | None:
        """The connection limit a new session of `user` meets, if any: (the limit's log name,
        the connections it counts, the refusal's message). Until 2026-12-05 both limits said
        "too many connections", and the log named neither the limit nor the user. A
        requests-only session (`deliver` false) replaces none, so it is told what frees one."""
        cfg = self.config
        count = self.hub.user_count(user)
        if count >= cfg.max_connections_per_user:
            if deliver:
                what = ("a device already connected may reconnect (its new session replaces "
                        "the old one), another waits for one to close")
            else:
                what = (f"a requests-only session waits for one to close (one whose connection "
                        f"dropped unseen closes after {cfg.idle_timeout_s:g} s without a frame, "
                        f"the idle timeout)")
            return ("per_user", count,
                    f"this user has {count} connection{'s' * (count != 1)}, the most the "
                    f"broker allows per user; {what}")
        if self.hub.count >= cfg.max_connections:
            return ("total", self.hub.count,
                    f"the broker has {self.hub.count} connections, the most it allows; "
                    f"retry later")
        return None

    async def _read_hello(self, session: Session) -> Any:
        conn = session.conn
        if session.tls_unchecked and not await self._check_tls(session):
            return None
        while True:
            try:
                event = conn.next_event()
            except wire.RemoteProtocolError as exc:
                session.reason = CloseReason.PROTOCOL_ERROR
                session.log.info("frame_rejected", code=exc.code.name.lower(), reason=exc.message,
                                 fatal=True)
                await self._refuse(session, exc.request_id, exc.code, exc.message)
                return None
            if event is wire.CLOSED:
                session.reason = CloseReason.PEER_EOF
                return None
            if event is not wire.NEED_DATA:
                return event
            try:
                data = await session.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                session.reason = CloseReason.BROKEN
                if isinstance(exc.__cause__, ssl.SSLError):  # TLS failed (its handshake): why
                    cause = exc.__cause__
                    session.log.info("tls_failed", reason=cause.reason or str(cause))
                return None
            conn.receive_data(data)

    async def _check_tls(self, session: Session) -> bool:
        """On a TLS port, wait for the peer's first byte (under the handshake timeout) without
        taking it: a TLS handshake begins with 0x16. Anything else (a homing frame, whose
        length begins with 0x00; an HTTP request) is a client without TLS: it is answered in
        the clear with a closing `bad_frame` saying so, rather than dropped with nothing
        said. False if the session ends."""
        tcp = session.stream.transport_stream
        try:
            first = await tcp.socket.recv(1, socket.MSG_PEEK)
        except OSError:
            first = None
        if first and first[0] == 0x16:
            session.tls_unchecked = False
            return True
        session.tls_unchecked = False
        session.stream = tcp  # TLS never begins on this connection
        if not first:
            session.reason = CloseReason.PEER_EOF if first == b"" else CloseReason.BROKEN
            return False
        session.reason = CloseReason.PROTOCOL_ERROR
        message = ("this port speaks TLS only: connect with TLS (homing --tls or --tls-ca; "
                   "the SDK's tls=)")
        session.log.info("frame_rejected", code=wire.ErrorCode.BAD_FRAME.wire_name,
                         reason=message, fatal=True)
        await self._refuse(session, None, wire.ErrorCode.BAD_FRAME, message)
        return False

    async def _refuse(self, session: Session, request_id: int | None, code: wire.ErrorCode,
                      message: str) -> None:
        """Send a closing error frame (best effort, bounded in time)."""
        if session.tls_unchecked:
            # A TLS port and not a byte from the peer yet: we do not know which language it
            # speaks, so nothing is said (a TLS handshake would wait for its hello in vain).
            return
        try:
            data = encode_push(wire.error_frame(code, message, request_id, close=True))
        except wire.ProtocolError:
            return
        with trio.move_on_after(PARTING_S):
            try:
                await session.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    def _detach(self, session: Session) -> None:
        hub, user = self.hub, session.user
        if hub.holds(session):  # the device's own session, not one that replaced it
            self.committer.device_gone(user, session.device)
        last = hub.detach(session)  # the user's last delivering session
        if (last or not session.delivers) and user and not hub.user_count(user):
            for buckets in self._user_buckets:
                buckets.gone(user)
        if last:
            self.presence.announce(user, False)

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
                    if cfg.tls_cert:  # each connection is wrapped in `_handle`
                        self._tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                        self._tls.load_cert_chain(str(cfg.tls_cert), str(cfg.tls_key),
                                                  password=no_passphrase)
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
                    await trio.serve_listeners(self._handle, listeners,
                                               handler_nursery=connections)
                # Listener cancelled: stop every session gracefully; those still waiting for
                # their hello are told `shutting_down` at once.
                for waiting in list(self._awaiting_hello.values()):
                    waiting.cancel()
                for session in self.hub.all_sessions():
                    session.begin_shutdown()
                connections.cancel_scope.deadline = trio.current_time() + cfg.shutdown_grace_s
            await self.committer.close()
            outer.cancel_scope.cancel()  # the idle watch, the own sends' acks, the stats
        self.log.info("broker_stopped", batches=self.committer.batches,
                      commands=self.committer.commands)
        self._stopped.set()

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
            for buckets in self._user_buckets:
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


async def _linger(stream: trio.abc.Stream) -> None:
    """We end this connection while the peer may still be sending: half-close it (after the
    last frames, a closing error or bye, already written), then read and drop what comes until
    the peer's EOF. Closing a socket with unread input resets the connection, and a reset can
    make the peer's kernel throw away those last frames before the peer has read them."""
    try:
        if isinstance(stream, trio.abc.HalfCloseableStream):
            await stream.send_eof()
        left = LINGER_BYTES
        while left > 0:
            data = await stream.receive_some(65536)
            if not data:
                return
            left -= len(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        return


def _peer_name(stream: trio.abc.Stream) -> str:
    inner = getattr(stream, "transport_stream", stream)
    try:
        host, port = inner.socket.getpeername()[:2]
        return f"{host}:{port}"
    except (AttributeError, OSError):
        return "?"
