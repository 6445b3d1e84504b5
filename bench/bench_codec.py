"""Codec benchmark: decode+validate rate of `send` frames, encode rate of `deliver` frames.

Run ``python -m bench.bench_codec [--frames N] [--runs R]``. A server `Connection` is fed
pre-encoded ``send`` frames with 200-byte bodies (fixed seed) in 64 KiB chunks, drained fully
after each chunk, as the broker does; a server connection then encodes ``deliver`` frames. Each
figure is the median of R runs, printed beside raw ``msgpack.unpackb`` / ``packb`` on the same
maps as the ceiling. Target: at least 300,000 frames/s decoded and validated on one core.
"""

from __future__ import annotations

import argparse
import random
import statistics
import string
import time

import msgpack

from protocol import (
    DEFAULT_MAX_FRAME_VALUES,
    NEED_DATA,
    Connection,
    Deliver,
    Hello,
    Role,
    Send,
    Welcome,
)

CHUNK_BYTES = 64 * 1024
BODY_CHARS = 200
SEED = 20240501


def _open_pair() -> tuple[Connection, Connection]:
    # The server bounds each frame's values, as `homing serve` does by default.
    client = Connection(Role.CLIENT)
    server = Connection(Role.SERVER, max_frame_values=DEFAULT_MAX_FRAME_VALUES)
    server.receive_data(client.send(Hello(versions=(1,), token="t", device="bench")))
    server.next_event()
    client.receive_data(
        server.send(Welcome(1, "s", "bench", 0, server.max_frame_bytes, 30, 0, 0, ()))
    )
    client.next_event()
    return client, server


def _sends(n: int, rng: random.Random) -> list[Send]:
    letters = string.ascii_letters + string.digits
    convs = [f"grp:{rng.getrandbits(64):016x}" for _ in range(64)]
    out = []
    for i in range(n):
        body = "".join(rng.choices(letters, k=BODY_CHARS))
        if i % 4:
            out.append(Send(id=i, cid=f"c-{i:08d}", body=body, conv=rng.choice(convs)))
        else:
            out.append(Send(id=i, cid=f"c-{i:08d}", body=body, to=f"user{rng.randrange(1000)}"))
    return out


def _delivers(n: int, rng: random.Random) -> list[Deliver]:
    letters = string.ascii_letters + string.digits
    body = "".join(rng.choices(letters, k=BODY_CHARS))
    conv = f"grp:{rng.getrandbits(64):016x}"
    return [
        Deliver(i + 1, "msg", conv, i + 1, "alice", body, f"c-{i:08d}", 1_700_000_000_000_000 + i)
        for i in range(n)
    ]


def _chunks(data: bytes) -> list[bytes]:
    return [data[i : i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)]


def bench_decode(chunks: list[bytes], n: int) -> float:
    """Frames/s through receive_data + next_event on a fresh open server connection."""
    _, server = _open_pair()
    receive, next_event = server.receive_data, server.next_event
    got = 0
    start = time.perf_counter()
    for chunk in chunks:
        receive(chunk)
        while next_event() is not NEED_DATA:
            got += 1
    elapsed = time.perf_counter() - start
    assert got == n, (got, n)
    return n / elapsed


def bench_unpackb(bodies: list[bytes]) -> float:
    """Frames/s of bare msgpack.unpackb on the same bodies (the ceiling)."""
    unpackb = msgpack.unpackb
    start = time.perf_counter()
    for b in bodies:
        unpackb(b)
    return len(bodies) / (time.perf_counter() - start)


def bench_encode(frames: list[Deliver]) -> float:
    """Frames/s through Connection.send (checked) for deliver frames."""
    _, server = _open_pair()
    send = server.send
    start = time.perf_counter()
    for fr in frames:
        send(fr)
    return len(frames) / (time.perf_counter() - start)


def bench_packb(maps: list[dict]) -> float:
    """Frames/s of bare msgpack.packb on the same maps (the ceiling)."""
    packb = msgpack.packb
    start = time.perf_counter()
    for m in maps:
        packb(m, use_bin_type=True)
    return len(maps) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    rng = random.Random(SEED)
    client, _ = _open_pair()
    sends = _sends(args.frames, rng)
    encoded = [client.send(fr) for fr in sends]
    stream = b"".join(encoded)
    chunks = _chunks(stream)
    bodies = [e[4:] for e in encoded]
    delivers = _delivers(args.frames, rng)
    _, server = _open_pair()
    deliver_maps = [msgpack.unpackb(server.send(d)[4:]) for d in delivers]

    def median(fn, *a) -> float:
        return statistics.median(fn(*a) for _ in range(args.runs))

    print(f"frames={args.frames} runs={args.runs} chunk={CHUNK_BYTES} "
          f"send frame={len(encoded[1])} bytes (median of runs)")
    dec, raw_dec = median(bench_decode, chunks, args.frames), median(bench_unpackb, bodies)
    enc, raw_enc = median(bench_encode, delivers), median(bench_packb, deliver_maps)
    print(f"decode+validate send:  {dec:>12,.0f} frames/s   (msgpack.unpackb ceiling "
          f"{raw_dec:,.0f}/s, {dec / raw_dec:.0%})")
    print(f"encode+validate deliver:{enc:>11,.0f} frames/s   (msgpack.packb ceiling "
          f"{raw_enc:,.0f}/s, {enc / raw_enc:.0%})")


if __name__ == "__main__":
    main()
