"""One thread's msgpack Packer serves every connection of that thread (protocol.connection
`_packer`): here a broker and its clients in one trio thread, over real loopback sockets."""

from __future__ import annotations

import pytest
import trio

from broker.client import ClientError
from tests.harness import running_broker


async def test_a_send_that_fails_to_pack_leaves_the_next_frames_of_others_whole(tmp_path):
    """alice's send whose body cannot be encoded (a lone surrogate after 60,000 characters)
    is refused `invalid` in her client, after part of it was packed; carol's send, packed next
    by the same thread's Packer, then the broker's result and delivery of it to bob, arrive
    whole the first time (no connection refused a frame, none reconnected), and alice's
    connection goes on."""
    with trio.fail_after(30):
        async with running_broker(tmp_path / "data") as h:
            async with h.client("alice") as alice, h.client("carol") as carol, \
                    h.client("bob") as bob:
                with pytest.raises(ClientError) as refused:
                    await alice.send("x" * 60_000 + "\udc80", to="bob", cid="broken")
                assert refused.value.name == "invalid" and "not UTF-8" in refused.value.message
                sent = await carol.send("whole", to="bob", cid="c-1")
                assert (sent.seq, sent.dup) == (1, False)
                got = await bob.deliveries().receive()
                assert (got.sender, got.body) == ("carol", "whole")
                again = await alice.send("after", to="bob", cid="a-1")
                assert again.seq == 1 and (await bob.deliveries().receive()).body == "after"
                # Whole the first time: a frame spoilt by the bytes left behind is refused
                # `bad_frame`, and the SDK's reconnect and resend would hide it.
                assert (alice.reconnects, carol.reconnects, bob.reconnects) == (0, 0, 0)
            assert not [e for e in h.logs if e["event"] == "frame_rejected"]
