"""Which implementation of the storage hot loops runs (storage/native.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import storage
from storage import native


def test_a_built_module_is_the_one_that_runs():
    """Where the install built storage/_fold.c, it loads: its VERSION matches the Python side
    (a mismatch would quietly fall back to Python, and its tests would be skipped)."""
    built = list(Path(storage.__file__).parent.glob("_fold.*"))
    built = [p for p in built if p.suffix in (".so", ".pyd")]
    if not built or os.environ.get("HOMING_PURE_PYTHON"):
        pytest.skip("storage._fold is not built here, or turned off")
    assert native.ext is not None
    assert native.ext.VERSION == native.VERSION
    assert native.describe() == "compiled"
