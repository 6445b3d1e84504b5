"""bench.bench_audit at a small size: the mixed log it writes holds every kind it promises, and
the audits pass on it."""

from __future__ import annotations

from bench.bench_audit import build
from storage import audit
from storage.store import Store


def test_the_audit_bench_log_mixes_messages_groups_acks_and_marks_and_verifies(tmp_path):
    data = str(tmp_path / "data")
    last = build(data, 25_000)
    assert build(str(tmp_path / "again"), 25_000) == last  # seeded: the same log
    store = Store.open(data, readonly=True)
    try:
        counts = audit.stats(store)["by_type"]
        assert audit.verify_head(store)[0] == last >= 25_000
        assert audit.check_projections(store)[0] is None
    finally:
        store.close()
    assert counts["conv.created"] > 40 and counts["message.accepted"] > 3_000
    assert min(counts[kind] for kind in ("delivery.acked", "read.marked", "member.added",
                                         "member.removed")) > 0
