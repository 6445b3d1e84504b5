"""The blocking client (broker/client_blocking.py) from plain threads and asyncio, against a
real `homing serve` child on loopback.

Plain pytest functions, no trio in the test: the client's trio run is in its own thread, as a
Flask view or a worker pool would use it. Every wait is a poll or a join with a hang guard.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from broker import tokens
from broker.client import (
    Client,
    ClientClosed,
    ClientError,
    ConnectionLost,
)
from broker.client_blocking import BlockingClient, connect
from tests.procs import BrokerProcess, free_port
from tests.waits import HANG_GUARD_S, wait_until_sync

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    """One broker for the tests that do not stop it; each test has users of its own."""
    with BrokerProcess(tmp_path_factory.mktemp("blocking") / "data") as bp:
        yield bp


def _connect(bp: BrokerProcess, user: str, device: str = "d1", **kw) -> BlockingClient:
    return connect(bp.server, bp.token(user), device, **kw)


def _threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("homing-client-")}


def _take(client: BlockingClient, count: int) -> list[str]:
    """The bodies of the next `count` deliveries, each acked (a hang guard on each)."""
    got = []
    while len(got) < count:
        d = client.next_delivery(timeout=HANG_GUARD_S)
        assert d is not None, f"no delivery within {HANG_GUARD_S} s after {len(got)}"
        got.append(d.body)
        client.ack(d)
    return got


def _waiting_in_call(thread: threading.Thread) -> bool:
    """Whether `thread` waits for a call's answer (its stack is in trio's from_thread)."""
    frame = sys._current_frames().get(thread.ident)
    while frame is not None:
        if frame.f_code.co_name == "_send_message_to_trio":
            return True
        frame = frame.f_back
    return False


def test_send_and_receive_across_two_clients(broker):
    """A send returns its durable result, and the other user's client iterates the delivery
    and acks it; a history page holds the message."""
    with _connect(broker, "r1-alice") as alice, _connect(broker, "r1-bob") as bob:
        result = alice.send("Your reserved book is back", to="r1-bob", cid="hold-991")
        assert (result.seq, result.cid, result.dup) == (1, "hold-991", False)
        for d in bob.deliveries():
            assert (d.conv, d.seq, d.sender, d.body) == (result.conv, 1, "r1-alice",
                                                         "Your reserved book is back")
            bob.ack(d, durable=True)
            break
        assert alice.send("again", to="r1-bob", cid="hold-991").dup
        page = bob.history(result.conv)
        assert [m.body for m in page.messages] == ["Your reserved book is back"]
        assert bob.next_delivery(timeout=0.05) is None  # the dup was not appended
        assert bob.welcome.user == bob.user == "r1-bob"
    assert not _threads()


def test_methods_keep_the_clients_signatures_and_docstrings():
    """help() shows a mirrored method's own arguments and docstring."""
    import inspect

    assert inspect.signature(BlockingClient.send) == inspect.signature(Client.send)
    assert BlockingClient.history.__doc__ == Client.history.__doc__
    assert not inspect.iscoroutinefunction(BlockingClient.send)
    # Every request method of the Client is here too, so one added there is not forgotten
    # (`stats` was, in the first merge); aclose and deliveries are close and an iterator here.
    requests = {name for name, fn in vars(Client).items()
                if not name.startswith("_") and callable(fn)} - {"aclose", "deliveries"}
    assert requests - set(dir(BlockingClient)) == set()


def test_a_refused_token_raises_client_error_from_connect(broker):
    """A token the broker refuses raises ClientError `unauthorized` from `connect`, in the
    calling thread, and leaves no thread behind."""
    forged = tokens.issue(os.urandom(32), "r2-alice")
    with pytest.raises(ClientError) as caught:
        connect(broker.server, forged, "d1")
    assert caught.value.name == "unauthorized"
    assert not _threads()


