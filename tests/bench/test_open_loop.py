"""The open loop's writes (bench/loadgen.py): never blocking, nothing lost when a socket is full."""

from __future__ import annotations

import select
import socket

import pytest

from bench.loadgen import _flush, _Out, _write


@pytest.fixture
def wire_pair():
    """(epoll watching our non-blocking end for reads, our end's `_Out`, the peer's socket)."""
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    ep = select.epoll()
    ep.register(ours.fileno(), select.EPOLLIN)
    yield ep, _Out(ours.fileno()), peer
    ep.close()
    ours.close()
    peer.close()


def test_a_write_the_socket_cannot_take_waits_for_room_and_arrives_whole(wire_pair):
    """A write larger than the socket takes is kept, watched for room (EPOLLOUT) and finished as
    the peer reads; once all is out the socket is watched for reads only again."""
    ep, out, peer = wire_pair
    data = bytes(range(256)) * 40_000  # 10 MB: more than a socket buffer holds
    _write(ep, out, data)
    assert out.buf and out.watching  # part of it is waiting for room
    _write(ep, out, b"tail")  # queued behind it, not written ahead of it
    received = bytearray()
    while out.watching:
        received += peer.recv(1 << 20)
        for fd, events in ep.poll(1.0):
            assert fd == out.fd
            if events & select.EPOLLOUT:
                _flush(ep, out)
    peer.settimeout(1.0)
    while len(received) < len(data) + 4:
        received += peer.recv(1 << 20)
    assert bytes(received) == data + b"tail"
    assert not out.buf
    assert ep.poll(0.05) == []  # no longer woken for room it does not need


def test_a_write_the_socket_takes_at_once_is_not_watched(wire_pair):
    ep, out, peer = wire_pair
    _write(ep, out, b"ack")
    assert not out.buf and not out.watching
    assert peer.recv(16) == b"ack"
