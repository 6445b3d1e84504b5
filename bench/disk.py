"""What this machine's disk charges for a synced write: the cost under every group commit.

LMDB writes every page a transaction changed, then syncs (`fdatasync`). On a disk that charges
for each write request (most virtual disks), a commit of scattered pages costs several times one
of as many contiguous pages, so a broker's figures on a machine follow this probe as much as its
CPU. `homing bench` records it in its JSON (`environment.disk`) and prints it under the table;
`python -m bench.bench_storage` prints it first.
"""

from __future__ import annotations

import os
import random
import statistics
import tempfile
import time

PAGE = 4096  # LMDB's page size here (the OS page)
SPAN_PAGES = 16_384  # the scratch file the scattered writes land in: 64 MiB


def synced_writes(directory: str | None = None, pages: int = 64, reps: int = 60) -> dict:
    """Median ms of one synced write of 1 page, of `pages` scattered pages and of `pages`
    contiguous pages, in a scratch file in `directory` (the temporary directory by default,
    where the bench's data directories go); the file is written out first, so no write below
    allocates."""
    page = os.urandom(PAGE)
    rng = random.Random(1)
    with tempfile.TemporaryDirectory(dir=directory) as d:
        fd = os.open(os.path.join(d, "scratch"), os.O_RDWR | os.O_CREAT)
        try:
            block = bytes(PAGE * 256)
            for _ in range(SPAN_PAGES // 256):
                os.write(fd, block)
            os.fsync(fd)

            def timed(offsets: list[int], data: bytes) -> float:
                t0 = time.perf_counter()
                for offset in offsets:
                    os.pwrite(fd, data, offset * PAGE)
                os.fdatasync(fd)
                return (time.perf_counter() - t0) * 1000

            one = [timed([rng.randrange(SPAN_PAGES)], page) for _ in range(reps)]
            scattered = [timed(rng.sample(range(SPAN_PAGES), pages), page) for _ in range(reps)]
            contiguous = [timed([rng.randrange(SPAN_PAGES - pages)], page * pages)
                          for _ in range(reps)]
        finally:
            os.close(fd)
    return {"dir": directory or tempfile.gettempdir(), "pages": pages,
            "one_page_ms": round(statistics.median(one), 3),
            "scattered_ms": round(statistics.median(scattered), 3),
            "contiguous_ms": round(statistics.median(contiguous), 3)}


def describe(disk: dict) -> str:
    """One line for a terminal."""
    n = disk["pages"]
    return (f"disk ({disk['dir']}), one synced write: 1 page {disk['one_page_ms']:.2f} ms, "
            f"{n} scattered pages {disk['scattered_ms']:.2f} ms, {n} contiguous pages "
            f"{disk['contiguous_ms']:.2f} ms")
