"""Waiting on a condition in tests, by polling, instead of a fixed sleep that hopes it held.

On a loaded machine (CI: two cores, the whole suite) a connection is accepted, a child
process answers or a log line is written later than it is on a quiet one; a poll returns as
soon as the condition holds, and the timeout is only a hang guard, so it is generous.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import trio

HANG_GUARD_S = 30.0  # far past anything a healthy run waits for, even on a loaded machine
POLL_S = 0.02


async def wait_until(cond: Callable[[], object], timeout: float = HANG_GUARD_S,
                     step: float = POLL_S) -> None:
    """Return once `cond()` is true; raise trio.TooSlowError after `timeout` s."""
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(step)


def wait_until_sync(cond: Callable[[], object], timeout: float = HANG_GUARD_S,
                    step: float = POLL_S) -> bool:
    """The blocking twin, for tests without an event loop: whether `cond()` became true
    within `timeout` s (the caller asserts, with what it knows)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True
