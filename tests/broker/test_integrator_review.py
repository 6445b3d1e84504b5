"""What an integrator new to homing tripped over, walking the README, docs/CLIENT.md and
docs/CLI.md literally: a command that did not stop when its reader went away, and an error
that did not say which limit a message broke."""

from __future__ import annotations

import os
import subprocess

import pytest
import trio

import protocol as wire
from broker.client import ClientError, ConnectionLost, open_client
from tests.procs import BrokerProcess, as_user, homing, homing_cmd, last_error, lines


def test_listen_piped_into_head_stops_once_head_is_gone(tmp_path):
    """`homing listen | head -1`: once head has its line and exits, listen stops quietly (exit
    1, as `homing history ... | head -1` does) with that line acked. It waited for the next
    delivery, whose write alone found the pipe closed: with none coming it ran for ever,
    holding the user's session."""
    with BrokerProcess(tmp_path / "data") as bp:
        shop = as_user(bp, "shop", "service")
        homing("send", "--to", "bob", "--cid", "n1", "first", env=shop)
        read_end, write_end = os.pipe()
        proc = subprocess.Popen([*homing_cmd(), "listen", "--device", "d1"],
                                env={**os.environ, **as_user(bp, "bob")},
                                stdout=write_end, stderr=subprocess.PIPE)
        os.close(write_end)
        try:
            with os.fdopen(read_end, "rb") as head:  # `head -1`: one line, then gone
                assert b'"body":"first"' in head.readline()
            try:
                _, err = proc.communicate(timeout=30)  # bound of a hang, not a measure
            except subprocess.TimeoutExpired:
                pytest.fail("homing listen went on after its reader was gone")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert (proc.returncode, err) == (1, b"")
        # The line head took was acked; the broker serves on.
        homing("send", "--to", "bob", "--cid", "n2", "second", env=shop)
        got = lines(homing("listen", "--device", "d1", "--count", "1",
                           env=as_user(bp, "bob")))
        assert [d["body"] for d in got] == ["second"]


def test_a_body_too_big_for_any_frame_names_the_body_limit(tmp_path):
    """docs/CLI.md: a body over the broker's --max-body-bytes is refused `invalid`, "send: bad
    value for field 'body': a body of N bytes, over the limit of 65,536", and docs/CLIENT.md
    says a send with one's own cid gets "the same message". A body too big for a frame at all
    (a 2 MB line through `send --stdin`, whose lines carry cids) said "send frame of 2000069
    bytes exceeds max_frame" instead: no limit, no field, nothing to act on."""
    with BrokerProcess(tmp_path / "data") as bp:
        shop = as_user(bp, "shop", "service")
        proc = homing("send", "--to", "bob", "--stdin", input="a" * 2_000_000 + "\n",
                      env=shop, check=False)
        assert proc.returncode == 1, proc.stderr
        assert last_error(proc.stderr) == {
            "error": "invalid", "code": 7,
            "message": "line 1 of stdin: send: bad value for field 'body': a body of 2,000,000 "
                       "bytes, over the limit of 65,536"}


async def test_the_sdk_names_the_body_limit_for_a_body_too_big_for_any_frame(harness):
    """The SDK's `send` with a cid of one's own, the same: a ClientError `invalid` naming the
    body and the broker's limit, unsent, and the client goes on."""
    async with harness.client("shop", role="service") as client:
        with pytest.raises(ClientError) as e:
            await client.send(b"x" * 2_000_000, to="bob", cid="order-1")
        assert e.value.name == "invalid"
        limit = client.welcome.max_body
        assert e.value.message == (
            f"send: bad value for field 'body': a body of 2,000,000 bytes, over the limit of "
            f"{limit:,}")
        result = await client.send("fits", to="bob", cid="order-1")
        assert (result.seq, result.dup) == (1, False)


