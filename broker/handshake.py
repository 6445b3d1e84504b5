"""A connection's handshake: from its hello to its welcome, or to the closing error that
refuses it.

`run` reads the hello (on a TLS port, after a look at the peer's first byte, `check_tls`),
verifies its token, admits it (`_admitted`: not revoked, expired or of a key no longer held,
not while the broker stops, within the connection limits), starts a new device at the inbox
head if it asks (`_start_at_head`, durable before the welcome), and attaches the session and
answers `welcome` (`_welcome`). Every refusal is a closing error frame (`refuse`); the
session's `reason` says why it ended, for its `connection_closed` line (broker/connection.py).
A token that fails is refused by `unauthorized`, and first bytes that are no hello this
broker takes by `not_a_hello`: both count a failed hello against the peer's address, and past
--auth-fail-rate answer it with `retry_ms`, unlogged (broker/hellos.py).
"""

from __future__ import annotations

import secrets
import socket
import ssl
import time
from typing import TYPE_CHECKING, Any, NamedTuple

import trio

import protocol as wire
from broker import awaiting, tokens
from broker.errors import CloseReason
from broker.handlers import MONITOR_HANDLERS, REQUESTS_ONLY_HANDLERS
from broker.hub import encode_push
from storage.commands import Ack
from storage.errors import StorageError

if TYPE_CHECKING:
    from broker.hellos import Throttled
    from broker.server import Broker
    from broker.session import Session

# The welcome's caps (docs/PROTOCOL.md §3.3): the optional features this broker has.
CAPS = (wire.CAP_CREATE_CID, wire.CAP_START_HEAD, wire.CAP_REQUESTS_ONLY,
        wire.CAP_RECEIPTS_PAGED, wire.CAP_MEMBERS_PAGED)
# The tokens whose requests-only hello is a monitor's check (`homing health`), taken past
# --max-handshakes (`past_limit`).
CHECK_ROLES = ("monitor", "admin")
# Past --max-handshakes, how long a connection is given to send its hello, which is taken if
# it is a monitor's check, or if it may take a silent connection's place (`past_limit`,
# broker/awaiting.py), and how many connections at most wait so at once
# (the others wait in the listen backlog meanwhile: broker/listen.py). A client sends its
# hello with its connect, so a crowd's connection waits a round trip, holding no buffer; the
# time is for a check run on a machine whose cores are busy.
CHECK_WAIT_S = 0.25
CHECK_WAITERS = 64
# With all CHECK_WAITERS places taken and more connections waiting in the listen backlog, a
# place held this long is given up (the connection refused `limit_exceeded`), the longest held
# first (`Broker._crowded`): a connection that waited in the backlog has its hello there
# already, and a flood of connections that never speak, each holding a place CHECK_WAIT_S, left
# a monitor's check in the backlog behind them (256 a second: 16 s behind 4,000).
CHECK_CROWDED_S = 0.025
# How long the last writes to a peer may take: a closing error frame (`refuse`), and the close
# (TLS's close_notify, broker/connection.py). A peer that reads nothing costs this much; one to
# which TLS never began costs nothing, as nothing is written (tests lengthen it to tell the two
# apart).
PARTING_S = 1.0


