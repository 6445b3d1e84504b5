"""One connection = one device session: the byte pump between a stream and a protocol Connection.

Two tasks per session. The reader feeds received bytes to the sans-IO connection and hands each
frame to its handler (broker/handlers.py). The writer flushes queued replies and pushes, then
feeds deliveries from the user's inbox on disk, at most `window` unacked at a time. The only
other write is `flush_now`, the post-commit fast path, and it writes only while the writer is
idle, leaving whatever the socket does not take to it. Nothing else is buffered per device, so a
stalled device costs a write's worth of deliveries (DELIVER_BYTES), as much of fresh messages,
and its bounded queue, never the broker's memory.

A requests-only session (`hello.deliver: false`, PROTOCOL.md §9) runs the same two tasks: its
cursor has no head beyond it and the hub sends it no wake-ups or pushes, so its writer writes
replies alone.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import socket
import time
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING

import trio

import protocol as wire
from broker import tokens
from broker.errors import CloseReason, wire_error
from broker.handlers import answer_known_repeats
from broker.hub import Fresh
from storage.commands import Ack, SendMessage
from storage.errors import StorageError

if TYPE_CHECKING:
    from broker.server import Broker

RECV_BYTES = 65536
FLUSH_ON_CLOSE_S = 2.0
INBOX_READ_BATCH = 256
# The most bytes of deliveries a session takes into memory at a time: one write's worth, and
# as much again of fresh messages queued (`_fresh`); at least one delivery a write. The window
# bounds what is unacked, not what waits here for a socket that does not take it: a device
# that stopped reading held its whole window (256 deliveries of 60 KB: 15 MB, for each such
# device) until 2026-12-06; now the rest waits on disk, read as the socket takes what it has.
# Deliveries of a few hundred bytes fill a window of 256 before this.
DELIVER_BYTES = 256 << 10
MAX_QUEUED_FRAMES = 1024  # replies queued for the writer before the reader stops reading
MAX_QUEUED_BYTES = 4 << 20  # or this many bytes of them (history pages are up to max_frame each)
# The longest one connection's frames hold the event loop before the others get a turn: a read
# may hold hundreds of pipelined queries (a history page of 200 messages, or the receipts of a
# message in a 1,000-member group, each a millisecond).
FAIR_SLICE_S = 0.005
# Bytes of a frame still arriving that count as a sign of life, as a whole frame does (the
# idle timeout, PROTOCOL.md §8): a big send over a slow live link whose upload outlasts the
# timeout is not cut mid-frame (and resent, and cut again, for ever: until 2026-12-06). The
# SDK's own bound is the same piece (WRITE_PIECE_BYTES). A trickle of less than this per idle
# timeout still times out, and a frame is never longer than max_frame, so holding one open
# costs its sender at least this much per timeout and ends at max_frame.
FRAME_PROGRESS_BYTES = 64 * 1024
# Conversations whose mute state one session keeps (`Session._muted`); past it all are dropped
# together and read again as needed. A service's session lives for weeks and is delivered the
# messages of every conversation it is in: unbounded, this held one entry per conversation
# ever delivered to it (20,000 after 20,000 users each sent it one message, for good).
MUTED_CACHE_MAX = 4096


class Session:
    """One accepted connection: before its hello (which may be refused), then the device's
    authenticated session, and its two tasks."""

    def __init__(self, broker: Broker, stream: trio.abc.Stream, conn_id: int, peer: str) -> None:
        self.broker = broker
        self.stream = stream
        self.conn_id = conn_id
        self.peer = peer
        self.address = peer  # what its failed hellos count under (broker/hellos.py)
        cfg = broker.config
        # Until welcome, frames of HELLO_MAX_FRAME_BYTES, whatever --max-frame-bytes says
        # (PROTOCOL.md §3.2): a peer that never authenticates cannot make us hold more of its
        # half-frame, and a valid hello is taken even by a broker of small frames.
        # A send's body is held to --max-body-bytes by on_send, not here: the resend of a
        # message accepted under a larger limit is a dup (the frame limit still bounds it).
        self.conn = wire.Connection(
            wire.Role.SERVER, max_frame_bytes=wire.HELLO_MAX_FRAME_BYTES,
            max_body_bytes=wire.MAX_FRAME_LIMIT, max_frame_values=cfg.max_frame_values)
        self.log = broker.log.bind(conn=conn_id, peer=peer)
        # Whether its debug events are printed (the level is fixed when the logger is made, and
        # a later bind keeps it): the per-message ones skip building their arguments if not.
        enabled = getattr(self.log, "is_enabled_for", None)
        self.log_debug = enabled is None or enabled(logging.DEBUG)
        # False for a requests-only session (`hello.deliver: false`, PROTOCOL.md §9): the hub
        # keeps it apart (no deliveries, no pushes, no presence), and `ack` is refused on it.
        self.delivers = True
        self.handlers = broker.handlers  # by frame type; set at hello
        self.user = ""
        self.device = ""
        self.role = "user"
        self.expires = math.inf  # when its token expires (time.time()); set at hello
        self.issued = 0  # when its token was issued (Unix seconds; revocation); set at hello
        self.key_id = ""  # the id of the key its token was signed with; set at hello
        self.window = cfg.window
        # Delivery cursor: acked <= sent <= head (inbox_seq).
        self.head = 0
        self.acked = 0
        self.sent = 0
        self.unacked: deque[tuple[int, str, int]] = deque()  # (inbox_seq, conv, msg seq or 0)
        self.own_lsns: set[int] = set()  # this device's sends not yet passed in its inbox
        # Entries sent+1 .. sent+len(_fresh), straight from their commits; kept only while they
        # are every entry up to head and fit the window's room (docs/DESIGN.md, "Delivery").
        self._fresh: list[Fresh] = []
        self._fresh_bytes = 0  # the bodies' bytes in `_fresh` (Fresh.body_size; DELIVER_BYTES)
        self._muted: dict[str, bool] = {}  # conv -> muted, as read from the store
        self.out: deque[bytes] = deque()
        self.out_bytes = 0  # the bytes of the replies and pushes in `out` (not of deliveries)
        # Replies and pushes the writer took from `out` and is still writing (send_all): they
        # count against MAX_QUEUED_FRAMES / MAX_QUEUED_BYTES until written.
        self.writing_frames = 0
        self.writing_bytes = 0
        self.inflight = 0
        # Sends refused (rate, policy, body limit) waiting for the sends on their way, as they
        # may repeat one of them (handlers._refused): their `then` -> (request id, command).
        self.repeats: dict[object, tuple[int, SendMessage]] = {}
        self.inflight_free = trio.Event()
        # A stop found the connection at --max-inflight-requests: requests read from now on
        # that would await a commit are left unanswered, nothing done (`pass_over`); how many
        # were, for `connection_closed`.
        self.passing_over = False
        self.passed_over = 0
        self._wake = trio.Event()
        self._drained = trio.Event()
        self._deferred = False  # in the broker's deferred list
        self._writing = False  # the writer is inside send_all
        inner = getattr(stream, "socket", None)  # plain TCP only; TLS goes through the writer
        self._fd = inner.fileno() if inner is not None else None
        self._closing = False
        # On a TLS port, until the peer's first byte showed it speaks TLS (handshake.check_tls).
        self.tls_unchecked = False
        # Its wait for a hello cancelled to give its handshake place to a connection that
        # spoke (broker/awaiting.py): the place is no longer counted as its own.
        self.place_given_up = False
        # While the reader waits for bytes, when the last whole frame arrived (time.monotonic);
        # None while it is not waiting: the broker's idle watch (Broker._watch_idle) times out a
        # session with no frame for too long. Bytes of a frame that never completes count only
        # FRAME_PROGRESS_BYTES at a time (`_unframed`, since the last count), so trickling
        # them cannot keep a session open.
        self.waiting_since: float | None = None
        self._last_frame = time.monotonic()
        self._unframed = 0
        self.reason: CloseReason | None = None
        self._scope: trio.CancelScope | None = None
        self._reader_scope: trio.CancelScope | None = None
        self._pause_scope: trio.CancelScope | None = None  # the reader's hold (`_holding`)
        self._drain_scope: trio.CancelScope | None = None  # its wait for the writer
        self._flush_by = math.inf  # the stop's end of every such wait (`begin_shutdown`)
        self._writer_ended = False
        self.opened = time.monotonic()
        self.frames_in = 0
        self.frames_out = 0
        # Frames the protocol refused and answered with an error alone (no line each): for
        # `connection_closed`. Not in frames_in, which counts the frames handled.
        self.frames_rejected = 0
        self.sends = broker.new_send_limiter()
        self.user_sends = self.sends  # the user's shared bucket, set once authenticated
        self.user_typing = self.sends  # the user's typing bucket, likewise
        self.user_changes = self.sends  # the user's membership-change bucket, likewise
        self.user_reads = self.sends  # the user's read-receipt bucket, likewise

    # -- called from other tasks -------------------------------------------------------------

    def inbox_moved(self, head: int, fresh: Fresh | None = None) -> None:
        """The user's inbox grew to `head`: have it delivered.

        `fresh` is the message that is entry `head`, if it is one. While every entry between the
        device's cursor and its head came this way, and they fit the window's room and
        DELIVER_BYTES, they are delivered from memory without a store read; otherwise the store
        is read.
        """
        if head > self.head:
            queued = self._fresh
            if (fresh is not None and head == self.head + 1
                    and self.sent + len(queued) == self.head
                    and len(queued) < self.window - len(self.unacked)
                    and self._fresh_bytes < DELIVER_BYTES):
                queued.append(fresh)
                self._fresh_bytes += fresh.body_size()
            else:
                queued.clear()
                self._fresh_bytes = 0
            self.head = head
            self._ready()

    def _ready(self) -> None:
        """There is something to write: wake the writer, or (during a commit's fan-out) let the
        broker write it at the end of the fan-out, with no task switch (`flush_now`)."""
        if self.broker.deferring:
            if not self._deferred:
                self._deferred = True
                self.broker.deferred.append(self)
        else:
            self._wake.set()

    def flush_now(self) -> None:
        """Write what is ready straight to the socket if the writer is idle; else wake it.

        This is the fan-out fast path: a channel post to 1,000 devices costs 1,000 short
        non-blocking writes instead of 1,000 task switches. Whatever the socket does not take
        at once goes back to the front of the queue for the writer, so nothing is reordered.
        """
        self._deferred = False
        if self._writing or self._closing or self._fd is None:
            self._wake.set()
            return
        queued = len(self.out)  # the replies and pushes; `_collect` adds deliveries after them
        # Deliveries from commits' own copies only: a read of the inbox is the writer's, in
        # its turn among the others' (`_write`). Read here, it was made for every session
        # behind that a commit touched, one after the other inside the commit's fan-out: a
        # notice into a channel of 1,000 devices catching up after a restart held the event
        # loop about a second (docs/OPERATIONS.md, "A restart with thousands of devices").
        chunks = self._collect(from_store=False)
        if self.sent < self.head and len(self.unacked) < self.window:
            # One read gives at most INBOX_READ_BATCH entries, and the device's own sends take
            # no window room: the window has room for more, so the writer goes on reading.
            self._wake.set()
        if not chunks:
            return
        data = b"".join(chunks)
        try:
            written = os.write(self._fd, data)
        except BlockingIOError:
            written = 0
        except OSError:  # the writer meets the same error and ends the session properly
            written = 0
        self.writing_frames = self.writing_bytes = 0  # written, or back in `out`
        self._drained.set()
        if written < len(data):
            self.out.appendleft(data[written:])
            # Deliveries do not count, here or against MAX_QUEUED_BYTES: the window bounds
            # them, and they do not count when the writer writes them either. Counted, a
            # fan-out of big messages to a device on a slow link stopped its reader (its acks
            # unread) until the socket took them all, and closed it as a slow consumer after
            # --idle-timeout however steadily it read (until 2026-12-06).
            ends = list(itertools.accumulate(map(len, chunks[:queued])))
            self.out_bytes += max(0, (ends[-1] if ends else 0) - written)
            unwritten = sum(1 for end in ends if end > written)
            if unwritten > self.broker.config.max_pending_pushes:
                self.slow_consumer()  # its socket would not take the burst: it is not reading
                return
            self._wake.set()

    def push_nowait(self, data: bytes) -> None:
        """Queue an encoded push frame; close the session as a slow consumer if it overflows.

        During a commit's fan-out nothing is written until its end, so a burst (the receipts
        of hundreds of members reading one post in the same commit) may pass the limit there.
        On a plain TCP session whose writer is idle, it is checked after the fan-out's own
        write (`flush_now`), against what the socket did not take; a burst is at most a few
        frames per command of the batch. A writer already blocked on the socket (the client
        is not reading) or a TLS session (nothing is written before the writer runs) is
        checked at once, as outside a fan-out."""
        if self._closing:
            return
        if len(self.out) >= self.broker.config.max_pending_pushes and (
                not self.broker.deferring or self._writing or self._fd is None):
            self.slow_consumer()
            return
        self.out.append(data)
        self.out_bytes += len(data)
        self._ready()

    def slow_consumer(self) -> None:
        """It does not read what it is sent fast enough: say `slow_consumer` after what is
        queued and end the session; the writer gets FLUSH_ON_CLOSE_S to get it all out, so a
        client that reads slowly learns why, and one that does not read at all is cut off then.
        Nothing is lost: its deliveries wait on disk past its last ack."""
        self.log.warning("slow_consumer_closed", queued=len(self.out), queued_bytes=self.out_bytes)
        self._end(CloseReason.SLOW_CONSUMER, wire.ErrorCode.SLOW_CONSUMER,
                  f"{len(self.out)} frames ({self.out_bytes} bytes) were waiting for this "
                  f"connection to read them")

    def reply(self, frame: object) -> None:
        """Queue a reply frame for the writer.

        A reply above the agreed max_frame (the member list of a huge conversation, for a
        device that asked for small frames) is answered with `limit_exceeded` instead, and the
        connection stays open: every request gets exactly one reply (PROTOCOL.md §5.1).
        """
        if self._closing:
            return
        try:
            data = self.conn.send(frame)
        except wire.LocalProtocolError as exc:
            request_id = getattr(frame, "id", None)
            if exc.code is not wire.ErrorCode.TOO_LARGE or request_id is None:
                raise
            self.log.warning("reply_too_large", frame=type(frame).TYPE,
                             max_frame=self.conn.max_frame_bytes)
            data = self.conn.send(wire.error_frame(
                wire.ErrorCode.LIMIT_EXCEEDED, self._unfit_reply(type(frame).TYPE), request_id,
                close=False))
        self.out.append(data)
        self.out_bytes += len(data)
        self._ready()

    def _unfit_reply(self, frame: str) -> str:
        """Why a reply did not fit, and which limit to raise: the broker's --max-frame-bytes,
        or the smaller max_frame the client asked for in its hello."""
        agreed, ours = self.conn.max_frame_bytes, self.broker.config.max_frame_bytes
        if agreed >= ours:
            limit = "the broker's --max-frame-bytes, which its operator may raise"
        else:
            # A hello's offer below the protocol's 1024 is raised to it (PROTOCOL.md §3.2).
            limit = (f"the client asked for no more in its hello, the broker's "
                     f"--max-frame-bytes is {ours}: ask for more")
        return (f"the {frame} reply does not fit this connection's max_frame of {agreed} bytes "
                f"({limit}; docs/OPERATIONS.md, \"Limits\")")

    def reply_error(self, request_id: int | None, code: wire.ErrorCode, message: str, *,
                    retry_ms: int | None = None) -> None:
        """Queue an error reply that leaves the connection open."""
        # Counted for `broker_stats`, and logged now and then (clients held at a limit meet
        # it at every request): the first refusal, then at most one line per 10 s.
        if code == wire.ErrorCode.RATE_LIMITED and (
                refused := self.broker.rate_limits.count(time.monotonic())) is not None:
            self.log.warning("rate_limited", message=message, retry_ms=retry_ms,
                             refused=refused)
        self.reply(wire.error_frame(code, message, request_id, close=False, retry_ms=retry_ms))

    def close(self, reason: CloseReason, frame: object | None = None) -> None:
        """Say `frame` (an error or bye) if given, flush, and end the session."""
        if self._closing:
            return
        if frame is not None:
            try:
                data = self.conn.send(frame)
            except wire.ProtocolError:
                pass
            else:
                self.out.append(data)
                self.out_bytes += len(data)
        self.reason = self.reason or reason
        self._closing = True
        self._end_pause()
        self._end_drain_wait()
        self._wake.set()

    def abort(self, reason: CloseReason) -> None:
        """End the session now, without flushing."""
        self.reason = self.reason or reason
        self._closing = True
        self._end_pause()
        self._end_drain_wait()
        if self._scope is not None:
            self._scope.cancel()

    def _end_pause(self) -> None:
        """Cut short the reader's hold (`pause`, `wait_inflight`), if it is in one."""
        if self._pause_scope is not None:
            self._pause_scope.cancel()

    def _end_drain_wait(self) -> None:
        """Cut short the reader's wait for the writer (`_wait_drained`), if it is in one."""
        if self._drain_scope is not None:
            self._drain_scope.cancel()

    @property
    def closing(self) -> bool:
        """Whether the session is ending: nothing more is answered on it."""
        return self._closing

    def ended(self) -> None:
        """The stream is about to be closed: nothing may be written to it any more."""
        self._closing = True
        self._fd = None

    # -- acks ------------------------------------------------------------------------------

    def on_ack(self, upto: int) -> bool:
        """Apply a cumulative ack; False if it acks past the end of the user's inbox.

        An ack beyond what this session sent is allowed (a client re-acking, after a reconnect,
        what it had from an earlier session): the cursor skips ahead. It only affects this device.
        """
        if upto <= self.acked:
            committer = self.broker.committer
            if self.acked and committer.ack_lost(self.user, self.device):
                # The ack that moved the cursor failed with its batch (a full disk): this one,
                # a retry maybe, submits the cursor again (the rules read its conversations),
                # so that its `ok` waits for it to be durable.
                committer.ack_nowait(Ack(self.user, self.device, self.role, self.acked, None))
            return True
        if upto > self.head:
            return False
        self.acked = upto
        # Every entry this ack covers was delivered in this session (unless it acks past what
        # we sent): then we know their conversations, and the rules need not read the inbox.
        known = upto <= self.sent
        if not known:
            self.sent = upto
        convs: dict[str, int] = {}
        unacked = self.unacked
        while unacked and unacked[0][0] <= upto:
            _, conv, seq = unacked.popleft()
            if seq > convs.get(conv, 0):
                convs[conv] = seq
        self.broker.committer.ack_nowait(Ack(self.user, self.device, self.role, upto,
                                             tuple(convs.items()) if known else None))
        # The device's own sends passed over while this delivery was due (a bot's answer to
        # it, from a requests-only session of the device) lie right past it: pass them now.
        # Left, they stayed past the durable cursor, read again by the next session.
        if not unacked and self.sent > upto:
            self._ack_own_sends()
        if self.sent < self.head:  # the window opened on entries waiting: the writer has work
            self._wake.set()
        return True

    # -- the two tasks ---------------------------------------------------------------------

    async def run_open(self) -> None:
        """Run reader and writer until either ends the session."""
        self._last_frame = time.monotonic()  # hello
        # The welcome now, not at the writer's first turn: behind thousands of sessions
        # catching up a turn is long, and a monitor's check takes few (`stats.answer_stats`).
        self.flush_now()
        async with trio.open_nursery() as nursery:
            self._scope = nursery.cancel_scope
            nursery.start_soon(self._writer)
            with trio.CancelScope() as self._reader_scope:
                await self._reader()
            if self.broker.stopping and not self._closing:
                # Shutdown: answer every command already submitted (each durable), then bye.
                with trio.move_on_after(self.broker.config.shutdown_grace_s / 2):
                    while self.inflight > 0:
                        self.inflight_free = trio.Event()
                        await self.inflight_free.wait()
                if self.inflight > 0:  # what repeats a durable send has its answer already
                    answer_known_repeats(self)
                self.close(CloseReason.SHUTDOWN, wire.error_frame(
                    wire.ErrorCode.SHUTTING_DOWN, "the broker is stopping; reconnect later",
                    close=True))
            # Reader ended: flush what is queued (bounded), then stop the writer.
            self.close(self.reason or CloseReason.PEER_EOF)
            nursery.cancel_scope.deadline = trio.current_time() + FLUSH_ON_CLOSE_S

    def begin_shutdown(self) -> None:
        """Stop reading new frames; `run_open` then drains and says bye."""
        if self._reader_scope is not None:
            self._reader_scope.cancel()
        self._end_pause()
        # The writer has that long to make room, for every wait of the reader from now on
        # together, not each (a client reading slowly held the stop to --shutdown-grace).
        self._flush_by = min(self._flush_by, trio.current_time() + FLUSH_ON_CLOSE_S)
        if self._drain_scope is not None:
            self._drain_scope.deadline = min(self._drain_scope.deadline, self._flush_by)

    async def pause(self, seconds: float) -> None:
        """Hold the reader `seconds` before it hands on the next frame (a `read` past the
        user's --read-rate). Not a cancellation point: a stop, or the session's end, cuts the
        pause short instead, so that the frames already read behind the refused one are still
        answered before `shutting_down` (PROTOCOL.md §6); until 2026-12-06 a stop during the
        pause left them unanswered (163 of 200 pipelined requests, pings included)."""
        with self._holding() as held:
            if held:
                await trio.sleep(seconds)

    @contextlib.contextmanager
    def _holding(self) -> Iterator[bool]:
        """The reader's hold (`pause`, `wait_inflight`): shielded from the stop's cancel of
        the reader, which cuts it short instead (`_end_pause`), as the session's end does.
        Yields False, for no hold at all, once either came."""
        reader = self._reader_scope
        if self._closing or reader is None or reader.cancel_called:
            yield False
            return
        try:
            with trio.CancelScope(shield=True) as self._pause_scope:
                yield True
        finally:
            self._pause_scope = None

    def idle_for(self, now: float) -> float:
        """How long the reader has been waiting for bytes at `now` (0 if it is not waiting)."""
        since = self.waiting_since
        return 0.0 if since is None else now - since

    def time_out(self, idle_s: float) -> None:
        """Nothing arrived for `idle_s` seconds: say `timeout` and end the session."""
        self._end(CloseReason.TIMEOUT, wire.ErrorCode.TIMEOUT, f"no frame for {idle_s:g} s")

    def token_revoked(self) -> None:
        """An admin revoked the token it authenticated with: say `unauthorized` and end the
        session, as hello with that token would be answered now."""
        self._end(CloseReason.REVOKED, wire.ErrorCode.UNAUTHORIZED, "token revoked")

    def key_retired(self) -> None:
        """The key its token was signed with was retired (`homing secret retire`): say
        `unauthorized` and end the session, as hello with that token would be answered now."""
        self._end(CloseReason.REVOKED, wire.ErrorCode.UNAUTHORIZED,
                  tokens.retired_message(self.key_id))

    def token_expired(self) -> None:
        """The token it authenticated with expired: say `unauthorized` and end the session, as
        hello with that token would be answered now."""
        self._end(CloseReason.AUTH_FAILED, wire.ErrorCode.UNAUTHORIZED,
                  tokens.expired_message(self.expires))

    def _end(self, reason: CloseReason, code: wire.ErrorCode, message: str) -> None:
        """Say a closing `error`, after what is queued, and stop reading: `run_open` then gives
        the writer FLUSH_ON_CLOSE_S to get it out."""
        self.close(reason, wire.error_frame(code, message, close=True))
        self.begin_shutdown()

    async def receive_once(self) -> bytes | None:
        """One read (up to RECV_BYTES) of a plain TCP peer, once it has sent something: None
        at its EOF, on a failed read, or on TLS (no read is made)."""
        if self._fd is None or self.tls_unchecked:
            return None
        try:
            return await self._receive_raw(RECV_BYTES) or None
        except trio.BrokenResourceError:
            return None

    def peer_hung_up(self) -> bool:
        """Whether a plain TCP peer closed its end already (an EOF or a reset waiting to be
        read, looked at without taking any byte); False on TLS or while it is open."""
        return self._fd is not None and _peek(self._fd) == b""

    def unread(self) -> bool:
        """Whether anything the peer sent (a byte, its EOF, a reset) waits unread in the
        connection's socket, on TLS too (before it is decrypted), looked at without taking it:
        a connection whose hello waits there has not been silent (broker/awaiting.py)."""
        transport = getattr(self.stream, "transport_stream", self.stream)
        sock = getattr(transport, "socket", None)
        fd = sock.fileno() if sock is not None and not self._closing else -1
        return fd >= 0 and _peek(fd) is not None

    async def _receive_raw(self, size: int) -> bytes:
        """`receive_some` for a plain TCP session, straight on its socket: wait until it is
        readable, then one read. trio's own (a read that fails, the wait, the read again, then
        a checkpoint) held 22 % of the broker's py-spy samples at 5,000 messages/s, where most
        reads find one frame. The wait is the checkpoint. Raises as `receive_some` does."""
        fd = self._fd
        while True:
            await trio.lowlevel.wait_readable(fd)
            try:
                return os.read(fd, size)
            except BlockingIOError:
                continue  # readable went away (another wake-up): wait again
            except OSError as exc:  # reset by the peer, and the like
                raise trio.BrokenResourceError(str(exc)) from exc

    async def _reader(self) -> None:
        conn = self.conn
        receive = self.stream.receive_some if self._fd is None else self._receive_raw
        # Frames that came in the same read as hello are in the buffer already: them first.
        if not await self._handle_frames():
            return
        while not self._closing:
            # No cancel scope per read for the idle timeout: entering and leaving one held a
            # quarter of the reader's py-spy samples at 1,000 messages/s. The broker's idle
            # watch looks at `waiting_since` instead, and cancels the reader (`time_out`).
            self.waiting_since = self._last_frame
            try:
                data = await receive(RECV_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.reason = self.reason or CloseReason.BROKEN
                return
            finally:
                self.waiting_since = None
            self._unframed += len(data)
            conn.receive_data(data)
            if not await self._handle_frames():
                return
            if not data:
                self.reason = self.reason or CloseReason.PEER_EOF
                return

    async def _handle_frames(self) -> bool:
        """Hand every whole frame in the buffer to its handler; False if the session ends."""
        handlers = self.handlers
        conn = self.conn
        frames = self.frames_in
        turn_ends = time.monotonic() + FAIR_SLICE_S
        while not self._closing:
            # A client that sends but does not read waits, for --idle-timeout at most; checked
            # before every frame, so error replies to frames it should not send count too.
            if self._queue_full() and not await self._wait_drained():
                return False
            try:
                event = conn.next_event()
            except wire.RemoteProtocolError as exc:
                if exc.fatal:
                    self.log.info("frame_rejected", code=exc.code.wire_name,
                                  reason=exc.message, fatal=True)
                    self.close(CloseReason.PROTOCOL_ERROR, wire.error_frame(
                        exc.code, exc.message, exc.request_id, close=True))
                    return False
                self.frames_rejected += 1
                self.reply_error(exc.request_id, exc.code, exc.message)
                continue
            if event is wire.NEED_DATA:
                if self.frames_in != frames or self._unframed >= FRAME_PROGRESS_BYTES:
                    self._last_frame = time.monotonic()
                    self._unframed = 0
                return True
            if event is wire.CLOSED:
                self.reason = self.reason or CloseReason.PEER_EOF
                return False
            self.frames_in += 1
            handler = handlers.get(type(event))
            if handler is None:
                self.reply_error(getattr(event, "id", None), wire.ErrorCode.INVALID,
                                 f"{type(event).TYPE} is not accepted from a client")
                continue
            try:
                result = handler(self, event)
            except StorageError as exc:  # a store read failed: this request only
                self._read_failed(event, exc)
                continue
            if result is not None:
                await result
            if time.monotonic() >= turn_ends:
                # Let the other connections run; not a cancellation point, so that a shutdown
                # still answers every frame already read (PROTOCOL.md §6).
                await trio.lowlevel.cancel_shielded_checkpoint()
                turn_ends = time.monotonic() + FAIR_SLICE_S
        return True

    def _read_failed(self, frame: object, exc: StorageError) -> None:
        """Answer a request whose store read failed (`unavailable`: the reader table full of
        other processes' readers, a damaged page); the session and the broker go on."""
        code, message = wire_error(exc)
        if code is wire.ErrorCode.UNAVAILABLE:
            self.log.error("request_failed", frame=type(frame).TYPE, reason=str(exc))
        request_id = getattr(frame, "id", None)
        if request_id is None:
            # A notice with no id (`typing`, ephemeral): dropped without a word, as when it
            # cannot go out for any other reason; an `unavailable` without an id would look
            # like the closing one of the deliveries (PROTOCOL.md §7), and it asked nothing.
            return
        self.reply_error(request_id, code, message)

    def _queue_full(self) -> bool:
        """Whether the replies and pushes queued or being written reach MAX_QUEUED_FRAMES or
        MAX_QUEUED_BYTES."""
        return (len(self.out) + self.writing_frames >= MAX_QUEUED_FRAMES
                or self.out_bytes + self.writing_bytes >= MAX_QUEUED_BYTES)

    async def _wait_drained(self) -> bool:
        """Wait until the writer flushed the queue below MAX_QUEUED_FRAMES and MAX_QUEUED_BYTES;
        False (and the session ends as a slow consumer) if that takes over --idle-timeout.

        Not a cancellation point: a stop, which cancels the reader, lets the writer go on
        flushing, for FLUSH_ON_CLOSE_S from the stop at most (all its waits together), and the
        frames already read are answered once it did (PROTOCOL.md §6); the session's end, or
        the writer's, cuts the wait short.
        Until 2026-12-06 the stop cancelled it, and every frame read past 1,024 replies
        queued was left unanswered (1,024 of 3,000 pings read behind --max-inflight-requests)."""
        if self._writer_ended:
            return False  # nobody to flush the queue: nothing more can be answered
        deadline = trio.current_time() + self.broker.config.idle_timeout_s
        if self._stopped_reading():
            deadline = min(deadline, self._flush_by)
        try:
            with trio.CancelScope(shield=True, deadline=deadline) as self._drain_scope:
                while self._queue_full() and not self._closing:
                    self._drained = trio.Event()
                    self._wake.set()
                    await self._drained.wait()
        finally:
            self._drain_scope = None
        if self._closing:
            return True  # the reader's loop ends: nothing more is answered
        if not self._queue_full():
            self._last_frame = time.monotonic()  # we, not the client, held up its frames
            return True
        if not self._writer_ended and not self._stopped_reading():
            self.slow_consumer()  # else a stop, which closes it, or the writer gone
        return False

    def _stopped_reading(self) -> bool:
        """Whether a stop cancelled the reader (`begin_shutdown`)."""
        return self._reader_scope is not None and self._reader_scope.cancel_called

    async def wait_inflight(self) -> None:
        """Hold the reader while this connection has --max-inflight-requests awaiting commit.

        Not a cancellation point, as `pause` is not: a stop, or the session's end, cuts the
        wait short. After a stop cut it short with the connection still at the limit, the
        frames already read behind are handled all the same (PROTOCOL.md §6): queries and
        pings answered, each request that would await a commit left unanswered, nothing done
        (`pass_over`). Until 2026-12-06 the stop cancelled the wait and left every frame read
        behind unanswered, pings included."""
        limit = self.broker.config.max_inflight_requests
        with self._holding() as held:
            while held and self.inflight >= limit:
                self.inflight_free = trio.Event()
                await self.inflight_free.wait()
        self.passing_over = self.passing_over or (self.inflight >= limit and not self._closing)

    def pass_over(self) -> None:
        """Leave unanswered a request read once `passing_over` that would await a commit:
        nothing is done, as for a request a stop could not answer in time (PROTOCOL.md §6),
        and a client sends it again after the reconnect. Every such request read after the
        first passed over is too, though the limit had room again, so that none done follows
        one left. Not answered `shutting_down` with its id (as for a few hours of 2026-12-06):
        the SDK raises that answer as the request's error, where it sends an unanswered
        request again (the CLI exits 3)."""
        self.passed_over += 1

    def request_done(self) -> None:
        """One request awaiting commit has its answer."""
        self.inflight -= 1
        self.inflight_free.set()

    def _reads_store(self) -> bool:
        """Whether the next `_collect` reads deliveries from the store (the window has room
        and the entries up to the head are not all queued from their commits)."""
        fresh = self._fresh
        return (self.sent < self.head and len(self.unacked) < self.window
                and not self._closing and not (fresh and self.sent + len(fresh) == self.head))

    def _collect(self, from_store: bool = True) -> list[bytes]:
        """Take the queued frames, then deliveries from the inbox as the window allows (with
        `from_store` false, only those queued from their commits)."""
        chunks: list[bytes] = []
        self._take_out(chunks)
        room = self.window - len(self.unacked)
        if (room > 0 and self.sent < self.head and not self._closing
                and (from_store or not self._reads_store())):
            try:
                self._deliver(chunks, room)
            except wire.LocalProtocolError as exc:
                self._too_large(exc)
                self._take_out(chunks)
            except StorageError as exc:
                self._inbox_unreadable(exc)
                # Its closing `unavailable` goes out with this batch: a writer that found
                # nothing else to write ended the session without it (until 2026-12-05).
                self._take_out(chunks)
        self.frames_out += len(chunks)
        return chunks

    def _take_out(self, chunks: list[bytes]) -> None:
        """Move the queued replies and pushes to `chunks`, to be written."""
        out = self.out
        if out:
            chunks.extend(out)
            self.writing_frames += len(out)  # until written (`_writer`, `flush_now`)
            self.writing_bytes += self.out_bytes
            out.clear()
            self.out_bytes = 0

    def _too_large(self, exc: wire.LocalProtocolError) -> None:
        """A delivery could not be encoded. Its message passed the broker's limits when it was
        sent, so the frame is above the max_frame this device asked for in its hello: close the
        session with `too_large`. Nothing is lost: the entry waits past the device's ack."""
        self.log.warning("delivery_too_large", max_frame=self.conn.max_frame_bytes,
                         after=self.acked, error=str(exc))
        self.close(CloseReason.TOO_LARGE, wire.error_frame(
            wire.ErrorCode.TOO_LARGE,
            f"a delivery does not fit this connection's max_frame of "
            f"{self.conn.max_frame_bytes} bytes; reconnect with a larger max_frame to receive it",
            close=True))

    def _inbox_unreadable(self, exc: StorageError) -> None:
        """The inbox read failed (the reader table full of other processes' readers, a damaged
        page): close the session with `unavailable`. Nothing is lost: the client reconnects and
        is delivered again from its last ack."""
        self.log.error("delivery_read_failed", after=self.sent, reason=str(exc))
        self.close(CloseReason.STORAGE, wire.error_frame(
            *wire_error(exc), close=True))

    def _deliver(self, chunks: list[bytes], room: int) -> None:
        user, device = self.user, self.device
        # Never past the head we were told of: entries committed a moment ago may be readable
        # before the hub announced them, and acks are checked against head.
        before = self.sent
        fresh = self._fresh
        if fresh:
            if before + len(fresh) == self.head:
                self._deliver_fresh(chunks, room)
                return
            fresh.clear()
            self._fresh_bytes = 0
        # At most DELIVER_BYTES of bodies a read: the rest waits on disk, not in this write.
        items, last = self.broker.store.deliverable(
            user, before, min(room, INBOX_READ_BATCH, self.head - before), self.own_lsns,
            DELIVER_BYTES)
        skipped = len(items) < last - before  # own sends passed over in the store
        self.sent = last
        encode, deliver, unacked = self.conn.send, wire.Deliver, self.unacked
        for it in items:
            if it.kind == "msg" and it.sender == user and it.device == device:
                skipped = True  # the device that sent it has it already
                continue
            unacked.append((it.inbox_seq, it.conv, it.seq if it.kind == "msg" else 0))
            chunks.append(encode(deliver(  # a membership entry's seq is 0 (PROTOCOL §5.3)
                inbox_seq=it.inbox_seq, kind=it.kind, conv=it.conv,
                seq=it.seq if it.kind == "msg" else 0,
                sender=it.sender, body=it.body, cid=it.cid, ts=it.ts_us, muted=it.muted)))
        if skipped:
            self._ack_own_sends()
        if last == before:  # nothing readable past the cursor: never spin
            self.head = before

    def _deliver_fresh(self, chunks: list[bytes], room: int) -> None:
        """Deliver up to `room` of the queued entries from their commits' own copies, and
        DELIVER_BYTES of them (at least one)."""
        fresh = self._fresh
        user, device, unacked, own = self.user, self.device, self.unacked, False
        inbox_seq = self.sent
        room_bytes = DELIVER_BYTES
        taken = 0
        for f in fresh:
            if taken == room or room_bytes <= 0:
                break
            taken += 1
            inbox_seq += 1
            self._fresh_bytes -= f.body_size()
            if f.sender == user and f.device == device:
                self.own_lsns.discard(f.lsn)  # its own send: passed over
                own = True
                continue
            muted = self._muted.get(f.conv)
            if muted is None:
                muted = self.broker.store.muted(user, f.conv)
                self.learn_muted(f.conv, muted)
            data = f.deliver_bytes(self.conn, inbox_seq, muted)
            room_bytes -= len(data)
            chunks.append(data)
            unacked.append((inbox_seq, f.conv, f.seq))
        del fresh[:taken]
        self.sent = inbox_seq
        if own:
            self._ack_own_sends()

    def _ack_own_sends(self) -> None:
        """If everything delivered is acked and only this device's own sends lie past the ack,
        ack them on its behalf, so its cursor (and a reconnect's starting point) moves on.

        The cursor moves now; the durable ack follows with the broker's next round of them
        (`Broker.own_acks`, every OWN_ACK_DELAY_S) or when the session ends, so a device that
        sends in every commit adds one ack event per round, not one per commit. An ack lost
        in a crash costs only passing over those entries again.
        """
        if not self.unacked and self.sent > self.acked:
            self.acked = self.sent
            self.broker.own_acks[self] = None

    def flush_own_ack(self) -> None:
        """Submit the durable ack of this device's cursor (after `_ack_own_sends`). If a
        delivery ack moved the cursor since, this one is stale and the rules skip it."""
        self.broker.committer.ack_nowait(Ack(self.user, self.device, self.role, self.acked, ()))

    def flush_due_own_ack(self) -> None:
        """Submit now the ack of own sends this device has waiting for the broker's next round
        of them, if any (it is taken out of that round): as the session ends, or before a
        revocation of its token is queued, so that it is logged ahead of it."""
        if self.broker.own_acks.pop(self, False) is None:
            self.flush_own_ack()

    def knows_muted(self, conv: str) -> bool:
        """Whether the user's mute of `conv` is cached."""
        return conv in self._muted

    def learn_muted(self, conv: str, muted: bool) -> None:
        """Cache whether the user muted `conv`, as just read from the store (at most
        MUTED_CACHE_MAX conversations: past it the cache is emptied)."""
        cache = self._muted
        if len(cache) >= MUTED_CACHE_MAX and conv not in cache:
            cache.clear()
        cache[conv] = muted

    def mute_changed(self, conv: str) -> None:
        """The user muted or unmuted `conv`: forget the cached state."""
        self._muted.pop(conv, None)

    async def _writer(self) -> None:
        try:
            await self._write()
        finally:  # cancelled (--shutdown-grace run out) or done: the reader waits no more
            self._writer_ended = True
            self._end_drain_wait()

    async def _write(self) -> None:
        while True:
            if self._reads_store():
                # In its turn among the others reading theirs (broker/turns.py); the write
                # below comes after, so a peer that does not read holds up no one else.
                await self.broker.turns.wait_turn()
            chunks = self._collect()
            if chunks:
                if self.unacked and self.log_debug:
                    self.log.debug("delivered", upto=self.sent, unacked=len(self.unacked))
                self._writing = True
                data = b"".join(chunks)
                chunks.clear()  # one copy of the batch while it is written, not two
                try:
                    await self.stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self.reason = self.reason or CloseReason.BROKEN
                    self.abort(self.reason)
                    return
                finally:
                    self._writing = False
                    self.writing_frames = self.writing_bytes = 0
                    self._drained.set()
                del data
                continue
            if self._closing:
                if self._scope is not None:
                    self._scope.cancel()
                return
            if self.sent < self.head and len(self.unacked) < self.window:
                # A read of nothing but its own sends: read on, but let the others run first.
                await trio.lowlevel.checkpoint()
                continue
            await self._wake.wait()
            self._wake = trio.Event()


def _peek(fd: int) -> bytes | None:
    """What waits unread on the socket `fd`, looked at without taking it: its first byte, b""
    for an EOF or a reset, None for nothing."""
    peek = socket.socket(fileno=fd)  # not a copy: let go of it below, never closed
    try:
        return peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return None
    except OSError:  # reset by the peer
        return b""
    finally:
        peek.detach()
