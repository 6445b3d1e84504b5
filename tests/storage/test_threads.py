"""Store use from several threads: writers serialise, readers never block or see torn state."""

from __future__ import annotations

import threading

from storage.commands import SendMessage


def test_concurrent_execute_and_reads(store):
    """Batches executed from 4 threads get gapless LSNs while a reader thread polls the inbox."""
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer(w: int) -> None:
        try:
            for b in range(25):
                outs = store.execute([SendMessage(f"w{w}", "d", "user", f"{b}-{i}", "x",
                                                  to="sink") for i in range(10)])
                assert all(o.error is None for o in outs)
        except BaseException as exc:
            errors.append(exc)

    def reader() -> None:
        try:
            while not stop.is_set():
                head = store.inbox_head("sink")
                items = store.inbox_after("sink", 0, 10_000)
                assert len(items) >= head
                assert [i.inbox_seq for i in items] == list(range(1, len(items) + 1))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    poll = threading.Thread(target=reader)
    poll.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    poll.join()
    assert not errors
    assert store.inbox_head("sink") == 1000
    assert store.verify_log() == store.last_lsn() == 1000 + 4 * 3
    assert store.check_projections() is None