async def run(broker: Broker, session: Session, past: PastLimit | None = None) -> bool:
    """Read hello (unless `past_limit` read it, and verified its token), authenticate, and
    answer welcome; False if the session must end."""
    hello, claims = (past.hello, past.claims) if past is not None else (None, None)
    cfg = broker.config
    if hello is None:
        with trio.move_on_after(cfg.handshake_timeout_s) as waiting:
            broker.awaiting.add(session, waiting, time.monotonic())
            try:
                if not broker.stopping:
                    hello = await _read_hello(session)
            finally:
                broker.awaiting.remove(session)
    if hello is None:
        if session.reason is None and session.place_given_up:
            session.reason = CloseReason.LIMIT
            await refuse(session, None, wire.ErrorCode.LIMIT_EXCEEDED,
                         f"no hello within {awaiting.SILENT_S:g} s, with every handshake "
                         f"place taken (--max-handshakes {cfg.max_handshakes}) and another "
                         f"connection's hello waiting for one; retry",
                         retry_ms=int(awaiting.SILENT_S * 1000))
        elif session.reason is None and broker.stopping:
            session.reason = CloseReason.SHUTDOWN
            await refuse(session, None, wire.ErrorCode.SHUTTING_DOWN, "shutting down")
        elif session.reason is None:
            session.reason = CloseReason.TIMEOUT
            await refuse(session, None, wire.ErrorCode.TIMEOUT,
                         f"no hello within {cfg.handshake_timeout_s:g} s")
        return False
    if wire.PROTOCOL_VERSION not in hello.versions:
        # Its device, as a forged token's `auth_failed` names it (the token is not read):
        # the one line of the refusal says which client is too old (null until 2026-12-06).
        session.log = session.log.bind(device=hello.device)
        await not_a_hello(session, hello.id, wire.ErrorCode.UNSUPPORTED_VERSION,
                          f"this broker speaks protocol version {wire.PROTOCOL_VERSION}",
                          logged=False, counted=_claims(broker, hello.token) is None)
        return False
    try:
        try:
            if claims is None:
                claims = tokens.verify(broker.keyring.keys, hello.token)
        except tokens.UnknownKey:  # minted since a rotate? The files say (two stat calls)
            # Even for an address past --auth-fail-rate (a few us a hello): a token of the new
            # key, beside the retired ones that throttled its address, is a good one.
            broker.refresh_keys()
            claims = tokens.verify(broker.keyring.keys, hello.token)
    except tokens.TokenError as exc:
        # An expired token is genuine: whose it was is what the operator asks (a bot's
        # token that ran out). A forged one's claims are anyone's: no user.
        user = {"user": exc.user} if isinstance(exc, tokens.TokenExpired) else {}
        session.log = session.log.bind(**user, device=hello.device)
        await unauthorized(broker, session, hello.id, str(exc))
        return False
    # Bound now, so that a hello refused after this (revoked, a connection limit) is
    # logged with whose it was to its `connection_closed` as well.
    session.log = session.log.bind(user=claims.user, device=hello.device)
    if claims.role == "monitor" and hello.deliver:
        # Its figures only (PROTOCOL.md §10): no inbox, no cursor, nothing it could ack.
        why = "a monitor token opens requests-only sessions only (hello deliver: false)"
        await unauthorized(broker, session, hello.id, why)
        return False
    if hello.deliver:  # a requests-only session does not take up the device's cursor
        await _after_start(broker, claims.user, hello.device)
    if not await _admitted(broker, session, hello, claims):
        return False
    # The hello's reads first: should one fail (StorageError), nothing is left to undo
    # (the user's rate buckets are taken below, and given back only by a detach).
    acked = max(  # an ack still on its way to disk counts
        broker.store.delivered(claims.user, hello.device),
        broker.committer.acked_mark(claims.user, hello.device))
    if acked or hello.start != "head" or not hello.deliver:
        return _welcome(broker, session, hello, claims, acked)
    # A new device at the head: durable first, admitted again, and the device's other
    # hellos held until this one is answered (or refused).
    key = (claims.user, hello.device)
    broker.head_starts[key] = starting = trio.Event()
    try:
        acked = await _start_at_head(broker, session, claims.user, claims.role, hello.device)
        if not await _admitted(broker, session, hello, claims):
            return False
        return _welcome(broker, session, hello, claims, acked)
    finally:
        del broker.head_starts[key]
        starting.set()


