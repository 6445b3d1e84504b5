"""Fixtures for storage tests: real LMDB environments on tmp_path, no mocks."""

from __future__ import annotations

import pytest

from storage.store import Store


@pytest.fixture
def store(tmp_path):
    """An open Store on a fresh data directory, closed after the test."""
    s = Store.open(tmp_path / "data")
    yield s
    s.close()
