"""Plain `ack()`s made at once by two trio tasks of one SDK client, against a real broker
process whose debug log names every ack frame it reads (`ack_received`).

Each checked its mark against the last ack made and wrote its frame, and only once written
counted it made: two at once both went out, the same mark twice, or the lower one after the
higher. The broker ignores an ack below its cursor, so nothing went wrong there; but a mark
that goes back is not what the SDK says it sends (acks rise), and each duplicate is a frame.
"""

from __future__ import annotations

import trio

from tests.procs import BrokerProcess

MESSAGES = 12


async def test_two_plain_acks_at_once_write_each_mark_once_and_never_a_lower_one(tmp_path):
    """Two tasks ack the same mark at once, then pairs of marks at once, the higher started
    first: the broker reads each mark once, in rising order (before: 2 twice in 10 runs of 10,
    and the lower mark after the higher in 23 of their 40 pairs)."""
    bp = BrokerProcess(tmp_path / "data", "--log-level", "debug")
    try:
        await bp.astart()
        with trio.fail_after(60):
            async with bp.client("shop") as shop:
                for i in range(MESSAGES):
                    await shop.send(f"n{i}", to="bob")
            async with bp.client("bob") as bob:
                deliveries = bob.deliveries()
                for _ in range(MESSAGES):
                    await deliveries.receive()
                for pair in ((2, 2), (4, 3), (6, 5), (8, 7), (10, 9)):
                    async with trio.open_nursery() as nursery:
                        for upto in pair:
                            nursery.start_soon(bob.ack, upto)
                await bob.ack(MESSAGES)
                await bob.ping()  # answered after the acks before it were read
            assert await bp.aterminate() == 0
    finally:
        bp.kill()
    marks = [e["upto"] for e in bp.log_events() if e["event"] == "ack_received"]
    # A pair whose lower mark the scheduler ran first writes both (3, then 4): rising still.
    assert marks == sorted(set(marks)), marks
    assert {2, 4, 6, 8, 10, MESSAGES} <= set(marks), marks