def _welcome(broker: Broker, session: Session, hello: Any, claims: tokens.Claims,
             acked: int) -> bool:
    """Attach an admitted session (replacing the device's last one, unless either is
    requests-only) and answer `welcome`."""
    cfg = broker.config
    if hello.deliver and session.peer_hung_up():
        # Its client gave up on it and closed (a connect cancelled or timed out, its hello
        # still in the socket): welcomed, it would replace the session the device opened
        # since, which the SDK takes for a second process of the device and stops for good.
        session.reason = CloseReason.PEER_EOF
        return False
    head = broker.store.inbox_head(claims.user)
    session.user, session.device, session.role = claims.user, hello.device, claims.role
    session.expires, session.issued = claims.expires, claims.issued
    session.key_id = claims.key
    session.user_sends = broker.user_sends.of(claims.user)
    session.user_typing = broker.user_typing.of(claims.user)
    session.user_changes = broker.user_changes.of(claims.user)
    session.user_reads = broker.user_reads.of(claims.user)
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
    first = delivers and not broker.hub.online(claims.user)  # not when it replaces the only one
    old = broker.hub.attach(session)
    if delivers:
        broker.committer.device_back(claims.user, hello.device)
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
        broker.presence.announce(claims.user, True)
    return True


async def _after_start(broker: Broker, user: str, device: str) -> None:
    """Wait until no hello of the device is starting it at the inbox head: one that came
    meanwhile was welcomed at once, at a start not yet durable, and was then replaced by
    the first (until 2026-12-05). Raises StorageError past the handshake timeout."""
    limit = broker.config.handshake_timeout_s
    with trio.move_on_after(limit):
        while (starting := broker.head_starts.get((user, device))) is not None:
            await starting.wait()
        return
    raise StorageError(f"the device's start at the inbox head was not answered within "
                       f"{limit:g} s")


async def _admitted(broker: Broker, session: Session, hello: Any,
                    claims: tokens.Claims) -> bool:
    """Refuse (and False) an authenticated hello whose token is revoked, expired or of a
    key no longer held, or that comes as the broker stops, or would pass a connection
    limit; asked again after an await. The token was verified before the hello waited
    (for the device's start at the head, behind a slow commit): a key retired or an
    expiry passed meanwhile was not looked at again, and the session was welcomed with it
    (until 2026-12-06), the retired key's for as long as its token lasted, since the
    broker ends such sessions only when the key files change."""
    refused = None
    if claims.issued < broker.revoked_before(claims.user):
        refused = CloseReason.REVOKED, "token revoked"
    elif claims.key not in broker.keyring.keys:
        refused = CloseReason.REVOKED, tokens.retired_message(claims.key)
    elif claims.expires <= time.time():
        refused = CloseReason.AUTH_FAILED, tokens.expired_message(claims.expires)
    if refused is not None:
        reason, why = refused
        await unauthorized(broker, session, hello.id, why, reason)
        return False
    if broker.stopping or broker.committer.closing:
        session.reason = CloseReason.SHUTDOWN
        await refuse(session, hello.id, wire.ErrorCode.SHUTTING_DOWN, "shutting down")
        return False
    replacing = hello.deliver and any(  # a requests-only session replaces none
        s.device == hello.device for s in broker.hub.sessions(claims.user))
    full = None if replacing else _connections_full(broker, claims.user, hello.deliver)
    if full is not None:
        limit, connections, message = full
        session.reason = CloseReason.LIMIT
        # The broker's limit is met by a crowd (devices past it retry as long as it is
        # full): logged now and then. A user's limit, by that user: each is logged.
        refused = (1 if limit == "per_user"
                   else broker.connections_full.count(time.monotonic()))
        if refused is not None:
            session.log.warning("connections_full", limit=limit, connections=connections,
                                refused=refused)
        await refuse(session, hello.id, wire.ErrorCode.LIMIT_EXCEEDED, message)
        return False
    return True


