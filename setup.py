"""The compiled parts of homing, optional: `storage._fold` (storage/_fold.c), `storage._rowio`
(storage/_rowio.c) and `protocol._wire` (protocol/_wire.c).

Everything else is in pyproject.toml. Where no C compiler is found the build goes on without them
(`optional=True`) and homing runs the same code in Python: `storage.projections.add_message` and
the rules for every send (same rows, slower replay and commits), py-lmdb's own puts and gets
for a batch's rows (`storage.rowio`), and `Connection.send`'s Python
checks for every frame (same bytes). `homing bench`, `python -m bench.bench_replay` and the
broker's `broker_listening` log line say which ones run.
"""

from setuptools import Extension, setup

setup(ext_modules=[
    Extension("storage._fold", ["storage/_fold.c"], optional=True),
    Extension("storage._rowio", ["storage/_rowio.c"], optional=True),
    Extension("protocol._wire", ["protocol/_wire.c"], optional=True),
])
