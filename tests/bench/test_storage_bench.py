"""bench.bench_storage at tiny sizes: its figures come out, and they mean what they say."""

from __future__ import annotations

import math

import trio

from bench.bench_storage import (
    NoWorkStore,
    _group_commit,
    coordinator_alone,
    group_commit,
    service_burst,
    store_alone,
    written_bytes,
)
from bench.disk import describe, synced_writes


def test_the_disk_probe_times_each_kind_of_synced_write(tmp_path):
    """One page, scattered pages and contiguous pages each take a positive time, in the
    directory asked for, and the line for the terminal names them."""
    disk = synced_writes(str(tmp_path), pages=8, reps=3)
    assert disk["dir"] == str(tmp_path) and disk["pages"] == 8
    assert all(0 < disk[k] < 10_000 for k in ("one_page_ms", "scattered_ms", "contiguous_ms"))
    assert "8 scattered pages" in describe(disk)
    assert list(tmp_path.iterdir()) == []  # the scratch file is gone


def test_group_commit_says_how_many_events_and_pages_a_commit_held():
    """8 appenders with 4 events in flight: every event durable; a commit holds 1 to 32 events
    and writes at least a page (the log's own) wherever the process's written bytes are known."""
    before = written_bytes()
    rate, stall, events, pages = group_commit(8, 40, 4)
    assert rate > 0 and stall >= 0
    assert 1 <= events <= 32
    if math.isnan(before):  # no /proc/self/io here: the figure says it is unknown
        assert math.isnan(pages)
    else:
        assert written_bytes() > before
        assert pages >= 1


def test_a_service_burst_with_time_ordered_cids_writes_fewer_pages_than_random_ones():
    """16 sends of one sender a commit: the SDK's time-ordered cids touch one tail of the
    idempotency index where random ones touch a page each (page counts, not times)."""
    if math.isnan(written_bytes()):
        return  # no /proc/self/io: pages are not counted here
    _, random_pages = service_burst("random", commits=400)
    _, ordered_pages = service_burst("ordered", commits=400)
    assert ordered_pages < random_pages - 5, (ordered_pages, random_pages)


def test_the_coordinator_alone_takes_every_event_through_the_committer():
    """With a store that does no work, 8 appenders with 4 in flight get all 320 events an LSN,
    in batches of 1 to 32, and the line's figure is a rate."""
    store = NoWorkStore()
    rate, stall, events, _ = trio.run(_group_commit, store, 8, 40, 4)
    assert store.last_lsn() == 320 and rate > 0 and stall >= 0 and 1 <= events <= 32
    assert coordinator_alone(8, 40, 4) > 0


def test_the_store_alone_executes_every_batch_durably():
    """Batches of 16 sends through `Store.execute` alone (each a durable commit): a rate."""
    assert store_alone(16, batches=5, appenders=8) > 0