async def _start_at_head(broker: Broker, session: Session, user: str, role: str,
                         device: str) -> int:
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
    head = broker.store.inbox_head(user)
    if not head:
        return 0  # nothing to pass over: entry 1 is the first after the head
    committer = broker.committer
    durable = trio.Event()
    failed: list[BaseException | None] = []

    def done(error: BaseException | None) -> None:
        failed.append(error)
        durable.set()

    limit = broker.config.handshake_timeout_s
    with trio.move_on_after(limit):
        # The conversations it covers are read here, in a thread, not by the rules in the
        # commit: there, on 100,000 entries no device had acked, it held every other
        # user's commit for 130 ms (until 2026-12-05). The marks it makes are the same.
        convs = await trio.to_thread.run_sync(broker.store.ack_convs, user, head,
                                              abandon_on_cancel=True)
        if broker.stopping or committer.closing:
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
        if not any(s.device == device for s in broker.hub.sessions(user)):
            committer.device_gone(user, device)
        if failed and failed[0] is not None:
            raise failed[0]
        raise StorageError(f"the start at the inbox head was not durable within {limit:g} s")
    session.log.info("device_started", user=user, device=device, acked=head)
    return head


def _connections_full(broker: Broker, user: str,
                      deliver: bool = True) -> tuple[str, int, str] | None:
    """The connection limit a new session of `user` meets, if any: (the limit's log name,
    the connections it counts, the refusal's message). Until 2026-12-05 both limits said
    "too many connections", and the log named neither the limit nor the user. A
    requests-only session (`deliver` false) replaces none, so it is told what frees one."""
    cfg = broker.config
    count = broker.hub.user_count(user)
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
    if broker.hub.count >= cfg.max_connections:
        return ("total", broker.hub.count,
                f"the broker has {broker.hub.count} connections, the most it allows; "
                f"retry later")
    return None


class PastLimit(NamedTuple):
    """What a connection past --max-handshakes showed in its check place (`past_limit`)."""

    hello: Any  # its hello, read whole (a plain TCP port only), else None
    claims: tokens.Claims | None  # its token's, verified (with a hello only)
    check: bool  # a monitor's check: taken whatever the crowd
    # Its hello with a good token (plain TCP), or TLS's first byte: it may take the place of a
    # silent connection (broker/awaiting.py)
    spoke: bool


SILENT = PastLimit(None, None, False, False)


async def past_limit(broker: Broker, session: Session) -> PastLimit:
    """Past --max-handshakes: what the connection says within CHECK_WAIT_S (or CHECK_CROWDED_S
    while others wait in the listen backlog behind the CHECK_WAITERS places): on a plain TCP
    port, the hello its first read holds whole, a monitor's check if it asks a requests-only
    session with a valid monitor or admin token (answered at once with no wait for more
    bytes, so it holds no handshake place: thousands of devices reconnecting after a restart
    hold every place, and a liveness probe refused there has a healthy broker restarted,
    docs/OPERATIONS.md, "Monitoring"); on a TLS port, whether its first byte begins a TLS
    handshake. A connection that spoke may take the place of a silent one (broker/awaiting.py);
    any other is refused `limit_exceeded`."""
    if broker.check_waiters >= CHECK_WAITERS:
        return SILENT
    broker.check_waiters += 1
    data = None
    try:
        with trio.move_on_after(CHECK_WAIT_S) as waiting:
            broker.check_waits[waiting] = time.monotonic()  # given up if crowded (`_crowded`)
            try:
                if session.tls_unchecked:
                    data = await _first_byte(session)
                else:
                    data = await session.receive_once()
            finally:
                broker.check_waits.pop(waiting, None)
    finally:
        broker.check_waiters -= 1
    if not data:  # None: none in time, an EOF
        return SILENT
    if session.tls_unchecked:
        return PastLimit(None, None, False, data[0] == 0x16)
    conn = session.conn
    conn.receive_data(data)
    try:
        hello = conn.next_event()
    except wire.RemoteProtocolError:
        return SILENT
    if not isinstance(hello, wire.Hello):
        return SILENT
    if (claims := _claims(broker, hello.token)) is None:
        return SILENT
    return PastLimit(hello, claims, not hello.deliver and claims.role in CHECK_ROLES, True)


