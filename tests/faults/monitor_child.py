"""A monitor's checks in a loop, as a child process of their own: for tests that time them
while their own process is busy (tests/faults/test_storm.py). Every `every` seconds (each in a
task of its own, so that a slow one does not delay the next) it connects, says a requests-only
hello with the token and asks `stats`, as `homing health` does, and prints one JSON line:
`{"refused": error name or null, "ms": connect to answer (a refusal too), or null if none
within 10 s}`. It stops at SIGTERM.

    python -m tests.faults.monitor_child HOST:PORT TOKEN EVERY_S
"""

from __future__ import annotations

import json
import sys
import time

import trio

import protocol as wire

TIMEOUT_S = 10.0


async def _next(stream: trio.abc.Stream, conn: wire.Connection) -> object:
    while (frame := conn.next_event()) is wire.NEED_DATA:
        conn.receive_data(await stream.receive_some(65536))
    return frame


async def answer(host: str, port: int, token: str, hello: object = None) -> dict:
    """One check: `{"refused": ..., "ms": ...}` as printed. `hello`: another hello to say
    (a device's: its `welcome` counts as the answer)."""
    began = time.monotonic()
    refused = ms = None
    stream = None
    try:
        with trio.move_on_after(TIMEOUT_S):
            stream = await trio.open_tcp_stream(host, port)
            conn = wire.Connection(wire.Role.CLIENT)
            await stream.send_all(conn.send(hello or wire.Hello(
                versions=(1,), token=token, device="probe", id=0, deliver=False)))
            frame = await _next(stream, conn)
            if isinstance(frame, wire.Welcome) and hello is None:
                conn.max_frame_bytes = frame.max_frame
                await stream.send_all(conn.send(wire.Stats(id=1)))
                frame = await _next(stream, conn)
            ms = round((time.monotonic() - began) * 1000, 1)
            if isinstance(frame, wire.Error):
                refused = frame.name
            elif not isinstance(frame, (wire.BrokerStats, wire.Welcome)):
                refused = repr(frame)[:80]
    except (OSError, trio.BrokenResourceError) as exc:
        refused = repr(exc)[:80]
    finally:
        if stream is not None:
            await trio.aclose_forcefully(stream)
    return {"refused": refused, "ms": ms}


async def check(host: str, port: int, token: str) -> None:
    print(json.dumps(await answer(host, port, token)), flush=True)


async def main(server: str, token: str, every: float) -> None:
    host, port = server.rsplit(":", 1)
    async with trio.open_nursery() as nursery:
        while True:
            nursery.start_soon(check, host, int(port), token)
            await trio.sleep(every)


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2], float(sys.argv[3]))
