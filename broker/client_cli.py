"""The `homing` commands that talk to a broker (send, listen, group create, ..., presence):
each connects with the SDK (broker/client.py), makes its requests, and prints one JSON object
per line on stdout (docs/CLI.md). Whatever can be checked without the broker is checked before
connecting, so a usage error exits 2 whether a broker is running or not.
"""

from __future__ import annotations

import argparse
import base64
import errno
import math
import os
import random
import select
import ssl
import stat
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import trio

from broker.cli import (
    _COUNT,
    _SECONDS,
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    CliError,
    _reader_gone,
    emit,
    warn,
)
from broker.client_errors import UNSURE as SDK_UNSURE
from broker.client_errors import ClientError, StaleDelivery
from broker.config import DEFAULT_HOST, DEFAULT_PORT

T = TypeVar("T")

# A request refused `rate_limited` by a broker that does not say when to ask again (one from
# before 2026-12-06, no `retry_ms`) is sent again after this pause, doubling while refused, up
# to the next; one that says is sent again after the time it says (`_while_rate_limited`).
RATE_LIMITED_PAUSE_S = 0.05
RATE_LIMITED_MAX_PAUSE_S = 1.0


def body_fields(body: str | bytes | None) -> dict[str, Any]:
    """`body` as JSON fields: text as "body", binary as "body_b64"."""
    if isinstance(body, bytes):
        return {"body_b64": base64.b64encode(body).decode("ascii")}
    return {"body": body}


