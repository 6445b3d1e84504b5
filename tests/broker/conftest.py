"""Fixtures for the broker tests: a real broker on a loopback port over real LMDB."""

import pytest

from tests.harness import running_broker


@pytest.fixture
async def harness(tmp_path):
    async with running_broker(tmp_path / "data") as h:
        yield h
