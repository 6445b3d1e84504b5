"""The SDK's names are where docs/CLIENT.md says (`broker.client`), whichever module defines
them, and the `homing` command's modules each import on their own (no import cycle)."""

from __future__ import annotations

import builtins
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

import broker.client
from broker import client_blocking, client_errors

ROOT = Path(__file__).resolve().parents[2]


def test_every_sdk_name_the_docs_use_is_exported_by_broker_client():
    """Each type docs/CLIENT.md names in backticks (Python's own aside) and each name it imports
    `from broker.client` is in `broker.client.__all__` and importable from there, but the
    blocking client's, which `broker.client_blocking` exports (it imports broker.client)."""
    text = (ROOT / "docs" / "CLIENT.md").read_text(encoding="utf-8")
    named = {n for n in re.findall(r"`([A-Z][a-z][A-Za-z]*)`", text) if not hasattr(builtins, n)}
    for names in re.findall(r"from broker\.client(?:_blocking)? import ([\w, ]+)", text):
        named.update(n.strip() for n in names.split(","))
    assert named >= {"ClientError", "ConnectionLost", "Receipt", "open_client"}  # it parsed
    assert "BlockingClient" in named  # the section on it parsed too
    assert sorted(named - set(broker.client.__all__) - set(client_blocking.__all__)) == []
    assert all(hasattr(broker.client, n) for n in broker.client.__all__)


def test_the_sdk_raises_the_exceptions_broker_client_exports():
    """`except broker.client.ClientError` catches what the SDK raises: every exception type of
    broker/client_errors.py is exported by broker.client as that very class."""
    defined = {name: cls for name, cls in vars(client_errors).items()
               if inspect.isclass(cls) and issubclass(cls, Exception)
               and cls.__module__ == client_errors.__name__}
    assert "ClientError" in defined and "Replaced" in defined
    assert {name: getattr(broker.client, name, None) for name in defined} == defined
    assert set(defined) <= set(broker.client.__all__)


@pytest.mark.parametrize("module", ["broker.cli", "broker.serve_cli", "broker.client_cli",
                                    "broker.client_errors", "broker.client", "broker.client_link",
                                    "broker.client_stream", "broker.client_inflight",
                                    "broker.client_inbox"])
def test_each_module_imports_first_in_a_fresh_interpreter(module):
    """Imported before any other module of the command (a script's first import), it loads:
    the `*_cli` modules import broker.cli's plumbing, and broker.cli imports them only inside
    build_parser, so there is no cycle to trip on; the SDK's parts (client_link and the
    modules it uses) never import broker.client, which imports them."""
    run = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-3000:]
