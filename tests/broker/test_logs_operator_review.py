"""The broker's log read by the operator on call, situation by situation: a real `homing serve`
child, its JSON lines read back as the operator's `jq` would read them.

- an expired token's `auth_failed` names whose token it was: its signature was verified
  before its expiry was looked at, so its user is known (a forged one's is not);
- `broker_stopping` says which signal stopped the broker;
- requests refused `rate_limited` show in `broker_stats` (`rate_limited_per_s`): a line per
  refusal would flood the log, none left the operator blind to clients being throttled;
- `connection_closed` counts the frames the protocol refused (`frames_rejected`).
"""

from __future__ import annotations

import hashlib
import hmac
import signal
import struct
import time

import msgpack
import trio

import protocol as wire
from broker import tokens
from broker.client import ClientError, open_client
from tests.faults.conftest import RawClient
from tests.procs import BrokerProcess


def _expired_token(secret: bytes, user: str) -> str:
    """A genuine token of `user`, signed with `secret`, that expired a minute ago (as
    `tokens.issue` makes them, with its expiry in the past)."""
    now = int(time.time())
    body = tokens._b64(msgpack.packb({"u": user, "r": "user", "e": now - 60, "i": now - 3600,
                                      "k": tokens.key_id(secret)}))
    mac = hmac.new(secret, b"v1." + body.encode("ascii"), hashlib.sha256).digest()
    return f"v1.{body}.{tokens._b64(mac)}"


async def _wait_event(bp: BrokerProcess, name: str, n: int = 1) -> list[dict]:
    """The broker's `name` lines, once there are `n` of them."""
    with trio.fail_after(20):
        while len(found := [e for e in bp.log_events() if e["event"] == name]) < n:
            await trio.sleep(0.02)
    return found


async def test_an_expired_tokens_auth_failed_names_its_user(tmp_path):
    """A genuine but expired token is logged with the user it was minted for (a user whose bot
    runs on a token that ran out), a forged one without a user."""
    bp = BrokerProcess(tmp_path / "data")
    try:
        await bp.astart()
        for token in (_expired_token(bp.secret, "dave"), bp.token("eve")[:-4] + "AAAA"):
            try:
                async with open_client(bp.server, token, "bot", reconnect=False):
                    raise AssertionError("a refused token was welcome")
            except ClientError as exc:
                assert exc.name == "unauthorized", exc
        expired, forged = await _wait_event(bp, "auth_failed", 2)
        assert expired["reason"].startswith("token expired at"), expired
        assert expired["user"] == "dave", expired
        assert expired["device"] == "bot", expired
        assert "user" not in forged, forged  # not signed by us: its claims are anyone's
        # The connections' closing lines say the same (user and device null until 2026-12-06).
        closed = [e for e in await _wait_event(bp, "connection_closed", 3)  # and astart's probe
                  if e["reason"] == "auth_failed"]
        assert [(e["user"], e["device"], e["reason"]) for e in closed] == [
            ("dave", "bot", "auth_failed"), (None, "bot", "auth_failed")], closed
        assert await bp.aterminate() == 0
    finally:
        bp.kill()


async def test_broker_stopping_names_the_signal(tmp_path):
    """The operator reading `broker_stopping` learns what stopped the broker: SIGTERM (systemd,
    kill), SIGINT (Ctrl-C) or SIGHUP (its terminal closed)."""
    # SIGHUP's default action in the child: under `nohup` (a whole-suite run, say) it inherits
    # SIGHUP ignored, and rightly keeps ignoring it (docs/OPERATIONS.md).
    bp = BrokerProcess(tmp_path / "data",
                       preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    try:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            await bp.astart()
            bp.proc.send_signal(sig)
            assert await trio.to_thread.run_sync(bp.proc.wait, 20) == 0
            stopping = (await _wait_event(bp, "broker_stopping", bp.starts))[-1]
            assert stopping["signal"] == sig.name, stopping
    finally:
        bp.kill()


async def test_rate_limited_requests_show_in_broker_stats(tmp_path):
    """Sends past `--send-rate` and membership changes past `--change-rate`, refused
    `rate_limited`, are counted in the next `broker_stats` line."""
    bp = BrokerProcess(tmp_path / "data", "--send-rate", "2", "--change-rate", "2",
                       "--stats-interval", "1")
    try:
        await bp.astart()
        refused = 0
        async with bp.client("alice") as a:
            conv = await a.create_group("team", ["bob"])
            while refused < 3:
                try:
                    await a.send("hi", to="bob")
                except ClientError as exc:
                    assert exc.name == "rate_limited", exc
                    refused += 1
            while refused < 6:
                try:
                    await a.mute(conv, refused % 2 == 0)
                except ClientError as exc:
                    assert exc.name == "rate_limited", exc
                    refused += 1
        with trio.fail_after(20):
            while not any(e.get("rate_limited_per_s", 0) > 0 for e in bp.log_events()
                          if e["event"] == "broker_stats"):
                await trio.sleep(0.05)
        assert await bp.aterminate() == 0
    finally:
        bp.kill()


async def test_connection_closed_counts_the_frames_it_refused(tmp_path):
    """A client whose frames are refused one by one (an unknown type, a field of the wrong
    kind: each answered with an error frame, no line of its own) shows them in its
    `connection_closed`, `frames_rejected`; `frames_in` said 0, as if it had sent nothing."""
    bp = BrokerProcess(tmp_path / "data")
    try:
        await bp.astart()
        raw = await RawClient.connect(bp.server, bp.token("mallory"), "probe")
        for frame in ({"t": "no_such_frame", "id": 5},
                      {"t": "send", "id": 6, "to": "Not A User", "body": "b", "cid": "c"}):
            body = msgpack.packb(frame)
            await raw.stream.send_all(struct.pack(">I", len(body)) + body)
            reply = await raw.reply(frame["id"])
            assert isinstance(reply, wire.Error) and not reply.close, reply
        await raw.aclose()
        with trio.fail_after(20):  # (the first is the start's probe of the port)
            while not (closed := [e for e in bp.log_events() if e["event"] ==
                                  "connection_closed" and e["user"] == "mallory"]):
                await trio.sleep(0.02)
        closed, = closed
        assert closed["frames_rejected"] == 2, closed
        assert await bp.aterminate() == 0
    finally:
        bp.kill()