async def _first_byte(session: Session) -> bytes | None:
    """The first byte a TLS port's peer sends, left unread (`check_tls` looks at it again)."""
    try:
        return await session.stream.transport_stream.socket.recv(1, socket.MSG_PEEK)
    except OSError:
        return None


async def _read_hello(session: Session) -> Any:
    conn = session.conn
    if session.tls_unchecked and not await check_tls(session):
        return None
    while True:
        try:
            event = conn.next_event()
        except wire.RemoteProtocolError as exc:  # before the hello, every one is fatal
            await not_a_hello(session, exc.request_id, exc.code, exc.message)
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
                _tls_failed(session, exc.__cause__)
            return None
        conn.receive_data(data)


def _tls_failed(session: Session, cause: ssl.SSLError) -> None:
    """A TLS port's connection whose TLS failed before its hello (its handshake, mostly: bytes
    that begin as TLS and are not, a client that refuses the certificate): a failed hello, in
    its address's --auth-fail-rate bucket as `not_a_hello`'s. Within it, logged `tls_failed`
    with OpenSSL's reason; past it, only in the address's `auth_throttled` now and then (code
    `tls_failed`), and no `connection_closed` line. Nothing is said either way: TLS failed.
    Until 2026-12-07 (the review of the garbage throttle) it was never counted: 0x16 and then
    garbage, as fast as a peer could connect, was two log lines each time."""
    why = cause.reason or str(cause)
    throttled = session.broker.failed_hellos.failed(session.address, time.monotonic())
    if throttled is None:
        session.log.info("tls_failed", reason=why)
        return
    _say_throttled(session, throttled, "tls_failed", why)  # closed at once, as BROKEN


async def check_tls(session: Session) -> bool:
    """On a TLS port, wait for the peer's first byte (under the handshake timeout) without
    taking it: a TLS handshake begins with 0x16. Anything else (a homing frame, whose
    length begins with 0x00; an HTTP request) is a client without TLS: it is answered in
    the clear with a closing `bad_frame` saying so, rather than dropped with nothing
    said: a failed hello (`not_a_hello`). False if the session ends."""
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
    message = ("this port speaks TLS only: connect with TLS (homing --tls or --tls-ca; "
               "the SDK's tls=)")
    await not_a_hello(session, None, wire.ErrorCode.BAD_FRAME, message)
    return False


async def unauthorized(broker: Broker, session: Session, request_id: int | None, why: str,
                       reason: CloseReason = CloseReason.AUTH_FAILED) -> None:
    """Refuse a hello whose token failed (`why`): `unauthorized`, logged `auth_failed`; or,
    past its address's --auth-fail-rate (broker/hellos.py), `unauthorized` still, with
    `retry_ms`, logged only as its address's `auth_throttled` now and then. The code stays
    the token's: a client told `unauthorized` mints or asks for a new token (an expired one
    behind a NAT address that others' tokens throttle), where `rate_limited` would have it
    keep the token and try again."""
    throttled = broker.failed_hellos.failed(session.address, time.monotonic())
    if throttled is None:
        session.reason = reason
        session.log.info("auth_failed", reason=why)
        await refuse(session, request_id, wire.ErrorCode.UNAUTHORIZED, why)
        return
    await _throttled(session, throttled, request_id, wire.ErrorCode.UNAUTHORIZED, why,
                     f"{why} (too many failed hellos from {session.address}: theirs are not "
                     f"logged for {throttled.retry_ms / 1000:.1f} s more; a valid token is "
                     "welcomed)")


