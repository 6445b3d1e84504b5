"""`failing` (`homing health`'s verdict, docs/PROTOCOL.md `broker_stats`) is about commits:
the last one failed (a full disk). A command that meets a damaged projection row fails alone,
whether its batch held it alone or was split around it (broker/isolate.py): the broker goes on
committing, so it is not `failing` (an audit finds the row: docs/OPERATIONS.md, "Auditing")."""

from __future__ import annotations

from storage.errors import CorruptProjection
from tests.broker.test_batch_split import _damaged, _one_batch, _send


async def test_a_damaged_row_met_alone_or_in_a_split_batch_is_not_failing(tmp_path):
    """bob's send to alice, whose inbox head is damaged, fails with CorruptProjection in a batch
    of its own, then in a batch with carol's send (split): each time `failing` stays false, as
    the split's commit of carol's send leaves it, and `failed` counts both."""
    store = _damaged(tmp_path / "d", "inbox_head", b"alice", b"\x00\x02")
    try:
        [bad], _, _ = await _one_batch(store, [_send("bob", "bad1", "alice")])
        assert isinstance(bad.error, CorruptProjection)
        alone = store.committer
        assert (alone.failing, alone.failed) == (False, 1)

        pending, _, _ = await _one_batch(store, [_send("carol", "k1", "dave"),
                                                 _send("bob", "bad2", "alice")])
        assert pending[0].error is None and isinstance(pending[1].error, CorruptProjection)
        split = store.committer
        assert (split.failing, split.failed) == (False, 1)
    finally:
        store.close()