def _tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The TLS context of --tls / --tls-ca; a usage error if the CA file cannot be loaded."""
    if not (args.tls or args.tls_ca):
        return None
    ctx = ssl.create_default_context()
    if args.tls_ca:
        try:
            ctx.load_verify_locations(args.tls_ca)
        except OSError as exc:  # ssl.SSLError is one too
            reason = exc.strerror or str(exc)
            raise CliError(EXIT_USAGE, "usage", f"--tls-ca {args.tls_ca}: {reason}") from None
    return ctx


def connection_args(args: argparse.Namespace) -> ssl.SSLContext | None:
    """Check the token, `--server` and the TLS options every client command takes (a usage
    error, exit 2, before connecting); return the TLS context to connect with, if any."""
    from broker.client import parse_server

    if not args.token:
        raise CliError(EXIT_USAGE, "usage", "a token is needed: --token or HOMING_TOKEN")
    try:
        parse_server(args.server)
    except ValueError as exc:
        raise CliError(EXIT_USAGE, "usage", str(exc)) from None
    return _tls_context(args)


def run_client(args: argparse.Namespace, body, check=None) -> int:
    """Check the arguments, then connect with the common options and run `body(client, args)`.

    Whatever can be checked without the broker (`check(args)` for the command's own) is checked
    before connecting, so a usage error exits 2 whether a broker is running or not. Only
    `listen` and `ack` take the device's delivering session; the other commands open a
    requests-only one (PROTOCOL.md §9), which leaves a `homing listen` of the same user and
    device running (each of them replaced it until 2026-12-05).
    """
    from broker.client import (
        ClientError,
        ConnectionLost,
        InboxReset,
        Replaced,
        open_client,
    )

    tls = connection_args(args)
    if check is not None:
        check(args)

    def unreachable(reason: str) -> None:
        warn("retrying", f"{reason}; trying again for up to {args.connect_timeout:g} s "
                         "(--connect-timeout)")

    def inbox_reset(reset: InboxReset) -> None:
        # Told by the head below what was printed, or by the device's cursor below an ack the
        # broker had answered as on its disk (the head may have caught up with new entries).
        how = (f"from inbox_seq {reset.before} to {reset.head}" if reset.head < reset.before
               else f"to inbox_seq {reset.head}, and this device's cursor below an ack it had on "
                    f"its disk")
        warn("inbox_reset", f"the broker's inbox of this user went back {how} (restored from "
                            f"an older backup?): deliveries start over after {reset.acked}, and "
                            "the inbox_seqs from there name other entries than those printed "
                            "before")

    async def main() -> None:
        async with open_client(args.server, args.token, args.device, tls=tls,
                               reconnect_timeout=args.connect_timeout,
                               on_unreachable=unreachable,
                               on_inbox_reset=inbox_reset,
                               start=getattr(args, "start", "first"),
                               deliver=body in DELIVERING) as client:
            await body(client, args)

    try:
        trio.run(main)
    except ClientError as exc:
        status = EXIT_UNREACHABLE if exc.name in ("shutting_down",) else EXIT_REFUSED
        raise CliError(status, exc.name, _unsure(args, exc.name, exc.message),
                       exc.code) from None
    except Replaced as exc:  # another process connected with this user and --device
        raise CliError(EXIT_REFUSED, "replaced", _unsure(args, "replaced", str(exc))) from None
    except BrokenPipeError:  # stdout's reader went away (`homing history ... | head -1`),
        return _reader_gone()  # not the broker
    except (ConnectionLost, OSError) as exc:
        raise CliError(EXIT_UNREACHABLE, "unreachable",
                       _unsure(args, "unreachable", str(exc))) from None
    return 0


def _result(r: Any) -> dict[str, Any]:
    return {"conv": r.conv, "seq": r.seq, "lsn": r.lsn, "cid": r.cid, "dup": r.dup}


def check_send(args: argparse.Namespace) -> None:
    """`send` takes its text from TEXT or from --stdin: exactly one of them."""
    if args.stdin and args.text is not None:
        raise CliError(EXIT_USAGE, "usage", "send takes TEXT or --stdin, not both")
    if not args.stdin and args.text is None:
        raise CliError(EXIT_USAGE, "usage", "send needs TEXT or --stdin")
    if args.stdin and sys.stdin is None:  # `homing send --stdin <&-`
        raise CliError(EXIT_USAGE, "usage", "--stdin: standard input is closed")
    # Each cid option belongs to one form: the other would be ignored, and a script that meant
    # its sends to be idempotent would get fresh cids (and duplicates when run again).
    if args.stdin and args.cid is not None:
        raise CliError(EXIT_USAGE, "usage", "--cid goes with TEXT; with --stdin use --cid-prefix")
    if not args.stdin and args.cid_prefix is not None:
        raise CliError(EXIT_USAGE, "usage", "--cid-prefix goes with --stdin; with TEXT use --cid")
    _check_not_empty(("--cid", args.cid), ("--cid-prefix", args.cid_prefix))


def _check_not_empty(*options: tuple[str, str | None]) -> None:
    """A usage error for a cid option given empty (`--cid "$ORDER"` with ORDER unset): taken
    for none, it would get a fresh cid, and a duplicate each time the script ran again."""
    for option, value in options:
        if value == "":
            raise CliError(EXIT_USAGE, "usage", f"{option} is empty: give one, or leave "
                           f"{option} out for a fresh one")


def check_create(args: argparse.Namespace) -> None:
    """`group create` and `channel create`: a `--cid` given is not empty."""
    _check_not_empty(("--cid", args.cid))


async def do_send(client, args) -> None:
    if args.stdin:
        await _send_lines(client, args)
        return
    from broker.client import new_cid

    cid = args.cid
    if cid is None:  # made here, as the SDK would, so that a failure can name it
        client._check_body(args.text)  # (the SDK checks a fresh cid's body before sending)
        cid = new_cid()
    args.retry_hint = (f"the message may have been accepted: send it again with --cid {cid} "
                       "(a dup if it was)")
    emit(_result(await _while_rate_limited(
        args, lambda: client.send(args.text, to=args.to, conv=args.conv, cid=cid))))


# Errors after which a send (of --stdin: the lines in flight), or a create, may have been
# carried out: the broker lost or stopping (exit 3), the session replaced, a failure of the
# broker's (a batch that failed after its commit is durable). A refusal (forbidden, invalid,
# conflict, ...) did nothing, and would come again.
UNSURE = SDK_UNSURE | {"unreachable", "replaced"}  # the SDK's, and the command's own names


def _unsure(args: argparse.Namespace, name: str, message: str) -> str:
    """`message`, and how to send again without a duplicate when the command sent something
    whose outcome `name` leaves unknown (`retry_hint`, set by `send` and `create`; by `ack`
    and `listen`, what is left of an ack that may not be durable), for the names of
    `retry_unsure` (UNSURE when the command sets none)."""
    hint = getattr(args, "retry_hint", None)
    if hint is None or name not in getattr(args, "retry_unsure", UNSURE):
        return message
    return f"{message}; {hint}"


async def _send_lines(client, args) -> None:
    """Send each stdin line as one message, pipelined, until every line is accepted.

    The first failure stops the rest and is reported alone (not as an exception group).
    """
    from broker.client import ClientError, new_cid
    from protocol import ErrorCode

    # A fresh prefix sorts with the SDK's time-ordered cids (docs/DESIGN.md, "Projections").
    prefix = args.cid_prefix or new_cid()
    args.retry_hint = (f"lines may have been accepted: run it again on the same input with "
                       f"--cid-prefix {prefix} (no line is appended twice)")
    limit = trio.Semaphore(args.pipeline)
    failures: list[Exception] = []

    async def one(cid: str, text: str, number: int) -> None:
        try:
            emit(_result(await _while_rate_limited(
                args, lambda: client.send(text, to=args.to, conv=args.conv, cid=cid))))
        except ClientError as exc:  # the broker's refusal of this line: say which line
            failures.append(ClientError(exc.code, exc.name,
                                        f"line {number} of stdin: {exc.message}"))
            nursery.cancel_scope.cancel()
        except Exception as exc:
            failures.append(exc)
            nursery.cancel_scope.cancel()
        finally:
            limit.release()

    number = 0
    async with trio.open_nursery() as nursery:
        try:
            async for text in _stdin_lines():
                number += 1
                await limit.acquire()
                nursery.start_soon(one, f"{prefix}-{number}", text, number)
        except UnicodeDecodeError as exc:  # refused as the broker refuses a bad field; the
            invalid = ErrorCode.INVALID  # lines before it are still sent and printed
            failures.append(ClientError(invalid, invalid.wire_name, (
                f"send: line {number + 1} of stdin is not {exc.encoding} text: {exc.reason} "
                f"at byte {exc.start}")))
    if failures:
        raise failures[0]


async def _stdin_lines() -> AsyncIterator[str]:
    """stdin's lines without their line ends, read a chunk at a time in a worker thread.

    A blocking read in the event loop would hold back everything else while a slow pipe
    (`tail -f events | homing send --stdin`) waits for its next line: the results of the lines
    already sent, and the heartbeats that keep the connection open. The read is abandoned when
    the command stops meanwhile (a refusal, the broker lost for good, Ctrl-C): it must not
    wait for a line that may never come. So it reads the file descriptor itself: an abandoned
    read of sys.stdin's buffer would hold that buffer's lock, and the interpreter aborts when
    it cannot take the lock at exit.
    """
    fd = sys.stdin.fileno()
    # Strictly, whatever sys.stdin's own handler: in the C and C.UTF-8 locales Python reads
    # stdin with surrogateescape, which turns a line that is not text into one with lone
    # surrogates, refused later without naming its line (the broker can never take it).
    encoding, errors = sys.stdin.encoding, "strict"
    rest = b""
    while chunk := await trio.to_thread.run_sync(os.read, fd, 65536, abandon_on_cancel=True):
        *lines, rest = (rest + chunk).split(b"\n")
        for line in lines:
            yield line.removesuffix(b"\r").decode(encoding, errors)
    if rest:
        yield rest.removesuffix(b"\r").decode(encoding, errors)


async def _while_rate_limited(args: argparse.Namespace, request: Callable[[], Awaitable[T]],
                              again: bool = True) -> T:
    """`await request()`, made again while the broker answers rate_limited (its send, change
    and read rates), which did nothing: only for a request that is safe to make twice (a send
    with its cid, a read receipt, a change that finds itself done); with `again` false, once
    (a `leave`: a second is refused `forbidden`, so one that the SDK's try before a reconnect
    carried out would be told refused). Each time after the pause the broker says
    (`retry_after`, up to a quarter more, so that requests refused together spread out), or,
    from a broker that does not say (before 2026-12-06), a pause that grows.

    Bounded by --connect-timeout, as an outage is: the rate_limited error is raised once the
    next try would come later than that after the first, or after the last request of the
    command the broker accepted since (`args.accepted_at`: with --stdin, any line's), so a
    rate that lets something of the command through keeps it going, and one that lets nothing
    through for that long ends it."""
    from broker.client import ClientError

    if not again:
        return await request()
    pause, first = RATE_LIMITED_PAUSE_S, trio.current_time()
    while True:
        try:
            answer = await request()
        except ClientError as exc:
            if exc.name != "rate_limited":
                raise
            if exc.retry_after is not None:
                wait = exc.retry_after * (1 + 0.25 * random.random())
            else:
                wait, pause = pause * (0.5 + random.random()), min(pause * 2,
                                                                    RATE_LIMITED_MAX_PAUSE_S)
            since = max(first, getattr(args, "accepted_at", first))
            quiet = trio.current_time() + wait - since
            if quiet > args.connect_timeout:
                raise ClientError(exc.code, exc.name, (
                    f"{exc.message} (not sent again: the next try, in {wait:.3g} s, would come "
                    f"after {quiet:.3g} s with nothing accepted, past "
                    f"--connect-timeout {args.connect_timeout:g})"),
                    retry_after=exc.retry_after) from None
            await trio.sleep(wait)
            continue
        args.accepted_at = trio.current_time()
        return answer


def check_listen(args: argparse.Namespace) -> None:
    """`listen` needs a stdout: it acks each delivery once printed, and would ack unread ones."""
    if sys.stdout is None:  # `homing listen >&-`
        raise CliError(EXIT_USAGE, "usage", "standard output is closed: listen acks each "
                                            "delivery once it is printed, and there is nowhere "
                                            "to print it")


async def do_listen(client, args) -> None:
    """Print each delivery, then ack it; stop after --count, after --timeout with nothing
    arriving, or once stdout's reader went away (BrokenPipeError, as a write raises)."""
    waiting = trio.CancelScope()  # the wait for the next delivery: cut short if the reader goes
    reader_gone = trio.Event()
    failures: list[Exception] = []

    async def watch_reader() -> None:
        await _wait_reader_gone()
        reader_gone.set()
        waiting.cancel()  # not an ack under way: the line printed before it was read

    async def durable_ack(upto: int) -> None:
        try:
            await client.ack(upto, durable=True)
        except StaleDelivery:  # the inbox went back since (warned): nothing of it to keep
            pass

    async def print_deliveries() -> None:
        nonlocal waiting
        count = last = 0
        deliveries = client.deliveries()
        d: Any = None  # a delivery already waiting, taken when the last one was acked
        while not reader_gone.is_set() and (args.count is None or count < args.count):
            if d is None:
                with trio.move_on_after(math.inf if args.timeout is None
                                        else args.timeout) as waiting:
                    d = await deliveries.receive()
                if waiting.cancelled_caught:
                    break
            out = {"inbox_seq": d.inbox_seq, "conv": d.conv, "seq": d.seq, "from": d.sender,
                   **body_fields(d.body), "cid": d.cid, "ts": d.ts}
            if d.kind != "msg":
                out["kind"] = d.kind
            if d.muted:
                out["muted"] = True
            emit(out)
            count += 1
            printed, d = d, None
            if not args.no_ack:
                await client.ack(printed.inbox_seq)
                last = printed.inbox_seq
                args.retry_hint = ("the ack of what was printed may not be on the broker's "
                                   "disk: those deliveries may come again")
                if args.count is None or count < args.count:
                    try:
                        d = deliveries.receive_nowait()
                    except trio.WouldBlock:
                        # Nothing else waiting: the ack made durable, the mark by which the
                        # SDK tells a broker restored from an older backup (CLI.md, Messages).
                        # One refused (a full disk: unavailable) leaves the plain ack made:
                        # the listening goes on, as it did before these acks; the last one
                        # reports.
                        try:
                            await durable_ack(last)
                        except ClientError:
                            pass
        if last:  # what was printed stays acked across a crash of the broker once we end
            await durable_ack(last)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_reader)
        try:
            await print_deliveries()
        except Exception as exc:  # raised alone, not in a group: run_client tells them apart
            failures.append(exc)
        nursery.cancel_scope.cancel()
    if failures:
        raise failures[0]
    if reader_gone.is_set():
        raise BrokenPipeError(errno.EPIPE, "stdout's reader went away")


async def _wait_reader_gone() -> None:
    """Return once stdout is a pipe whose reader went away (`homing listen | head -1`); never
    for any other stdout. A write would find that out, but `listen` writes only when a
    delivery comes, and may wait for one for ever, holding the user's session meanwhile.

    The write end of a pipe is never readable; poll reports an error on it once the read end
    is closed (Linux; coreutils `tail -f` watches its output so), which wakes a reader."""
    try:
        fd = sys.stdout.fileno()
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            await trio.lowlevel.wait_readable(fd)
            poll = select.poll()
            poll.register(fd, select.POLLOUT)
            if any(events & select.POLLERR for _, events in poll.poll(0)):
                return
    except (AttributeError, ValueError, OSError):  # no stdout, or one poll cannot watch
        pass
    await trio.sleep_forever()  # a FIFO opened to read as well, say: leave it to the write


async def do_create(client, args) -> None:
    from broker.client import ClientError, ConnectionLost

    members = [m for m in (args.members or "").split(",") if m]
    try:
        # Made again with a fresh cid (without --cid): a create refused rate_limited made
        # nothing with its cid, and none with it is on its way (the broker checks both).
        conv = await _while_rate_limited(args, lambda: client.create(
            args.kind, args.name, members, args.open, cid=args.cid))
    except (ClientError, ConnectionLost) as exc:
        # The SDK names the cid when the create may have been carried out, and the broker
        # honours it (its `create_cid` cap); not made here as `send` makes its own, since a
        # cid of ours is refused by a broker without the cap, where a create without one works.
        if exc.cid is not None:
            args.retry_hint = (f"the {args.kind} may have been created: run the command again "
                               f"with --cid {exc.cid} (it prints that {args.kind} if it was)")
        raise
    emit({"conv": conv})


async def do_invite(client, args) -> None:
    await _while_rate_limited(args, lambda: client.invite(args.conv, args.user, args.role))
    emit({"conv": args.conv, "user": args.user, "ok": True})


async def do_set_role(client, args) -> None:
    # Stepping yourself down is not made again, as `leave` is not: a second one is refused
    # `forbidden` (no admin any more).
    yourself = args.role == "member" and args.user == getattr(client.welcome, "user", None)
    await _while_rate_limited(args, lambda: client.set_role(args.conv, args.user, args.role),
                              again=not yourself)
    emit({"conv": args.conv, "user": args.user, "role": args.role, "ok": True})


async def do_remove(client, args) -> None:
    await _while_rate_limited(args, lambda: client.remove(args.conv, args.user))
    emit({"conv": args.conv, "user": args.user, "ok": True})


def _simple(method: str, again: bool):
    """`join` and `subscribe`, made again while rate_limited (a second finds itself done), and
    `leave`, not (`_while_rate_limited`)."""
    async def run(client, args) -> None:
        request = getattr(client, method)
        await _while_rate_limited(args, lambda: request(args.conv), again)
        emit({"conv": args.conv, "ok": True})
    return run


async def do_mute(client, args) -> None:
    await _while_rate_limited(args, lambda: client.mute(args.conv, not args.unmute))
    emit({"conv": args.conv, "muted": not args.unmute})


async def do_revoke(client, args) -> None:
    before = await client.revoke_tokens(args.user)
    # A token minted before the clock passes `before` is revoked too: return once it has (a
    # second at most on the broker's own clock, where `homing token` runs).
    await trio.sleep(min(1.0, max(0.0, before - time.time())))
    ahead = before - time.time()
    if ahead > 0:  # a cut-off logged earlier, while a clock ran ahead: say how long it holds
        warn("revoked_ahead", f"tokens of {args.user} issued before "
             f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(before))} ({math.ceil(ahead)} s "
             f"from now by this host's clock) are refused, also those minted until then: an "
             f"earlier revocation holds that cut-off (a clock that ran ahead then, or runs "
             f"behind here)")
    emit({"user": args.user, "before": before})