def test_a_bad_server_or_an_unreachable_one_raises_from_connect(broker):
    """ValueError for a server that is not HOST:PORT; ConnectionLost once the broker was not
    reached within reconnect_timeout, after `on_unreachable` ran in the client's thread."""
    with pytest.raises(ValueError):
        connect("nats://127.0.0.1:7717", broker.token("r3-alice"))
    told = []
    with pytest.raises(ConnectionLost):
        connect(f"127.0.0.1:{free_port()}", broker.token("r3-alice"), "d1",
                reconnect_timeout=0.5,
                on_unreachable=lambda reason: told.append(threading.current_thread().name))
    assert told == ["homing-client-d1"]
    assert not _threads()


def test_a_refusal_raises_its_own_type(broker):
    """A request the broker refuses raises that ClientError, itself, not a wrapper."""
    with _connect(broker, "r4-alice") as alice:
        alice.send("one", to="r4-bob", cid="order-1")
        with pytest.raises(ClientError) as conflict:
            alice.send("two", to="r4-carol", cid="order-1")
        assert type(conflict.value) is ClientError and conflict.value.name == "conflict"
        group = alice.create_group("staff", ["r4-bob"])
    with _connect(broker, "r4-carol") as carol:
        with pytest.raises(ClientError) as forbidden:
            carol.members(group)
        assert forbidden.value.name == "forbidden"
        with pytest.raises(TypeError):  # raised by Client.create in the trio thread
            carol.create_group("x", "r4-bob")


