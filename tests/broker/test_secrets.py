"""Rotating the token-signing secret (`homing secret rotate`, `homing secret retire`) under a
running `homing serve`: tokens of the previous key keep working, those of the new one work at
once, and a retire refuses the previous key's tokens and ends the sessions opened with them.
Real broker processes, real `homing` commands, real files (docs/OPERATIONS.md, "Rotating the
signing secret")."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import stat
import time

import msgpack
import pytest
import trio

from broker import keyring, tokens
from broker.client import ClientError, open_client
from tests.harness import running_broker
from tests.procs import BrokerProcess, homing, last_error, lines


def legacy_token(secret: bytes, user: str) -> str:
    """A token as `homing token` minted them before key ids (no `k` claim)."""
    now = int(time.time())
    body = base64.urlsafe_b64encode(msgpack.packb(
        {"u": user, "r": "user", "e": now + 3600, "i": now})).rstrip(b"=").decode()
    mac = hmac.new(secret, b"v1." + body.encode(), hashlib.sha256).digest()
    return f"v1.{body}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


def secret_cmd(action: str, data, check: bool = True):
    return homing("secret", action, "--data", str(data), check=check)


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def refused_at_hello(server: str, token: str) -> ClientError:
    with pytest.raises(ClientError) as refused:
        async with open_client(server, token, "laptop", reconnect_timeout=5) as c:
            await c.conversations()
    return refused.value


async def test_rotate_and_retire_while_serving(tmp_path):
    with BrokerProcess(tmp_path / "data") as bp, trio.fail_after(60):
        data = bp.data
        old_id = tokens.key_id(bp.secret)
        old = homing("token", "bob", "--data", str(data)).stdout.strip()
        legacy = legacy_token(bp.secret, "bob")
        async with open_client(bp.server, old, "phone") as phone, \
                open_client(bp.server, legacy, "tablet") as tablet:
            await phone.conversations()
            await tablet.conversations()

            [rotated] = lines(await trio.to_thread.run_sync(secret_cmd, "rotate", data))
            assert rotated["previous_key_id"] == old_id and rotated["key_id"] != old_id
            assert (data / "secret.prev.key").read_bytes() == bp.secret
            assert tokens.key_id((data / "secret.key").read_bytes()) == rotated["key_id"]
            assert mode(data / "secret.key") == mode(data / "secret.prev.key") == 0o600

            # a token of the new key works at once, no restart, no wait
            new = homing("token", "bob", "--data", str(data)).stdout.strip()
            async with open_client(bp.server, new, "watch") as watch:
                await watch.send("new key", to="alice")
            for token, device in ((old, "d2"), (legacy, "d3")):  # the previous key's too
                async with open_client(bp.server, token, device) as c:
                    await c.conversations()
            await phone.conversations()  # the sessions open go on
            await tablet.conversations()

            again = await trio.to_thread.run_sync(
                lambda: secret_cmd("rotate", data, check=False))
            assert again.returncode == 2 and again.stdout == ""
            err = last_error(again.stderr)
            assert err["error"] == "previous_key" and "retire" in err["message"]

            [retired] = lines(await trio.to_thread.run_sync(secret_cmd, "retire", data))
            assert retired == {"retired_key_id": old_id, "key_id": rotated["key_id"]}
            assert not (data / "secret.prev.key").exists()
            for session in (phone, tablet):  # ended by the broker within a second
                with pytest.raises(ClientError) as ended:
                    async for _ in session.deliveries():
                        pass
                assert ended.value.name == "unauthorized"
                assert "retired" in ended.value.message

        for token in (old, legacy):
            refused = await refused_at_hello(bp.server, token)
            assert refused.name == "unauthorized"
        assert old_id in (await refused_at_hello(bp.server, old)).message
        async with open_client(bp.server, new, "watch") as watch:
            await watch.conversations()

        [nothing] = lines(secret_cmd("retire", data))  # nothing left to retire: said so
        assert nothing == {"retired_key_id": None, "key_id": rotated["key_id"]}

    loaded = [e for e in bp.log_events() if e["event"] == "signing_keys_loaded"]
    assert loaded[-1]["previous_key_id"] is None and loaded[-1]["sessions_ended"] == 2
    assert any(e["previous_key_id"] == old_id for e in loaded)


async def test_a_token_of_an_unknown_key_id_says_so(tmp_path):
    with BrokerProcess(tmp_path / "data") as bp, trio.fail_after(30):
        other = tokens.load_secret(tmp_path / "other")
        refused = await refused_at_hello(bp.server, tokens.issue(other, "bob"))
        assert refused.name == "unauthorized"
        assert f"key id {tokens.key_id(other)}" in refused.message
        assert "homing token" in refused.message


async def test_a_restart_keeps_both_keys_and_a_backup_copies_them(tmp_path):
    with BrokerProcess(tmp_path / "data") as bp, trio.fail_after(60):
        old = bp.token("bob")
        secret_cmd("rotate", bp.data)
        new = homing("token", "bob", "--data", str(bp.data)).stdout.strip()
        await bp.aterminate()
        await bp.astart()
        for token in (old, new):
            async with open_client(bp.server, token, "phone") as c:
                await c.send("hi", to="alice")
        dest = tmp_path / "copy"
        [copied] = lines(homing("backup", str(dest), "--data", str(bp.data)))
    assert copied["secret"] is True and copied["previous_secret"] is True
    for name in ("secret.key", "secret.prev.key"):
        assert (dest / name).read_bytes() == (bp.data / name).read_bytes()
        assert mode(dest / name) == 0o600
    with BrokerProcess(dest) as restored:
        for token in (old, new):
            async with open_client(restored.server, token, "phone") as c:
                await c.conversations()


def test_secret_commands_refuse_what_they_cannot_do(tmp_path):
    empty = tmp_path / "none"
    empty.mkdir()
    for action in ("rotate", "retire"):
        proc = secret_cmd(action, empty, check=False)
        assert proc.returncode == 2 and proc.stdout == ""
        err = last_error(proc.stderr)
        assert err["error"] == "no_secret" and "secret.key" in err["message"], err
    assert list(empty.iterdir()) == []  # nothing made
    short = tmp_path / "short"
    short.mkdir()
    (short / "secret.key").write_bytes(b"x" * 5)
    proc = secret_cmd("rotate", short, check=False)
    assert proc.returncode == 2 and last_error(proc.stderr)["error"] == "bad_secret"
    assert sorted(p.name for p in short.iterdir()) == ["secret.key"]
    proc = homing("secret", "spin", check=False)
    assert proc.returncode == 2 and last_error(proc.stderr)["error"] == "usage"


def test_a_rotate_cut_short_after_saving_the_previous_key_can_be_run_again(tmp_path):
    """A rotate killed after it wrote `secret.prev.key` but before the new `secret.key` leaves
    the two alike: run again, it goes on rather than ask for a retire first."""
    data = tmp_path / "data"
    first = tokens.load_secret(data)
    tokens.store_secret(data, first, tokens.PREVIOUS_FILE)
    [rotated] = lines(secret_cmd("rotate", data))
    assert rotated["previous_key_id"] == tokens.key_id(first)
    assert (data / "secret.prev.key").read_bytes() == first


def test_a_token_names_its_key_and_an_older_broker_still_reads_it(tmp_path):
    """The key id rides in the claims (`k`), signed with them: a broker from before key ids,
    which ignores claims it does not know, accepts the token of the key it holds."""
    secret = tokens.load_secret(tmp_path / "d")
    token = homing("token", "bob", "--data", str(tmp_path / "d")).stdout.strip()
    head, body, sig = token.split(".")
    claims = msgpack.unpackb(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    assert head == "v1" and claims["k"] == tokens.key_id(secret)
    mac = hmac.new(secret, f"v1.{body}".encode(), hashlib.sha256).digest()
    assert base64.urlsafe_b64encode(mac).rstrip(b"=").decode() == sig
    assert json.dumps(claims)  # plain data


def test_tokens_for_many_users_in_one_command_one_a_line(tmp_path):
    """A head office minting its 300 stores' tokens ran `homing token` 300 times, a process
    each (about a third of a second apiece: 38 s to 113 s in all on a loaded 2-core machine).
    Several USERs give a token each, one a line, in the order given; one bad USER among them
    is a usage error that prints nothing and makes no secret."""
    data = tmp_path / "d"
    bad = homing("token", "store-1", "not a user", "--data", str(data), check=False)
    assert bad.returncode == 2 and last_error(bad.stderr)["error"] == "usage", bad.stderr
    assert bad.stdout == "" and not data.exists()
    users = [f"store-{i}" for i in range(300)]
    out = homing("token", *users, "--service", "--data", str(data)).stdout.splitlines()
    keys = keyring.Keyring(data).keys
    claims = [tokens.verify(keys, token) for token in out]
    assert [(c.user, c.role) for c in claims] == [(u, "service") for u in users]


async def test_a_token_of_a_key_made_a_moment_ago_is_taken_at_hello(tmp_path):
    """The broker reads the key files again when a token names a key it does not hold: a
    token minted right after a rotate works at once, before the once-a-second look."""
    async with running_broker(tmp_path / "data") as h:
        keyring.rotate(h.config.data_dir)
        new = tokens.issue(tokens.load_secret(h.config.data_dir), "bob")
        with pytest.raises(tokens.UnknownKey):  # not taken up yet
            tokens.verify(h.broker.keyring.keys, new)
        async with open_client(h.server, new, "phone") as c:
            await c.conversations()
        loaded = [e for e in h.logs if e["event"] == "signing_keys_loaded"]
        assert loaded[-1]["key_id"] == tokens.key_id(h.broker.secret)


async def test_key_files_that_cannot_be_read_keep_the_keys_held(tmp_path):
    """A `secret.key` deleted or cut short under a running broker is logged once
    (`signing_keys_unreadable`) and the keys held go on serving; a whole one is taken up."""
    async with running_broker(tmp_path / "data",
                              expected_errors=("signing_keys_unreadable",)) as h:
        data = h.config.data_dir
        token = h.token("bob")
        (data / "secret.key").write_bytes(b"short")
        h.broker.refresh_keys()
        h.broker.refresh_keys()
        unreadable = [e for e in h.logs if e["event"] == "signing_keys_unreadable"]
        assert len(unreadable) == 1 and "5 bytes" in unreadable[0]["reason"]
        async with open_client(h.server, token, "phone") as c:
            await c.conversations()
            (data / "secret.key").unlink()
            tokens.load_secret(data)  # a new key, as `homing token` makes one where none is
            h.broker.refresh_keys()
            with pytest.raises(ClientError) as ended:
                async for _ in c.deliveries():
                    pass
            assert "retired" in ended.value.message
        assert h.logs[-1]["event"] != "signing_keys_unreadable"


def test_a_previous_key_cut_short_is_refused_and_a_rotate_that_cannot_write_changes_nothing(
        tmp_path):
    """`secret.prev.key` is held to what `secret.key` is: not 32 bytes, serve and backup refuse
    it (`bad_secret`). A rotate that cannot write (a full disk) leaves the keys as they were,
    with no half-written file."""
    import os
    import resource
    import subprocess

    from storage.store import Store
    from tests.procs import homing_cmd

    data = tmp_path / "data"
    first = tokens.load_secret(data)
    Store.open(str(data)).close()
    (data / "secret.prev.key").write_bytes(b"")
    for args in (("serve", "--data", str(data), "--port", "0"),
                 ("backup", str(tmp_path / "bk"), "--data", str(data))):
        proc = homing(*args, check=False, timeout=20)
        assert proc.returncode == 2 and last_error(proc.stderr)["error"] == "bad_secret"
        assert "secret.prev.key" in last_error(proc.stderr)["message"]
    (data / "secret.prev.key").unlink()
    before = sorted(p.name for p in data.iterdir())
    proc = subprocess.run(
        [*homing_cmd(), "secret", "rotate", "--data", str(data)], capture_output=True,
        text=True, timeout=20, env=os.environ,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0)))
    assert proc.returncode == 2 and last_error(proc.stderr)["error"] == "data_dir"
    assert sorted(p.name for p in data.iterdir()) == before
    assert (data / "secret.key").read_bytes() == first
