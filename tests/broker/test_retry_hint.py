"""A `rate_limited` refusal says when the rate that refused it allows the request again.

Before, the error said "slow down" and nothing more: a bot refused by `--user-send-rate` could
only guess how long to wait (the `homing` command doubled a pause from 50 ms). The broker knows
its token buckets: `retry_ms` is the time until the refusing bucket holds a token again."""

from __future__ import annotations

import pytest
import trio

import protocol as wire
from broker.client import ClientError
from tests.faults.conftest import RawClient
from tests.harness import running_broker


def _send(i: int) -> wire.Send:
    return wire.Send(id=i, cid=f"c{i}", body="stock check", to="store-1")


async def test_a_send_refused_by_a_rate_says_when_to_retry_and_is_allowed_then(tmp_path):
    # 2 sends a second for the user, a burst of 2: the third at once is refused, and its
    # retry_ms is the half second a token takes (less the little time gone by).
    async with running_broker(tmp_path / "data", sends_per_s_per_user=2.0) as h:
        raw = await RawClient.connect(h.server, h.token("hq"))
        for i in (1, 2):
            await raw.send(_send(i))
            assert isinstance(await raw.reply(i), wire.Result)
        await raw.send(_send(3))
        refused = await raw.reply(3)
        assert isinstance(refused, wire.Error) and refused.name == "rate_limited", refused
        assert refused.retry_ms is not None and 1 <= refused.retry_ms <= 500, refused
        # Waiting that long is enough: the same send is accepted (nothing else spends tokens).
        await trio.sleep(refused.retry_ms / 1000)
        await raw.send(_send(3))
        assert isinstance(await raw.reply(3), wire.Result)
        await raw.aclose()


async def test_a_connection_rate_and_a_membership_change_rate_say_it_too(tmp_path):
    async with running_broker(tmp_path / "data", sends_per_s_per_connection=1.0,
                              changes_per_s_per_user=1.0) as h:
        raw = await RawClient.connect(h.server, h.token("hq"))
        await raw.send(_send(1))
        assert isinstance(await raw.reply(1), wire.Result)
        await raw.send(_send(2))
        refused = await raw.reply(2)
        assert refused.name == "rate_limited" and 1 <= refused.retry_ms <= 1000, refused
        await raw.send(wire.Create(id=3, kind="group", name="a"))
        assert isinstance(await raw.reply(3), wire.Created)
        await raw.send(wire.Create(id=4, kind="group", name="b"))
        refused = await raw.reply(4)
        assert refused.name == "rate_limited" and 1 <= refused.retry_ms <= 1000, refused
        # Other refusals carry no hint: retrying them later changes nothing.
        await raw.send(wire.Receipts(id=5, conv="dm:hq:store-9", seq=1))
        other = await raw.reply(5)
        assert other.name == "forbidden" and other.retry_ms is None, other
        await raw.aclose()


async def test_the_sdk_error_carries_it_as_seconds(tmp_path):
    """`ClientError.retry_after` is the broker's `retry_ms` in seconds; a send again after it,
    with the same cid, is accepted (docs/CLIENT.md)."""
    async with running_broker(tmp_path / "data", sends_per_s_per_user=2.0) as h, \
            h.client("hq") as hq:
        for i in (1, 2):
            await hq.send("stock check", to="store-1", cid=f"c{i}")
        with pytest.raises(ClientError) as refused:
            await hq.send("stock check", to="store-1", cid="c3")
        wait = refused.value.retry_after
        assert refused.value.name == "rate_limited" and 0 < wait <= 0.5, refused.value
        await trio.sleep(wait)
        assert (await hq.send("stock check", to="store-1", cid="c3")).dup is False