def _claims(broker: Broker, token: Any) -> tokens.Claims | None:
    """A hello's token's claims if it is good (and unexpired), else None, with the keys as
    they stand (no refresh: an unknown key is no good token here). Asked past
    --max-handshakes (`past_limit`), and for a hello of another protocol version: a genuine
    client too old or too new for this broker is no failed hello (`not_a_hello`, `counted`
    false), as no good token is counted (broker/hellos.py)."""
    try:
        return tokens.verify(broker.keyring.keys, token)
    except tokens.TokenError:
        return None


async def not_a_hello(session: Session, request_id: int | None, code: wire.ErrorCode,
                      why: str, *, logged: bool = True, counted: bool = True) -> None:
    """Refuse a connection whose first bytes are no hello this broker takes: a frame that does
    not decode (`bad_frame`, `too_large`), a first frame that is not a hello, a hello without
    a field it needs (`invalid`), a hello of another protocol version (`unsupported_version`,
    `logged` false: its `connection_closed` line says it; `counted` false if its token is
    good: until the review of 2026-12-07 a fleet of genuine old clients behind a NAT address
    spent its bucket, and their refusals and the address's failed tokens went unlogged),
    plaintext on a TLS port (`check_tls`). Each is a failed hello, counted against its
    address's --auth-fail-rate in the bucket `unauthorized` takes from: within it, `code` and
    `why`, logged `frame_rejected`, and the linger for the peer's EOF; past it, the same code
    and message with `retry_ms`, logged only as its address's `auth_throttled` now and then,
    and no linger. Until 2026-12-07 none was counted: a peer sending garbage as fast as it could
    connect was answered with two log lines and up to a second's linger each."""
    broker = session.broker
    throttled = (broker.failed_hellos.failed(session.address, time.monotonic()) if counted
                 else None)
    if throttled is None:
        session.reason = CloseReason.PROTOCOL_ERROR
        if logged:
            session.log.info("frame_rejected", code=code.wire_name, reason=why, fatal=True)
        await refuse(session, request_id, code, why)
        return
    # The message as within the rate: a client is told what it did wrong (a TLS port's
    # plaintext client, that it needs TLS), which is all that a retry_ms does not say.
    await _throttled(session, throttled, request_id, code, why, why)


async def _throttled(session: Session, throttled: Throttled, request_id: int | None,
                     code: wire.ErrorCode, why: str, message: str) -> None:
    """Refuse a failed hello past its address's --auth-fail-rate: `code` and `message` with
    `retry_ms`, closing; its `auth_throttled` line if its address has had none within
    REPEAT_EVERY_S, and no line of its own (the session's reason tells broker/connection.py
    neither to log its `connection_closed` nor to linger for the peer's EOF)."""
    _say_throttled(session, throttled, code.wire_name, why)
    await refuse(session, request_id, code, message, throttled.retry_ms)


def _say_throttled(session: Session, throttled: Throttled, code: str, why: str) -> None:
    """A failed hello past its address's --auth-fail-rate ends unlogged (AUTH_THROTTLED), but
    for its address's `auth_throttled` warning now and then (`throttled.refused`)."""
    session.reason = CloseReason.AUTH_THROTTLED
    if throttled.refused is not None:
        session.log.warning("auth_throttled", address=session.address,
                            refused=throttled.refused, retry_ms=throttled.retry_ms,
                            code=code, reason=why)


async def refuse(session: Session, request_id: int | None, code: wire.ErrorCode,
                 message: str, retry_ms: int | None = None) -> None:
    """Send a closing error frame (best effort, bounded in time)."""
    if session.tls_unchecked:
        # A TLS port and not a byte from the peer yet: we do not know which language it
        # speaks, so nothing is said (a TLS handshake would wait for its hello in vain).
        return
    try:
        data = encode_push(wire.error_frame(code, message, request_id, close=True,
                                            retry_ms=retry_ms))
    except wire.ProtocolError:
        return
    with trio.move_on_after(PARTING_S):
        try:
            await session.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