async def do_read(client, args) -> None:
    await _while_rate_limited(args, lambda: client.read(args.conv, args.upto))
    emit({"conv": args.conv, "read": args.upto})


async def do_receipts(client, args) -> None:
    r = await client.receipts(args.conv, args.seq)
    out = {"conv": r.conv, "seq": r.seq, "delivered": list(r.delivered), "read": list(r.read)}
    if r.unread is not None:  # a broker from before 2026-12-06 does not say
        out["unread"] = list(r.unread)
    emit(out)


async def do_ack(client, args) -> None:
    # Failed, it may be durable or not (the broker's cursor moved): a repeat changes nothing.
    # Not said when `replaced`: a repeat would replace in turn the `listen` of the device.
    args.retry_hint = ("the ack may not be on the broker's disk: run the command again "
                       "(a repeat of an ack changes nothing)")
    args.retry_unsure = UNSURE - {"replaced"}
    await client.ack(args.upto, durable=True)  # on the broker's disk before we say acked
    emit({"acked": args.upto})


# The commands that take the device's delivering session (its deliveries, its cursor).
DELIVERING = (do_listen, do_ack)


async def do_history(client, args) -> None:
    if args.after is not None:  # the page right after it, in order
        page = await client.history(args.conv, after=args.after, limit=args.limit,
                                    order="oldest")
        messages = page.messages
    else:  # the latest page (before --before), printed oldest first
        page = await client.history(args.conv, before=args.before, limit=args.limit,
                                    order="newest")
        messages = tuple(reversed(page.messages))
    for m in messages:
        emit({"conv": args.conv, "seq": m.seq, "from": m.sender, **body_fields(m.body),
              "cid": m.cid, "ts": m.ts, "lsn": m.lsn})


