"""The one compiled part of homing, optional: `storage._fold` (see storage/_fold.c).

Everything else is in pyproject.toml. Where no C compiler is found the build goes on without it
(`optional=True`) and homing runs `storage.projections.add_message` in Python: same rows, slower
replay. `homing version` and `homing audit stats` say which one runs.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("storage._fold", ["storage/_fold.c"], optional=True)])
