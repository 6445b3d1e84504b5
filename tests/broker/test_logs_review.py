"""The broker's log as an operator reads it during an incident: a real `homing serve` child,
driven through a day by the SDK, its stderr read line by line.

- every line is one JSON object with a timestamp, a level and the event, and carries the
  context docs/OPERATIONS.md "Logs" promises for that event; no token, no secret key;
- at the default level the log does not grow with the messages (a line per connection, not
  per message);
- a sink that stops reading (a pipe whose reader is alive but stalled: a hung log shipper, a
  paused `| less`) costs lines, never the service.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import time
from contextlib import contextmanager

import structlog
import structlog.testing
import trio

from broker import tokens
from broker.client import ClientError, ConnectionLost, open_client
from tests.faults.conftest import RawClient
from tests.procs import BrokerProcess, free_port, homing_cmd

# The fields each event of the day must carry (docs/OPERATIONS.md "Logs"), besides
# event, level and timestamp.
PROMISED = {
    "broker_listening": {"host", "port", "tls", "data", "storage_native", "storage_rows",
                         "protocol_native"},
    "connection_opened": {"conn", "peer", "user", "device", "role", "acked", "head"},
    "auth_failed": {"conn", "peer", "device", "reason"},
    "frame_rejected": {"conn", "peer", "code", "reason", "fatal"},
    "slow_consumer_closed": {"conn", "peer", "user", "device", "queued", "queued_bytes"},
    "tokens_revoked": {"conn", "user", "device", "target", "before", "sessions_ended"},
    "connection_closed": {"conn", "peer", "user", "device", "reason", "duration_s",
                          "frames_in", "frames_out"},
    "broker_stopped": {"batches", "commands"},
    "storage_opened": {"path", "map_size", "readonly"},
    "storage_closed": {"path"},
}


async def _day(bp: BrokerProcess) -> int:
    """Connect, 1,000 direct messages and 100 group posts read and acked, a bad token, garbage
    before and after hello, a membership change past the rate, a device that never reads, a
    revoke. The number of messages sent."""
    sent = 0
    async with bp.client("alice") as a, bp.client("bob") as b, \
            bp.client("admin", role="admin") as admin:
        conv = await a.create_group("team", ["bob", "carol"])
        for i in range(1000):
            await a.send(f"m{i}", to="bob")
        for i in range(100):
            await a.send(f"g{i}", conv=conv)
        sent += 1100
        deliveries = b.deliveries()
        for n in range(1, 1101):
            d = await deliveries.receive()
            if n % 50 == 0:
                await b.ack(d.inbox_seq, durable=True)
        forged = bp.token("eve")[:-4] + "AAAA"
        try:
            async with open_client(bp.server, forged, "x", reconnect=False):
                raise AssertionError("a forged token was welcome")
        except ClientError:
            pass
        garbage = await trio.open_tcp_stream("127.0.0.1", bp.port)
        await garbage.send_all(b"\x00\x00\x00\x05hello")
        with trio.move_on_after(1):
            await garbage.receive_some(100)
        await garbage.aclose()
        raw = await RawClient.connect(bp.server, bp.token("carol"), "raw")
        await raw.stream.send_all(b"\x00\x00\x00\x03\xc1\xc1\xc1")
        with trio.move_on_after(1):
            await raw.next()
        for i in range(20):
            try:
                await a.mute(conv, i % 2 == 0)
            except ClientError as exc:
                assert exc.name == "rate_limited", exc
                break
        else:
            raise AssertionError("--change-rate 5 let 20 changes through")
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect(("127.0.0.1", bp.port))
        stalled = RawClient(trio.SocketStream(sock))
        await stalled.hello(bp.token("alice"), "never-reads")
        for _ in range(30):
            await a.send("z" * 60_000, conv=conv)
        sent += 30
        for i in range(20):
            await b.read(conv, 100 + i)
        with trio.fail_after(10):
            while not any(e["event"] == "slow_consumer_closed" for e in bp.log_events()):
                await trio.sleep(0.05)
        assert await admin.revoke_tokens("bob") >= 0
        with trio.fail_after(10):
            while not any(e["event"] == "tokens_revoked" for e in bp.log_events()):
                await trio.sleep(0.05)
        sock.close()
    return sent


async def test_a_day_of_the_broker_reads_as_the_docs_promise(tmp_path):
    bp = BrokerProcess(tmp_path / "data", "--change-rate", "5", "--max-pending-pushes", "8")
    try:
        await bp.astart()
        with trio.fail_after(90):
            sent = await _day(bp)
        assert await bp.aterminate() == 0
    finally:
        bp.kill()
    text = bp.logfile.read_text()
    lines = text.splitlines()
    events = [json.loads(line) for line in lines]  # every line one JSON object
    assert text.endswith("\n")
    for e, line in zip(events, lines, strict=True):
        assert {"event", "level", "timestamp"} <= set(e), e
        # the order and spacing docs/OPERATIONS.md "Logs" shows (an operator's grep)
        assert [k for k in e if k != "exception"][-3:] == ["event", "level", "timestamp"], e
        assert f'"event": "{e["event"]}", "level": "{e["level"]}"' in line, line
        assert e["level"] in ("debug", "info", "warning", "error", "critical"), e
        assert e["timestamp"].endswith("Z"), e
    seen = {e["event"] for e in events}
    assert set(PROMISED) <= seen, set(PROMISED) - seen
    # a stop whose last commit ends within the second says nothing of waiting for it
    assert "stop_waiting_for_commit" not in seen
    for e in events:
        missing = PROMISED.get(e["event"], set()) - set(e)
        assert not missing, (e, missing)
    # a session's lines carry its user and device once it is past hello
    opened = {e["conn"]: e for e in events if e["event"] == "connection_opened"}
    for e in events:
        if e.get("conn") in opened and e["event"] != "auth_failed":
            assert e["user"] == opened[e["conn"]]["user"], e
    # no secret: neither a token (of any user of the day) nor the secret key
    secret = bp.secret.hex() if isinstance(bp.secret, bytes) else str(bp.secret)
    assert secret not in text
    assert "v1." not in text  # a token's prefix (broker/tokens.py)
    # bounded: a few lines per connection, none per message
    per_1000 = 1000 * len(lines) / sent
    assert per_1000 < 40, (len(lines), sent)


def _serve_into_pipe(data, port, *flags):
    return subprocess.Popen(
        [*homing_cmd(), "serve", "--data", str(data), "--port", str(port),
         "--log-format", "json", *flags],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_listening(port: int) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.03)
    raise AssertionError("the broker did not listen")


async def test_a_log_pipe_nobody_reads_does_not_stop_the_broker(tmp_path):
    """stderr a pipe whose reader is alive but reads nothing: once the pipe (64 KiB) was full,
    the next log line blocked the broker's only thread, and it answered nobody (no welcome
    within 10 s at the 143rd connection). Lines are lost instead, and counted when the sink
    takes lines again (`log_lines_dropped`)."""
    data, port = tmp_path / "data", free_port()
    secret = tokens.load_secret(data)
    serve = _serve_into_pipe(data, port, "--log-buffer-bytes", "16384")
    try:
        _wait_listening(port)
        token = tokens.issue(secret, "u", "user", 3600)
        with trio.fail_after(60):
            for i in range(400):
                try:
                    async with open_client(f"127.0.0.1:{port}", token, f"d{i}",
                                           reconnect=False, reconnect_timeout=5) as c:
                        await c.send("x", to="bob")
                except ConnectionLost as exc:
                    raise AssertionError(f"connection {i}: {exc}") from None
        assert serve.poll() is None
        events = []  # the reader comes back: the loss is told, and the broker serves on
        while not events or events[-1]["event"] != "log_lines_dropped":
            events.append(json.loads(serve.stderr.readline()))  # whole lines only
        (dropped,) = [e for e in events if e["event"] == "log_lines_dropped"]
        assert dropped["lines"] > 0 and dropped["level"] == "warning", dropped
        assert dropped["buffer_bytes"] == 16384
        async with open_client(f"127.0.0.1:{port}", token, "after", reconnect=False) as c:
            await c.send("y", to="bob")
        serve.send_signal(subprocess.signal.SIGTERM)
        # (Not communicate(): with a timeout it reads the descriptor itself, past what
        # readline() above had buffered already, and the rest began mid-line: the full suite,
        # once. The lossy log never blocks the broker, so it ends with the pipe unread.)
        assert serve.wait(timeout=30) == 0
        out = serve.stderr.read()
    finally:
        serve.kill()
        serve.wait()
    lines = out.decode().splitlines()
    assert all(line.startswith("{") for line in lines), [  # every line whole, and JSON
        line[:300] for line in lines if not line.startswith("{")]
    events = [json.loads(line) for line in lines]
    assert [e["device"] for e in events if e["event"] == "connection_opened"] == ["after"]
    assert events[-1]["event"] == "storage_closed", events[-3:]


def test_the_log_buffer_default_is_the_logs_own():
    from broker import logs, serve_cli

    assert serve_cli.DEFAULT_LOG_BUFFER_BYTES == logs.DEFAULT_BUFFER_BYTES


def test_a_broker_started_without_stdout_and_stderr_serves(tmp_path):
    """`homing serve ... >&- 2>&-` (a unit that closes them, a careless nohup): the log has
    nowhere to go, and its lines are lost. The broker exited with status 1 at its start,
    silently (its first log line raised on the missing stderr)."""
    from tests.procs import check_serves_then_stops

    data, port = tmp_path / "data", free_port()
    cmd = " ".join([*homing_cmd(), "serve", "--data", str(data), "--port", str(port),
                    "--log-format", "json"])
    serve = subprocess.Popen(f"exec {cmd} >&- 2>&-", shell=True)
    try:
        _wait_listening(port)
    except BaseException:
        serve.kill()
        serve.wait()
        raise
    check_serves_then_stops(serve, data, port)


async def test_command_done_names_the_conversation_of_a_direct_send_and_a_create(tmp_path):
    """At --log-level debug an operator follows a conversation by its `conv`: `command_done` of
    a send with `to` (a direct message) or of a create named none (the command's own field
    was empty), so the direct messages of a user could not be found by their conversation."""
    bp = BrokerProcess(tmp_path / "data", "--log-level", "debug")
    try:
        await bp.astart()
        with trio.fail_after(30):
            async with bp.client("alice") as a:
                dm = (await a.send("hi", to="bob")).conv
                group = await a.create_group("team", ["bob"])
                await a.send("all", conv=group)
        assert await bp.aterminate() == 0
    finally:
        bp.kill()
    done = [(e["command"], e["conv"]) for e in bp.log_events() if e["event"] == "command_done"]
    assert done == [("SendMessage", dm), ("CreateConv", group), ("SendMessage", group)], done


class _Flaky:
    """A sink whose first write raises what no file raises (a bug in a wrapped stream)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.failed = False

    def fileno(self) -> int:
        raise OSError("no descriptor: written with write()")

    def write(self, text: str) -> int:
        if not self.failed:
            self.failed = True
            raise RuntimeError("a sink's bug")
        self.lines.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def test_a_sink_that_raises_the_unexpected_loses_that_batch_not_every_later_line():
    """The log writer caught only OSError and ValueError: anything else a sink raised ended its
    thread, silently, and every later line was lost (held, then dropped). Now that batch of
    lines is lost and counted, and the writer goes on."""
    from broker import logs

    sink = _Flaky()
    stream = logs.LossyStream(sink)
    with structlog.testing.capture_logs() as said:
        for line in ("first\n", "second\n"):
            stream.write(line)
            stream.flush()
            assert stream.drain(5)
    assert sink.failed and "second\n" in "".join(sink.lines), sink.lines
    assert [(e["event"], e["lines"]) for e in said] == [("log_lines_dropped", 1)], said


