"""The optional compiled part of the protocol: `protocol._wire` (protocol/_wire.c), or None.

setup.py builds it where a C compiler is found (`optional=True`: without one, the install goes
on and `Connection.send` does everything in Python). It checks and encodes the two frames the
broker sends for every message, `deliver` and `result`, when every field is plain; anything
else it hands back to the Python checks, which stay the reference (tests/protocol/test_wire.py
compares both). `HOMING_PURE_PYTHON=1` in the environment turns it off.
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType

from . import fields

VERSION = 3  # the protocol/_wire.c this Python code was written for (its WIRE_VERSION)


def _load() -> ModuleType | None:
    if os.environ.get("HOMING_PURE_PYTHON"):
        return None
    try:
        from protocol import _wire
    except ImportError:
        return None
    if getattr(_wire, "VERSION", None) != VERSION:
        warnings.warn(f"protocol._wire is version {getattr(_wire, 'VERSION', None)}, not "
                      f"{VERSION}: running the Python checks; `pip install -e .` rebuilds it",
                      RuntimeWarning, stacklevel=2)
        return None
    # The sets of ids known to match their patterns: the C accepts an id only if it is in them.
    _wire.configure(fields._KNOWN_USERS, fields._KNOWN_CONVS, fields.MAX_CID_CHARS)
    return _wire


wire: ModuleType | None = _load()


def describe() -> str:
    """`compiled` or `python`: how `deliver` and `result` frames are checked and encoded."""
    return "compiled" if wire is not None else "python"
