"""The optional compiled part of storage: `storage._fold` (storage/_fold.c), or None.

setup.py builds it where a C compiler is found (`optional=True`: without one, the install goes
on and everything runs in Python). It holds the hot loops of replay and commit: a translation
of `projections.add_message`, the replay's message loop (`fold_messages`) and the audits' keyed
row digest. The Python versions stay the reference; tests/storage/test_fold_compiled.py checks
that both write the same rows. `HOMING_PURE_PYTHON=1` in the environment turns it off.
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

VERSION = 18  # the storage/_fold.c this Python code was written for (its FOLD_VERSION)


def load(name: str, version: int) -> ModuleType | None:
    """The compiled module `storage.<name>` if it is built, of `version`, and not turned off
    (`HOMING_PURE_PYTHON`); else None, and the Python versions run."""
    if os.environ.get("HOMING_PURE_PYTHON"):
        return None
    try:
        module = importlib.import_module(f"storage.{name}")
    except ImportError:
        return None
    if getattr(module, "VERSION", None) != version:
        # A build of older (or newer) sources, e.g. left by an editable install: the Python
        # versions are right, the module may not be. `pip install -e .` rebuilds it.
        warnings.warn(f"storage.{name} is version {getattr(module, 'VERSION', None)}, not "
                      f"{version}: running the Python versions; `pip install -e .` rebuilds it",
                      RuntimeWarning, stacklevel=3)
        return None
    return module


ext: ModuleType | None = load("_fold", VERSION)


def describe() -> str:
    """`compiled` or `python`: which implementation of the hot loops runs (for status output)."""
    return "compiled" if ext is not None else "python"