@contextmanager
def _logs_configured_back():
    """Put structlog and the standard library's root logger back as they were before the
    block, which calls `logs.configure()`, and end the streams it made."""
    from broker import logs

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        logs.drain(5)
        for stream in logs._streams:
            stream.close()
        logs._streams.clear()
        structlog.reset_defaults()
        root.handlers[:], root.level = handlers, level


def test_configuring_the_logs_again_ends_the_old_writer_thread():
    """Each `logs.configure()` made a new stream with its own writer thread and left the old
    one parked for good: a process that configures its logs again and again (the tests, an
    embedding service) gathered threads. The old stream's writer ends once it has written what
    it held; a line still printed to it (a logger cached before) starts it again."""
    import io
    import threading

    from broker import logs

    def writers() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "homing-log" and t.is_alive()]

    before = len(writers())
    sinks = [io.StringIO() for _ in range(5)]
    with _logs_configured_back():
        for sink in sinks:
            logs.configure("info", "json", stream=sink)
            logs.get_logger().info("configured")
            logs.drain(5)
        deadline = time.monotonic() + 5
        while len(writers()) > before + 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(writers()) <= before + 1, writers()
        assert all('"configured"' in sink.getvalue() for sink in sinks)
        stale = logs.LossyStream(io.StringIO())
        stale.write("one\n")
        stale.flush()
        assert stale.drain(5)
        stale.close()
        stale.write("two\n")  # a logger cached before the close still prints to it
        stale.flush()
        assert stale.drain(5) and stale.stream.getvalue() == "one\ntwo\n"