async def do_members(client, args) -> None:
    m = await client.members(args.conv)
    emit({"conv": m.conv, "kind": m.kind, "name": m.name, "owners": list(m.owners),
          "admins": list(m.admins), "members": list(m.members)})


async def do_convs(client, args) -> None:
    after = None
    while True:
        page = await client.conversations(after=after, limit=1000)
        for c in page.convs:
            unread = max(0, c.last_seq - c.read)
            if unread or not args.unread:
                emit({"conv": c.conv, "kind": c.kind, "name": c.name, "role": c.role,
                      "last_seq": c.last_seq, "read": c.read, "unread": unread,
                      "muted": c.muted})
        if not page.more or not page.convs:
            return
        after = page.convs[-1].conv


async def do_presence(client, args) -> None:
    emit({"conv": args.conv, "online": list(await client.presence(args.conv))})


def _client_options(p: argparse.ArgumentParser) -> None:
    default_server = os.environ.get("HOMING_SERVER", f"{DEFAULT_HOST}:{DEFAULT_PORT}")
    p.add_argument("--server", default=default_server,
                   help="HOST:PORT of the broker (env HOMING_SERVER; default %(default)s)")
    p.add_argument("--token", default=os.environ.get("HOMING_TOKEN"),
                   help="access token (env HOMING_TOKEN); mint one with `homing token`")
    p.add_argument("--device", default="cli",
                   help="device name; successive commands with one name share a delivery "
                        "cursor (listen and ack take its session; the others leave it be)")
    p.add_argument("--tls", action="store_true", help="connect with TLS (system CAs)")
    p.add_argument("--tls-ca", help="CA certificate file to verify the broker with (implies --tls)")
    p.add_argument("--connect-timeout", type=_SECONDS, default=30.0,
                   help="seconds to keep trying to (re)connect, or to make again a request "
                        "refused rate_limited, before giving up (default 30)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the client commands on the `homing` subparsers."""

    def client(name: str, help: str, body, check=None) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        _client_options(p)
        p.set_defaults(func=lambda a: run_client(a, body, check))
        return p

    snd = client("send", "send a message (prints its durable result)", do_send, check_send)
    target = snd.add_mutually_exclusive_group(required=True)
    target.add_argument("--to", help="user id: the direct conversation with them")
    target.add_argument("--conv", help="conversation id")
    snd.add_argument("--cid", help="client message id (a retry with the same id sends nothing new)")
    snd.add_argument("--stdin", action="store_true", help="send each stdin line as a message")
    snd.add_argument("--cid-prefix", help="with --stdin: cid of line N is PREFIX-N")
    snd.add_argument("--pipeline", type=_COUNT, default=256,
                     help="with --stdin: sends in flight")
    snd.add_argument("text", nargs="?")

    lst = client("listen", "print deliveries (and ack them)", do_listen, check_listen)
    lst.add_argument("--count", type=_COUNT, help="stop after N deliveries")
    lst.add_argument("--timeout", type=_SECONDS,
                     help="stop after SECONDS with nothing arriving")
    lst.add_argument("--no-ack", action="store_true", help="print without acking")
    lst.add_argument("--start", choices=("first", "head"), default="first",
                     help="where a device the broker has no cursor for starts: first, the "
                          "whole inbox; head, only what arrives after (default %(default)s)")

    for kind in ("group", "channel"):
        grp = sub.add_parser(kind, help=f"{kind} commands")
        gsub = grp.add_subparsers(dest="action", required=True)
        c = gsub.add_parser("create", help=f"create a {kind}")
        _client_options(c)
        c.add_argument("name")
        c.add_argument("--members", help="comma-separated user ids")
        c.add_argument("--open", action="store_true", help="anyone may join/subscribe")
        c.add_argument("--cid", help=f"client id of this create: a retry with the same id "
                                     f"creates nothing new and prints the first {kind}")
        c.set_defaults(kind=kind, func=lambda a: run_client(a, do_create, check_create))

    inv = client("invite", "add a user to a group or channel", do_invite)
    inv.add_argument("conv")
    inv.add_argument("user")
    inv.add_argument("--role", choices=("member", "admin"), default="member")
    sr = client("role", "make a member of a group or channel an admin or a plain member",
                do_set_role)
    sr.add_argument("conv")
    sr.add_argument("user")
    sr.add_argument("role", choices=("member", "admin"))
    rm = client("remove", "take a member out of a group or channel", do_remove)
    rm.add_argument("conv")
    rm.add_argument("user")
    for name, again in (("join", True), ("leave", False), ("subscribe", True)):
        client(name, f"{name} a conversation", _simple(name, again)).add_argument("conv")
    mute = client("mute", "mute a conversation", do_mute)
    mute.add_argument("conv")
    mute.add_argument("--unmute", action="store_true")
    rd = client("read", "mark a conversation read up to a seq", do_read)
    rd.add_argument("--conv", required=True)
    rd.add_argument("--upto", type=int, required=True)
    ack = client("ack", "ack this device's deliveries up to an inbox_seq", do_ack)
    ack.add_argument("--upto", type=int, required=True,
                     help="inbox_seq (as `listen --no-ack` printed it): acks it and all before")
    rc = client("receipts", "who received and who read a message", do_receipts)
    rc.add_argument("--conv", required=True)
    rc.add_argument("--seq", type=int, required=True)
    hs = client("history", "print a conversation's messages, oldest first", do_history)
    hs.add_argument("--conv", required=True)
    page = hs.add_mutually_exclusive_group()
    page.add_argument("--before", type=int, help="the messages before this seq (the latest ones)")
    page.add_argument("--after", type=int, help="the messages right after this seq")
    hs.add_argument("--limit", type=int, default=50)
    client("presence", "which members are online", do_presence).add_argument("conv")
    cv = client("convs", "list your conversations with their unread counts", do_convs)
    cv.add_argument("--unread", action="store_true",
                    help="only the conversations with unread messages")
    client("members", "a conversation's kind, name and members by role",
           do_members).add_argument("conv")
    client("revoke", "revoke every token of a user issued up to now (admin token)",
           do_revoke).add_argument("user")
