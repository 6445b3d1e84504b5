"""An SDK `send` without a cid that fails with its outcome unknown: a review of sending
(2026-12-05), run against a real broker process.

The broker takes the send, then stops answering (SIGSTOP) before its commit; the client gives
up (`reconnect_timeout`) and `send` raises ConnectionLost, and the broker, let go, commits the
send it had queued. The caller had no cid to send it again with (the SDK made it), and a retry
without one appended the message a second time. Now the exception names the cid (`.cid`).
"""

from __future__ import annotations

import signal

import pytest
import trio

import protocol as wire
from broker.client import ClientError, ConnectionLost, open_client
from tests.faults.conftest import RawClient
from tests.procs import BrokerProcess
from tests.stalls import committing, conversation_bodies, held_commits, queued_behind


async def _until(check, timeout: float = 30.0) -> None:
    with trio.fail_after(timeout):
        while not check():
            await trio.sleep(0.05)


async def test_sends_given_up_on_name_their_cids_and_a_retry_with_them_is_a_dup(tmp_path):
    """Two `send(body, to=...)` (no cid) that raise ConnectionLost after the broker took them
    (the one error that stopped the client, raised to both): the messages are committed all the
    same; each exception carries its own send's cid, sent again it is a dup, and the
    conversation holds each message once."""
    bodies = ["order 7 shipped", "order 8 shipped"]
    with BrokerProcess(tmp_path / "data", "--heartbeat", "1", "--stats-interval", "1") as bp:
        blocker = await RawClient.connect(bp.server, bp.token("ann"), "d1")
        failed: dict[str, BaseException] = {}
        async with held_commits(bp.data):
            # A batch of its own, held at its commit: the SDK's sends queue behind it.
            await blocker.send(wire.Send(id=1, cid="blocker", body="first", to="bob"))
            await _until(lambda: committing(bp, 1))
            async with open_client(bp.server, bp.token("shop"), "d1",
                                   reconnect_timeout=1) as client:

                async def send(body: str) -> None:
                    try:
                        await client.send(body, to="bob")
                    except ConnectionLost as exc:
                        failed[body] = exc

                async with trio.open_nursery() as nursery:
                    for body in bodies:
                        nursery.start_soon(send, body)
                    await _until(lambda: queued_behind(bp, 2))
                    bp.proc.send_signal(signal.SIGSTOP)  # nothing answered: the client gives up
                    try:
                        await _until(lambda: len(failed) == 2, 60)
                    finally:
                        bp.proc.send_signal(signal.SIGCONT)
                with pytest.raises(ConnectionLost) as later:  # stopped: a later call, unsent
                    await client.receipts("dm:bob:shop", 1)
                assert later.value.cid is None  # not a send's: the shared error has none
        await blocker.aclose()
        cids = {body: exc.cid for body, exc in failed.items()}
        assert all(cids.values()) and len(set(cids.values())) == 2, cids
        await _until_committed(bp, bodies)
        async with open_client(bp.server, bp.token("shop"), "d1") as client:
            for body, cid in cids.items():
                again = await client.send(body, to="bob", cid=cid)
                assert again.dup is True, (body, again)
        history = await conversation_bodies(bp, "shop", "dm:bob:shop")
        assert sorted(history) == sorted(bodies), history


async def test_a_refused_send_carries_no_cid(tmp_path):
    """A send the broker refused (to a conversation the sender is not in) did nothing: its
    ClientError has no cid to send again with."""
    with BrokerProcess(tmp_path / "data") as bp:
        async with open_client(bp.server, bp.token("shop"), "d1") as client:
            with pytest.raises(ClientError) as refused:
                await client.send("hello", conv="dm:ann:bob")
    assert refused.value.name in ("forbidden", "not_found"), refused.value
    assert refused.value.cid is None


async def _until_committed(bp: BrokerProcess, bodies: list[str]) -> None:
    with trio.fail_after(30):
        while len(await conversation_bodies(bp, "shop", "dm:bob:shop")) < len(bodies):
            await trio.sleep(0.05)


def test_the_error_a_send_raises_is_a_copy_with_the_same_type_and_fields():
    """The copy a send raises (of a ClientError in UNSURE, a BrokerUnavailable) is of the
    error's type with its fields and the send's cid, and the error it copies, which other calls
    may be raised, keeps no cid."""
    from broker.client import UNSURE, BrokerUnavailable, _with_cid

    refusal = ClientError(wire.ErrorCode.SHUTTING_DOWN, "shutting_down", "going away")
    assert refusal.name in UNSURE
    lost = BrokerUnavailable("gave up", refusal)
    for error in (refusal, lost):
        copy = _with_cid(error, "c1")
        assert type(copy) is type(error) and copy is not error
        assert (copy.args, copy.cid, error.cid) == (error.args, "c1", None)
        assert {k: v for k, v in vars(copy).items() if k != "cid"} == vars(error)
    assert str(_with_cid(refusal, "c1")) == "shutting_down: going away"
