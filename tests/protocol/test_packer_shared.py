"""The per-thread msgpack Packer (protocol.connection._packer) is shared by every connection of
a thread: a frame that fails part-way through its pack must leave nothing behind in it."""

import threading

import pytest

from protocol import LocalProtocolError, Send

from .helpers import ConnectionPair

# Packed in field order: the map's head, "t", "id" and "cid" go into the Packer's buffer before
# the body fails to encode (a lone surrogate: text made from bytes that were not UTF-8).
BROKEN = Send(id=1, cid="c-1", body="x" * 60_000 + "\udc80", to="bob")
GOOD = Send(id=2, cid="c-2", body="hello", to="bob")


def test_a_frame_that_fails_mid_pack_leaves_the_next_frame_of_another_connection_whole():
    """After a send whose body cannot be encoded (a lone surrogate at its end, after the
    fields before it were packed) fails on one connection, the next frame of another connection
    in the same thread arrives exactly as sent, and so does the failed one's next."""
    one, other = ConnectionPair().open(), ConnectionPair().open()
    with pytest.raises(LocalProtocolError, match="not UTF-8"):
        one.client.send(BROKEN)
    assert other.send(other.client, GOOD) == [GOOD]
    assert one.send(one.client, GOOD) == [GOOD]


def test_a_failed_pack_in_one_thread_leaves_another_threads_frames_whole():
    """Connections in two threads (the blocking client's trio thread and an application's),
    one failing to pack over and over, the other packing: every frame of the other arrives."""
    failing, packing = ConnectionPair().open(), ConnectionPair().open()
    stop = threading.Event()

    def fail_repeatedly() -> None:
        while not stop.is_set():
            with pytest.raises(LocalProtocolError):
                failing.client.send(BROKEN)

    thread = threading.Thread(target=fail_repeatedly)
    thread.start()
    try:
        for i in range(2_000):
            frame = GOOD._replace(id=i + 1, cid=f"c-{i}")
            assert packing.send(packing.client, frame) == [frame]
    finally:
        stop.set()
        thread.join()