def test_many_threads_share_one_client(broker):
    """8 threads sending 50 each at once through one client: every result is its own, and
    the receiver is delivered each message once, each thread's in the order it sent them."""
    threads, each = 8, 50
    results: dict[str, object] = {}
    errors: list[BaseException] = []
    with _connect(broker, "r5-shop") as shop, _connect(broker, "r5-member") as member:

        def sender(t: int) -> None:
            try:
                for n in range(each):
                    results[f"{t}-{n}"] = shop.send(f"{t}-{n}", to="r5-member")
            except BaseException as exc:
                errors.append(exc)

        workers = [threading.Thread(target=sender, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(HANG_GUARD_S)
        assert not errors and len(results) == threads * each
        assert len({r.seq for r in results.values()}) == threads * each
        assert len({r.cid for r in results.values()}) == threads * each

        got = _take(member, threads * each)
        assert member.next_delivery(timeout=0.05) is None
    assert sorted(got) == sorted(results)
    for t in range(threads):
        assert [b for b in got if b.startswith(f"{t}-")] == [f"{t}-{n}" for n in range(each)]


def test_a_broker_killed_and_restarted_loses_nothing(tmp_path):
    """SIGKILL of the broker in the middle of a stream of sends, then a restart: the blocking
    client reconnects by itself, every send returns, and the receiver gets each message once,
    in order."""
    total = 300
    sent: list[object] = []
    with BrokerProcess(tmp_path / "data") as bp:
        with _connect(bp, "shop") as shop, _connect(bp, "member") as member:

            def stream() -> None:
                for n in range(total):
                    sent.append(shop.send(f"n{n}", to="member"))

            sender = threading.Thread(target=stream)
            sender.start()
            assert wait_until_sync(lambda: len(sent) >= total // 3)
            bp.kill()
            assert len(sent) < total  # killed in the middle of the stream
            bp.start()
            got = _take(member, total)
            sender.join(HANG_GUARD_S)
            assert len(sent) == total
            assert wait_until_sync(lambda: shop.reconnects >= 1 and member.reconnects >= 1)
            assert member.next_delivery(timeout=0.2) is None
    assert got == [f"n{n}" for n in range(total)]
    assert [r.seq for r in sent] == list(range(1, total + 1))


def test_close_ends_a_deliveries_loop_in_another_thread(broker):
    """close() while another thread waits in deliveries() ends that loop quietly; calls after
    close raise ClientClosed, and a second close is a no-op."""
    client = _connect(broker, "r6-alice")
    ended = threading.Event()

    def loop() -> None:
        for _ in client.deliveries():
            pass
        ended.set()

    worker = threading.Thread(target=loop)
    worker.start()
    client.send("to myself elsewhere", to="r6-bob")  # the loop is waiting meanwhile
    client.close()
    worker.join(HANG_GUARD_S)
    assert ended.is_set()
    with pytest.raises(ClientClosed):
        client.send("late", to="r6-bob")
    with pytest.raises(ClientClosed):
        client.next_delivery(timeout=0)
    with pytest.raises(ClientClosed):
        client.deliveries()
    client.close()
    assert not _threads()


def test_close_fails_a_request_waiting_on_a_stopped_broker(tmp_path):
    """A request waiting for a broker that stopped answering (SIGSTOP) raises ClientClosed in
    its thread when another thread closes the client, and the close returns."""
    with BrokerProcess(tmp_path / "data") as bp:
        client = _connect(bp, "alice")
        outcome: list[BaseException] = []

        def wait_for_pong() -> None:
            try:
                client.ping()
            except BaseException as exc:
                outcome.append(exc)

        os.kill(bp.pid, signal.SIGSTOP)
        try:
            waiter = threading.Thread(target=wait_for_pong)
            waiter.start()
            assert wait_until_sync(lambda: _waiting_in_call(waiter))
            client.close()
            waiter.join(HANG_GUARD_S)
        finally:
            os.kill(bp.pid, signal.SIGCONT)
        assert len(outcome) == 1 and isinstance(outcome[0], ClientClosed), outcome
    assert not _threads()


def test_next_delivery_times_out_and_a_requests_only_client_refuses_deliveries(broker):
    """next_delivery(timeout) returns None when nothing came, and takes nothing that comes
    later; deliveries() on a requests-only client raises ClientError "invalid"."""
    with _connect(broker, "r7-bob") as bob, _connect(broker, "r7-alice",
                                                     deliver=False) as alice:
        assert bob.next_delivery(timeout=0.05) is None
        alice.send("after the timeout", to="r7-bob")
        assert bob.next_delivery().body == "after the timeout"
        with pytest.raises(ClientError) as caught:
            alice.deliveries()
        assert caught.value.name == "invalid"


def test_asyncio_service_through_to_thread(broker):
    """An asyncio service sends through asyncio.to_thread (20 at once) while a consumer
    coroutine takes the deliveries by next_delivery with a timeout, and acks each."""

    async def service(shop: BlockingClient, member: BlockingClient) -> list[str]:
        results = await asyncio.gather(*(
            asyncio.to_thread(shop.send, f"gift {n}", to="r8-member", cid=f"gift-{n}")
            for n in range(20)))
        assert sorted(r.cid for r in results) == sorted(f"gift-{n}" for n in range(20))
        got: list[str] = []
        while len(got) < 20:
            d = await asyncio.to_thread(member.next_delivery, 1.0)
            if d is not None:
                got.append(d.body)
                await asyncio.to_thread(member.ack, d)
        return got

    with _connect(broker, "r8-shop") as shop, _connect(broker, "r8-member") as member:
        got = asyncio.run(asyncio.wait_for(service(shop, member), HANG_GUARD_S))
    assert sorted(got) == sorted(f"gift {n}" for n in range(20))


# Prints "waiting" once the main thread waits in a call (its stack holds the function
# sys.argv[3] names: trio's from_thread for a method, `_start` for `connect`), so that the
# parent's SIGINT lands in the call, not before it.
_ANNOUNCE = textwrap.dedent("""
    import sys, threading, time
    def announce():
        main = threading.main_thread().ident
        while True:
            frame, names = sys._current_frames().get(main), set()
            while frame is not None:
                names.add(frame.f_code.co_name)
                frame = frame.f_back
            if sys.argv[3] in names:
                print("waiting", flush=True)
                return
            time.sleep(0.01)
    threading.Thread(target=announce, daemon=True).start()
""")

_CHILD = _ANNOUNCE + textwrap.dedent("""
    from broker.client_blocking import connect
    with connect(sys.argv[1], sys.argv[2], "waiting", reconnect_timeout=None) as client:
        client.next_delivery()
""")


@pytest.mark.parametrize("blocked_in", ["next_delivery", "connect"])
def test_ctrl_c_while_a_call_blocks_ends_the_process(broker, blocked_in):
    """SIGINT to a process whose main thread waits in a call (next_delivery with nothing
    coming; connect to a port where nothing listens, retrying for ever) raises
    KeyboardInterrupt there, and the process exits, the client closed."""
    server, marker = broker.server, "_send_message_to_trio"
    if blocked_in == "connect":
        server, marker = f"127.0.0.1:{free_port()}", "_start"
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, server, broker.token("r9-alice"), marker],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert child.stdout.readline() == "waiting\n"
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=HANG_GUARD_S)
    finally:
        child.kill()
        child.wait()
    assert "KeyboardInterrupt" in err, err
    assert child.returncode in (1, -signal.SIGINT), err


_CHILD_CATCHES = _ANNOUNCE + textwrap.dedent("""
    from broker.client_blocking import connect
    with connect(sys.argv[1], sys.argv[2], "waiting") as client:
        try:
            client.next_delivery()
        except KeyboardInterrupt:
            print("interrupted", flush=True)
        sys.stdin.readline()  # the parent sent a message meanwhile
        d = client.next_delivery(timeout=30)
        print(d.body if d is not None else "lost", flush=True)
""")


def test_ctrl_c_cancels_the_call_it_interrupts(broker):
    """A Ctrl-C caught by the caller cancels the next_delivery it interrupted, in the trio
    thread: the next delivery goes to the next call, not to the one nobody waits for."""
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD_CATCHES, broker.server, broker.token("r10-bob"),
         "_send_message_to_trio"],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert child.stdout.readline() == "waiting\n"
        child.send_signal(signal.SIGINT)
        assert child.stdout.readline() == "interrupted\n"
        with _connect(broker, "r10-alice") as alice:
            alice.send("after the interrupt", to="r10-bob")
        out, err = child.communicate("go\n", timeout=2 * HANG_GUARD_S)
    finally:
        child.kill()
        child.wait()
    assert out == "after the interrupt\n", err
    assert child.returncode == 0, err