def test_a_line_printed_as_the_stream_closes_is_written():
    """A stream `configure` replaced is closed: its writer thread ends once nothing is held,
    and a line printed after starts one again. A line printed just as the writer finds
    nothing held and ends must still be written (held with no writer, it would wait for
    good): 100 streams, each closed again and again while a thread prints 200 lines."""
    import io
    import random
    import threading

    from broker import logs

    rng = random.Random(5)
    for _ in range(100):
        stream = logs.LossyStream(io.StringIO())

        def printer(stream=stream) -> None:
            for i in range(200):
                stream.write(f"{i}\n")
                stream.flush()

        thread = threading.Thread(target=printer)
        thread.start()
        while thread.is_alive():
            stream.close()
            time.sleep(rng.random() * 0.0002)
        thread.join()
        assert stream.drain(5), "a line held with no writer"
        assert stream.stream.getvalue() == "".join(f"{i}\n" for i in range(200))


def test_an_exit_drains_lines_printed_to_a_stream_configured_away():
    """A logger cached before `logs.configure()` ran again still prints to the old stream;
    `logs.drain()` (what an exit runs) drained the current stream only, so such a line still
    held was lost. It drains the old ones too while they hold lines."""
    from broker import logs

    class SlowSink:
        def __init__(self) -> None:
            self.text = ""

        def write(self, text: str) -> None:
            time.sleep(0.3)
            self.text += text

        def flush(self) -> None:
            pass

    slow = SlowSink()
    with _logs_configured_back():
        logs.configure("info", "json", stream=slow)
        cached = logs.get_logger()
        cached.info("first")  # bound to the slow stream from now on
        logs.configure("info", "json", stream=SlowSink())
        cached.info("late")
        logs.drain(5)
        assert '"late"' in slow.text, slow.text


