"""What a newcomer building a first service with the SDK ran into (docs/CLIENT.md): errors that
did not say what to do about them."""

from __future__ import annotations

import pytest

from broker.client import ClientError, open_client
from tests.procs import homing, last_error


@pytest.mark.parametrize("around", ["{}\n", "{}\r\n", " {}", "Bearer {}"])
async def test_a_token_with_whitespace_around_it_is_told_so(harness, around):
    """A token read from a file keeps its line end (`Path("shop.token").read_text()`, an env
    file with CRLF), and one pasted from an HTTP habit has `Bearer ` before it. The broker
    refused them as `unauthorized` "malformed token", which did not say what was wrong: it
    names the whitespace now and says to strip it."""
    token = around.format(harness.token("shop", "service"))
    with pytest.raises(ClientError) as e:
        async with open_client(harness.server, token, "d1", reconnect=False):
            pass
    assert e.value.name == "unauthorized"
    assert "whitespace" in e.value.message and "strip" in e.value.message, e.value.message


async def test_an_empty_token_is_told_so(harness):
    """`HOMING_TOKEN=` (set but empty, a variable that was never filled) was "malformed token"
    too: it says that no token was given, and how to mint one."""
    with pytest.raises(ClientError) as e:
        async with open_client(harness.server, "", "d1", reconnect=False):
            pass
    assert e.value.name == "unauthorized"
    assert "empty" in e.value.message and "homing token" in e.value.message, e.value.message


@pytest.mark.parametrize("server", ["http://127.0.0.1:7717", "homing://localhost:7717",
                                    "tcp://127.0.0.1:7717"])
async def test_a_server_given_as_a_url_is_a_value_error(server):
    """docs/CLIENT.md: a `server` that is not HOST:PORT raises ValueError at once. A URL (the
    habit of other brokers' clients: nats://, redis://) passed the check as the host
    `http://127.0.0.1` and failed as `UnknownHost` "no such host", which hid the mistake."""
    with pytest.raises(ValueError, match="not a URL"):
        async with open_client(server, "v1.any.token", "d1"):
            pass


def test_a_server_given_as_a_url_is_a_usage_error():
    """The same for `homing --server`: a usage error (exit 2), where it was `unreachable`
    (exit 3) "no such host"."""
    proc = homing("send", "--server", "http://127.0.0.1:7717", "--to", "bob", "hi",
                  "--connect-timeout", "1", env={"HOMING_TOKEN": "v1.any.token"},
                  check=False, timeout=20)
    assert proc.returncode == 2, proc.stderr
    err = last_error(proc.stderr)
    assert err["error"] == "usage" and "not a URL" in err["message"], err
