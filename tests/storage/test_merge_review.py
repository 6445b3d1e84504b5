"""Review of the merged changes of 2026-12-05 (idempotent create, the log's clock, read-only
opens of older layouts), read together."""

from __future__ import annotations

import pytest

from storage.commands import CreateConv
from storage.errors import StorageError
from storage.store import Store


def test_a_batch_on_a_read_only_store_is_refused_with_a_storage_error(tmp_path):
    """A read-only store has no buffered tables since read-only opens of older layouts: a batch
    run on it ended in AttributeError (the failure path rolled back tables it did not have),
    where it raised StorageError as every other write that cannot be done. Nothing is
    written."""
    store = Store.open(tmp_path / "data")
    store.close()
    store = Store.open(tmp_path / "data", readonly=True)
    try:
        with pytest.raises(StorageError, match="read-only"):
            store.execute([CreateConv("ann", "d1", "user", "group", "g", False, (), "c1")])
        assert store.last_lsn() == 0
    finally:
        store.close()
