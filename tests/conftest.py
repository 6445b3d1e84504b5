"""Settings for the whole suite.

Hypothesis's timing checks are off: its per-example deadline (200 ms by default) failed a
pure-protocol test with FlakyFailure ("Unreliable test timings!": 305 ms once, 3 ms when run
again) when the process was paused for a moment, as it is on a loaded machine or in a long
garbage collection; and a generation judged too slow fails the same way. What an example
checks is its result, not how fast it ran. Tests that set their own `deadline` keep theirs.

Bytecode: where PYTHONDONTWRITEBYTECODE is set (container images set it), every `homing`
command and broker a test starts compiled our modules again, about 0.1 s a process, and each
pytest process rewrote every test module's asserts (9.5 s to collect the suite, 1.4 s with
the cache; the CLI tests took 83 s against 66 s from a cold one). The suite then keeps the
bytecode of its own run, and of its child processes, under the environment's prefix
(`.venv/pycache`), never beside the sources; elsewhere Python's own choice stands.
"""

import os
import sys
from pathlib import Path

from hypothesis import HealthCheck, settings


def _bytecode_under_prefix() -> None:
    if not os.environ.get("PYTHONDONTWRITEBYTECODE") or not os.access(sys.prefix, os.W_OK):
        return
    prefix = os.environ.get("PYTHONPYCACHEPREFIX") or str(Path(sys.prefix) / "pycache")
    del os.environ["PYTHONDONTWRITEBYTECODE"]  # for the child processes
    os.environ["PYTHONPYCACHEPREFIX"] = prefix
    sys.pycache_prefix = prefix  # and this process's imports from here on
    sys.dont_write_bytecode = False


_bytecode_under_prefix()

pytest_plugins = ["tests.fault_tally"]  # the fault summary, merged across xdist workers

settings.register_profile("homing", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("homing")