_CHILD_FORKS = textwrap.dedent("""
    import os, sys
    from broker.client_blocking import connect
    client = connect(sys.argv[1], sys.argv[2], "forked", deliver=False)
    pid = os.fork()
    if pid == 0:
        try:
            client.ping()
            print("the forked child was answered", flush=True)
        except RuntimeError as e:
            print("refused:", e, flush=True)
        client.close()
        os._exit(0)
    os.waitpid(pid, 0)
    client.ping()
    print("the parent was answered", flush=True)
    client.close()
""")


def test_a_client_used_after_a_fork_refuses_at_once(broker):
    """A client made before a fork (a pre-fork server's master) has no thread in the child:
    a call there raises RuntimeError at once rather than wait for ever, its close is a no-op,
    and the parent's client goes on."""
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD_FORKS, broker.server, broker.token("r11-alice")],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = child.communicate(timeout=HANG_GUARD_S)
    finally:  # the forked child too, should it hang
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    lines = out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("refused: "), (out, err)
    assert "connect in this process" in lines[0]
    assert lines[1] == "the parent was answered", (out, err)
    assert child.returncode == 0, err


def _examples() -> list[str]:
    """The Python blocks of docs/CLIENT.md's "From synchronous code and asyncio", in order."""
    text = (ROOT / "docs" / "CLIENT.md").read_text(encoding="utf-8")
    text = text.split("## From synchronous code and asyncio", 1)[1].split("\n## ", 1)[0]
    return [block.split("```", 1)[0] for block in text.split("```python\n")[1:]]


def _post(url: str) -> dict:
    request = urllib.request.Request(url, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=HANG_GUARD_S) as answer:
            return json.loads(answer.read())
    except urllib.error.HTTPError as refused:
        return json.loads(refused.read())


