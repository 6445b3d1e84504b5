"""The SDK's own client message ids: unique, time-ordered, and what the broker keys retries by."""

from __future__ import annotations

import re

import pytest
import trio

from broker.client import ClientError, new_cid
from tests.harness import running_broker


def test_fresh_ids_are_32_hex_digits_unique_and_sort_in_the_order_they_were_made():
    """10,000 ids in a row: each 32 lowercase hex digits, all distinct, already sorted."""
    ids = [new_cid() for _ in range(10_000)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)


async def test_a_send_without_a_cid_gets_a_fresh_one_that_makes_its_retry_a_duplicate(tmp_path):
    """The SDK picks the cid when none is given; sending again with it appends nothing."""
    with trio.fail_after(30):
        async with running_broker(tmp_path / "d") as h, h.client("shop", role="service") as shop:
            first = await shop.send("Your book is back", to="member-42")
            second = await shop.send("Your book is back", to="member-42")
            again = await shop.send("Your book is back", to="member-42", cid=first.cid)
    assert re.fullmatch(r"[0-9a-f]{32}", first.cid)
    assert first.cid < second.cid
    assert not first.dup and not second.dup and second.seq == first.seq + 1
    assert again.dup and (again.seq, again.lsn) == (first.seq, first.lsn)


async def test_an_empty_cid_is_refused_not_replaced_by_a_fresh_one(tmp_path):
    """A cid of the caller's is what makes its retry safe (docs/CLIENT.md), and the protocol's
    cid is 1 to 128 characters: an empty one is a field the protocol refuses, which the SDK
    raises as `invalid`, unsent. It was taken for "no cid" and replaced by a fresh one, so the
    send went through, and each retry with the same empty cid appended the message again."""
    with trio.fail_after(30):
        async with running_broker(tmp_path / "d") as h, h.client("shop", role="service") as shop:
            for _ in range(2):  # a first try, and its retry
                with pytest.raises(ClientError) as refused:
                    await shop.send("Order 1139 is ready", to="member-42", cid="")
                assert (refused.value.name, refused.value.code) == ("invalid", 7)
                assert "'cid'" in refused.value.message
            assert h.broker.store.inbox_head("member-42") == 0  # nothing was appended
            assert (await shop.send("still fine", to="member-42")).seq == 1


async def test_members_given_as_one_string_are_refused_not_spelled_out(tmp_path):
    """`create_group("g", "bob")` made a group of the users "b" and "o" (a str is a sequence of
    letters): the SDK refuses a str for `members` with a TypeError, unsent."""
    with trio.fail_after(30):
        async with running_broker(tmp_path / "d") as h, h.client("shop", role="service") as shop:
            with pytest.raises(TypeError, match=r"\['bob'\] for one member"):
                await shop.create_group("g", "bob")
            assert (await shop.members(await shop.create_group("none", None))).members == ()
            conv = await shop.create_group("g", ["bob"])
            assert (await shop.members(conv)).members == ("bob",)
            assert h.broker.store.user_convs("b") == []
