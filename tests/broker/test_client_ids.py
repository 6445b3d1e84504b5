"""The SDK's own client message ids: unique, time-ordered, and what the broker keys retries by."""

from __future__ import annotations

import re

import trio

from broker.client import new_cid
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