def test_the_examples_of_client_md_run_as_written(broker):
    """The web handler, the worker and the asyncio service of docs/CLIENT.md, run verbatim:
    the handler's send and its retry (a dup), a refusal, the service's three sends, all
    printed by the worker as it takes them."""
    web, worker, service = _examples()
    port = free_port()
    children: list[subprocess.Popen] = []

    def run(code: str, user: str, role: str = "user") -> subprocess.Popen:
        return _run_example(code, broker, user, role, port, children)

    try:
        taker = run(worker, "member-42")
        run(web, "shop", "service")
        url = f"http://127.0.0.1:{port}/returned?hold=991&member=member-42"
        assert wait_until_sync(lambda: _can_connect(port))
        assert _post(url) == {"conv": "dm:member-42:shop", "seq": 1, "dup": False}
        assert _post(url) == {"conv": "dm:member-42:shop", "seq": 1, "dup": True}
        assert _post(url.replace("member-42", "no%20one"))["error"] == "invalid"
        gifts = run(service, "gifts", "service")
        sent = sorted(gifts.stdout.readline().split() for _ in range(3))
        assert [s[0] for s in sent] == [f"gift-{n}-shipped" for n in (1, 2, 3)]
        assert sorted(s[1] for s in sent) == ["1", "2", "3"] and {s[2] for s in sent} == {"False"}
        taken = [taker.stdout.readline().split(maxsplit=3) for _ in range(4)]
        assert taken[0][1:] == ["dm:member-42:shop", "shop", "Your reserved book is back\n"]
        assert sorted(t[1:] for t in taken[1:]) == [
            ["dm:gifts:member-42", "gifts", f"Gift {n} is on its way\n"] for n in (1, 2, 3)]
    finally:
        for child in children:
            child.kill()
            child.communicate()


def _run_example(code: str, bp: BrokerProcess, user: str, role: str, port: int,
                 children: list[subprocess.Popen]) -> subprocess.Popen:
    """`code` run in a child process as the guide says, HOMING_SERVER, HOMING_TOKEN (of
    `user` as `role`) and PORT set; added to `children`, which the caller kills."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PORT": str(port),
           "HOMING_SERVER": bp.server, "HOMING_TOKEN": bp.token(user, role)}
    child = subprocess.Popen([sys.executable, "-c", code], env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    children.append(child)
    return child


# Run before an example: `connect` without a `reconnect_timeout` of its own gives up after 1 s,
# not the default 30, so that a test's outage of 2 s stands for one longer than the default.
SHORT_DEFAULT = textwrap.dedent("""\
    import broker.client_blocking as _blocking
    _connect = _blocking.connect
    def _connect_short(*args, **options):
        options.setdefault("reconnect_timeout", 1.0)
        return _connect(*args, **options)
    _blocking.connect = _connect_short
""")


def test_the_web_handler_of_client_md_answers_again_after_a_long_outage(tmp_path):
    """The guide's web handler, its broker SIGKILLed for longer than the client's
    reconnect_timeout and started again on the same data directory, answers the next request
    200 (it used to answer 503 for every request from then on: its one client had given up
    for good, though the broker was back)."""
    web = _examples()[0]
    port, children = free_port(), []
    with BrokerProcess(tmp_path / "data") as bp:
        try:
            handler = _run_example(SHORT_DEFAULT + web, bp, "shop", "service", port, children)
            url = f"http://127.0.0.1:{port}/returned?hold=%d&member=member-42"
            assert wait_until_sync(lambda: _can_connect(port))
            assert _post(url % 1) == {"conv": "dm:member-42:shop", "seq": 1, "dup": False}
            bp.kill()
            time.sleep(2.0)  # past the 1 s: a client that gives up has given up
            bp.start()
            assert _post(url % 2) == {"conv": "dm:member-42:shop", "seq": 2, "dup": False}
            assert _post(url % 1) == {"conv": "dm:member-42:shop", "seq": 1, "dup": True}
            assert handler.poll() is None
        finally:
            for child in children:
                child.kill()
                child.communicate()


def _can_connect(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False