async def _serve_banner(banner: bytes, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """A service that is not homing on a port (an SSH server): its banner, then silence."""
    async def handler(stream: trio.SocketStream) -> None:
        await stream.send_all(banner)
        await trio.sleep_forever()

    await trio.serve_tcp(handler, 0, host="127.0.0.1", task_status=task_status)


@pytest.mark.parametrize("banner", [b"SSH-2.0-OpenSSH_9.6\r\n", b"HTTP/1.1 400 Bad Request\r\n"])
async def test_a_port_that_is_not_homing_is_told_at_each_attempt(banner):
    """The wrong port (another service's): PROTOCOL.md §3.2 bounds a frame before `welcome` to
    64 KiB, but the SDK took `SSH-` for the length of a 1.4 GB frame and waited for it, each
    attempt ending as "no welcome within 10 s". Each attempt now ends as the banner arrives,
    saying that this is no homing broker."""
    reasons: list[str] = []
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(_serve_banner, banner)
        port = listeners[0].socket.getsockname()[1]
        with trio.fail_after(30):
            with pytest.raises(ConnectionLost) as e:
                async with open_client(f"127.0.0.1:{port}", "v1.any.token", "d1",
                                       reconnect_timeout=1, on_unreachable=reasons.append):
                    pass
        nursery.cancel_scope.cancel()
    for said in (str(e.value), *reasons):
        assert "does not speak homing" in said and "the broker's port" in said, said


def test_an_expired_token_says_when_and_what_to_do(tmp_path):
    """An expired token was refused `unauthorized` "token expired", where the broker's other
    token refusals say how to get a good one: it says when it expired and to mint a new one
    with `homing token`, a longer `--ttl` for a service. Name and exit status as before."""
    with BrokerProcess(tmp_path / "data") as bp:
        expired = bp.token("shop", "service", ttl=-60)
        proc = homing("send", "--to", "bob", "hi", env={"HOMING_SERVER": bp.server,
                                                        "HOMING_TOKEN": expired}, check=False)
    assert proc.returncode == 1, proc.stderr
    err = last_error(proc.stderr)
    assert err["error"] == "unauthorized" and err["code"] == 4, err
    assert err["message"].startswith("token expired at 20"), err
    assert "homing token" in err["message"] and "--ttl" in err["message"], err


async def _serve_old_broker(task_status=trio.TASK_STATUS_IGNORED) -> None:
    """A broker from before welcome named max_body: it welcomes every hello with a max_frame of
    128 KiB and no max_body, then reads on (and answers nothing)."""
    async def handler(stream: trio.SocketStream) -> None:
        conn = wire.Connection(wire.Role.SERVER, max_frame_bytes=wire.HELLO_MAX_FRAME_BYTES)
        while not isinstance(conn.next_event(), wire.Hello):
            conn.receive_data(await stream.receive_some(65536))
        await stream.send_all(conn.send(wire.Welcome(
            version=1, session="s-1", user="shop", time=0, max_frame=128 * 1024, heartbeat=30,
            acked=0, head=0, caps=(), role="service")))
        conn.max_frame_bytes = 128 * 1024
        while await stream.receive_some(65536):
            pass

    await trio.serve_tcp(handler, 0, host="127.0.0.1", task_status=task_status)


async def test_a_body_too_big_for_a_frame_of_a_broker_that_names_no_max_body():
    """A broker older than welcome.max_body, and a send with a cid whose body its frames cannot
    hold: `invalid`, naming the frame limit, as before 2026-12-05. The message that names the
    body limit compared the body with None and raised TypeError from `send`."""
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(_serve_old_broker)
        port = listeners[0].socket.getsockname()[1]
        with trio.fail_after(30):
            async with open_client(f"127.0.0.1:{port}", "v1.any.token", "d1",
                                   reconnect=False) as client:
                assert client.welcome.max_body is None
                with pytest.raises(ClientError) as e:
                    await client.send(b"x" * 200_000, to="bob", cid="order-1")
        nursery.cancel_scope.cancel()
    assert e.value.name == "invalid"
    assert e.value.message.startswith("send frame of "), e.value.message
    assert e.value.message.endswith(" bytes exceeds max_frame"), e.value.message


def _without_stdout(*args: str, env: dict) -> subprocess.CompletedProcess:
    """`homing ARGS >&-`: run with file descriptor 1 closed."""
    return subprocess.run([*homing_cmd(), *args], env={**os.environ, **env},
                          capture_output=False, stderr=subprocess.PIPE, text=True,
                          timeout=60, preexec_fn=lambda: os.close(1))


def test_listen_without_a_stdout_is_refused_before_connecting(tmp_path):
    """`homing listen >&-`: a usage error, nothing acked. It connected, took the device's
    session, and at the first delivery ended in an AttributeError traceback (exit 1); with
    none coming it held the session for ever."""
    with BrokerProcess(tmp_path / "data") as bp:
        shop = as_user(bp, "shop", "service")
        homing("send", "--to", "bob", "--cid", "n1", "first", env=shop)
        proc = _without_stdout("listen", "--device", "d1", env=as_user(bp, "bob"))
        assert proc.returncode == 2, proc.stderr
        assert last_error(proc.stderr) == {
            "error": "usage", "code": 0,
            "message": "standard output is closed: listen acks each delivery once it is "
                       "printed, and there is nowhere to print it"}
        got = lines(homing("listen", "--device", "d1", "--count", "1", env=as_user(bp, "bob")))
        assert [d["body"] for d in got] == ["first"]


def test_a_command_without_a_stdout_prints_for_nobody(tmp_path):
    """`homing send TEXT >&-` sends, and prints its result for nobody, exit 0, as `homing
    token` does (it sent, then ended in an AttributeError traceback, exit 1)."""
    with BrokerProcess(tmp_path / "data") as bp:
        shop = as_user(bp, "shop", "service")
        proc = _without_stdout("send", "--to", "bob", "--cid", "n1", "first", env=shop)
        assert (proc.returncode, proc.stderr) == (0, "")
        got = lines(homing("listen", "--device", "d1", "--count", "1", env=as_user(bp, "bob")))
        assert [d["body"] for d in got] == ["first"]