def test_a_json_line_is_its_fields_then_event_level_timestamp_then_the_exception():
    """docs/OPERATIONS.md "Logs": a JSON line is the event's fields, then `event`, `level` and
    `timestamp`, then `exception` on an error line that carries a traceback, with a space
    after each `:` and `,`; the guide said `{"event", "level", "timestamp", ...}`, then the
    fields, and an operator grepping `^{"event": ` found no line."""
    import io

    from broker import logs

    sink = io.StringIO()
    with _logs_configured_back():
        logs.configure("info", "json", stream=sink)
        log = logs.get_logger(conn=7)
        log.info("signing_keys_loaded", key_id="1fc8a57b0528", previous_key_id=None)
        try:
            raise RuntimeError("a bug")
        except RuntimeError:
            log.exception("commit_callback_failed")
        logging.getLogger("trio").error("accept failed")
        logs.drain(5)
    lines = sink.getvalue().splitlines()
    keys = [list(json.loads(line)) for line in lines]
    assert keys == [
        ["conn", "key_id", "previous_key_id", "event", "level", "timestamp"],
        ["conn", "event", "level", "timestamp", "exception"],
        ["logger", "event", "level", "timestamp"],
    ], lines
    assert lines[0].startswith('{"conn": 7, "key_id": "1fc8a57b0528", "previous_key_id": null, '
                               '"event": "signing_keys_loaded", "level": "info", "timestamp": "')
    assert "RuntimeError: a bug" in json.loads(lines[1])["exception"]
