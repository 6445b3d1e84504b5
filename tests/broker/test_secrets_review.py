"""Rotating the signing key, tried as an attacker and as a careless operator would: a retire
taken up while the broker cannot open files, temporary files planted in the data directory,
which key the log says a session uses. Real `homing serve` children, real `homing` commands,
real files (docs/OPERATIONS.md, "Rotating the signing secret")."""

from __future__ import annotations

import os
import resource
import socket
import subprocess

import pytest
import trio

from broker import keyring, tokens
from broker.client import ClientError, open_client
from tests.broker.test_secrets import legacy_token
from tests.harness import running_broker
from tests.procs import BrokerProcess, homing, homing_cmd, last_error, lines
from tests.waits import wait_until

FD_LIMIT = 48


class FewFilesBroker(BrokerProcess):
    """`homing serve` under an open-file limit of FD_LIMIT (hard too: it cannot raise it)."""

    def spawn(self) -> None:
        with open(self.logfile, "ab") as log:
            self.proc = subprocess.Popen(
                [*homing_cmd(), "serve", "--data", str(self.data), "--port", str(self.port),
                 "--log-format", "json", *self.flags],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=self.env,
                preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE,
                                                      (FD_LIMIT, FD_LIMIT)))


def fill_descriptors(port: int, count: int) -> list[socket.socket]:
    """Connections that send nothing: each holds one of the broker's descriptors."""
    held = []
    for _ in range(count):
        held.append(socket.create_connection(("127.0.0.1", port), timeout=5))
    return held


def _events(bp: BrokerProcess, name: str) -> list[dict]:
    """The broker's log lines named `name`."""
    return [e for e in bp.log_events() if e["event"] == name]


async def ended_unauthorized(client) -> ClientError:
    with pytest.raises(ClientError) as ended:
        async for _ in client.deliveries():
            pass
    return ended.value


async def test_a_retire_taken_up_while_files_cannot_be_opened_still_retires(tmp_path):
    """A retire the broker sees while it is out of file descriptors (a flood of connections:
    EMFILE) cannot be read, but the previous key is gone: its tokens are refused and its
    sessions end, at once or as soon as the files can be read, never kept for good."""
    with FewFilesBroker(tmp_path / "data", "--max-handshakes", "500",
                        "--max-connections", "500", "--handshake-timeout", "60") as bp, \
            trio.fail_after(60):
        old = bp.token("bob")
        async with open_client(bp.server, old, "phone") as phone:
            await phone.conversations()
            lines(homing("secret", "rotate", "--data", str(bp.data)))
            secret = tokens.load_secret(bp.data)
            # Taken up: {new, previous} (the broker looks once a second; on a loaded machine
            # the look after the rotate can come later than 1.5 s).
            await wait_until(lambda: any(
                e["key_id"] == tokens.key_id(secret) and e["previous_key_id"]
                for e in _events(bp, "signing_keys_loaded")))
            held = await trio.to_thread.run_sync(fill_descriptors, bp.port, FD_LIMIT)
            try:
                await trio.sleep(0.5)
                lines(homing("secret", "retire", "--data", str(bp.data)))
                await trio.sleep(2.5)  # two looks or more, every one out of descriptors
                await wait_until(lambda: any("Too many open files" in e["reason"] for e in
                                             _events(bp, "signing_keys_unreadable")))
            finally:
                for s in held:
                    s.close()
            with trio.fail_after(15):
                ended = await ended_unauthorized(phone)
            assert ended.name == "unauthorized" and "retired" in ended.message
        with pytest.raises(ClientError) as refused:
            async with open_client(bp.server, old, "tablet", reconnect_timeout=5) as c:
                await c.conversations()
        assert refused.value.name == "unauthorized"
        async with open_client(bp.server, tokens.issue(secret, "bob"), "watch") as c:
            await c.conversations()  # the current key goes on


@pytest.mark.parametrize("name", ["secret.key", "secret.prev.key"])
def test_a_rotate_never_writes_through_a_planted_temporary_file(tmp_path, name):
    """The temporary file a key is written to has a name one can guess (`.NAME.tmp`; the pid
    in it until 2026-12-06): a symlink planted there (by the broker's user, against a root
    that runs `homing secret rotate`) must not make the rotate truncate and write the file it
    points at."""
    data = tmp_path / "data"
    first = tokens.load_secret(data)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious, not a key")
    (data / f".{name}.tmp").symlink_to(victim)
    (data / f".{name}.{os.getpid()}.tmp").symlink_to(victim)  # the name of before
    new_id, previous_id = keyring.rotate(data)
    assert victim.read_bytes() == b"precious, not a key"
    assert previous_id == tokens.key_id(first)
    assert (data / "secret.prev.key").read_bytes() == first
    assert tokens.key_id((data / "secret.key").read_bytes()) == new_id
    assert sorted(p.name for p in data.iterdir()) == ["secret.key", "secret.prev.key"]


async def test_the_log_says_which_key_each_session_uses(tmp_path):
    """Before a retire the operator must find the clients still on the previous key:
    `connection_opened` names the key id that verified the token (a token without `k` too)."""
    async with running_broker(tmp_path / "data") as h:
        data = h.config.data_dir
        old_secret = tokens.load_secret(data)
        old = tokens.issue(old_secret, "bob")
        keyring.rotate(data)
        new_secret = tokens.load_secret(data)
        async with open_client(h.server, old, "phone") as a, \
                open_client(h.server, tokens.issue(new_secret, "bob"), "tablet") as b:
            await a.conversations()
            await b.conversations()
        opened = {e["device"]: e for e in h.logs if e["event"] == "connection_opened"}
        assert opened["phone"]["key_id"] == tokens.key_id(old_secret)
        assert opened["tablet"]["key_id"] == tokens.key_id(new_secret)


def test_a_rotate_cut_short_between_its_steps_is_finished_not_retired(tmp_path):
    """A rotate that fails after it saved the previous key, before the new `secret.key` (here
    the new key's temporary file cannot be made), leaves the two alike. Run again, it goes on.
    A retire then would remove a copy of the key still current while saying it retired it:
    refused (`rotate_unfinished`), nothing changed."""
    data = tmp_path / "data"
    first = tokens.load_secret(data)
    (data / ".secret.key.tmp").mkdir()  # the second step's file cannot be made
    with pytest.raises(OSError):
        keyring.rotate(data)
    (data / ".secret.key.tmp").rmdir()
    assert (data / "secret.prev.key").read_bytes() == (data / "secret.key").read_bytes() == first

    proc = homing("secret", "retire", "--data", str(data), check=False)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout
    err = last_error(proc.stderr)
    assert err["error"] == "rotate_unfinished" and "homing secret rotate" in err["message"]
    assert (data / "secret.prev.key").read_bytes() == first

    [rotated] = lines(homing("secret", "rotate", "--data", str(data)))
    assert rotated["previous_key_id"] == tokens.key_id(first) != rotated["key_id"]
    [retired] = lines(homing("secret", "retire", "--data", str(data)))
    assert retired == {"retired_key_id": tokens.key_id(first), "key_id": rotated["key_id"]}
    assert sorted(p.name for p in data.iterdir()) == ["secret.key"]


async def test_a_key_file_that_is_not_a_regular_file_is_refused_not_waited_on(tmp_path):
    """A `secret.prev.key` that is a FIFO (or a device, or a symlink to one) is refused like a
    file of the wrong length: the broker's once-a-second look must not block in it (a FIFO's
    open waits for a writer, and with it every connection), nor read a device without end."""
    with BrokerProcess(tmp_path / "data") as bp, trio.fail_after(30):
        token = bp.token("bob")
        os.mkfifo(bp.data / "secret.prev.key", 0o600)
        await wait_until(lambda: _events(bp, "signing_keys_unreadable"))  # a look was made
        with trio.fail_after(5):
            async with open_client(bp.server, token, "phone") as c:
                await c.conversations()
        (bp.data / "secret.prev.key").unlink()
        (bp.data / "secret.prev.key").symlink_to("/dev/zero")
        await trio.sleep(1.5)
        with trio.fail_after(5):
            async with open_client(bp.server, token, "tablet") as c:
                await c.conversations()
        reasons = [e["reason"] for e in bp.log_events()
                   if e["event"] == "signing_keys_unreadable"]
        # logged once: the reason is the same, tried again at each look
        assert len(reasons) == 1 and "not a regular file" in reasons[0], reasons
    (bp.data / "secret.prev.key").unlink()
    os.mkfifo(bp.data / "secret.prev.key", 0o600)
    [retired] = lines(homing("secret", "retire", "--data", str(bp.data), timeout=20))
    assert retired["retired_key_id"] is None and not (bp.data / "secret.prev.key").exists()


async def test_a_retire_and_a_rotate_within_one_look_end_the_retired_keys_sessions(tmp_path):
    """Retire, then rotate at once (the new previous key is the key current until then): the
    broker may never see the state between, yet the retired key's sessions end and its tokens,
    with `k` or without, are refused; the key current before the rotate goes on working."""
    with BrokerProcess(tmp_path / "data") as bp, trio.fail_after(60):
        retired = bp.token("bob")
        lines(homing("secret", "rotate", "--data", str(bp.data)))
        kept_secret = tokens.load_secret(bp.data)
        kept = tokens.issue(kept_secret, "bob")
        async with open_client(bp.server, retired, "phone") as phone, \
                open_client(bp.server, kept, "tablet") as tablet:
            await phone.conversations()
            await tablet.conversations()
            for action in ("retire", "rotate"):
                proc = await trio.lowlevel.open_process(
                    [*homing_cmd(), "secret", action, "--data", str(bp.data)],
                    stdout=subprocess.DEVNULL)
                assert await proc.wait() == 0
            with trio.fail_after(5):
                ended = await ended_unauthorized(phone)
            assert "retired" in ended.message
            await tablet.conversations()
        for token in (retired, legacy_token(bp.secret, "bob")):
            with pytest.raises(ClientError) as refused:
                async with open_client(bp.server, token, "laptop", reconnect_timeout=5) as c:
                    await c.conversations()
            assert refused.value.name == "unauthorized"
        async with open_client(bp.server, kept, "laptop") as c:
            await c.conversations()


def test_a_rotate_saves_the_previous_key_itself_not_through_a_link(tmp_path):
    """A `secret.prev.key` that is a symlink to `secret.key` reads as a rotate cut short (the
    two alike); the rotate that goes on must save the previous key as a file of its own, or
    the link would show the new key and the previous one's tokens be cut off unsaid."""
    data = tmp_path / "data"
    first = tokens.load_secret(data)
    (data / "secret.prev.key").symlink_to("secret.key")
    new_id, previous_id = keyring.rotate(data)
    assert previous_id == tokens.key_id(first)
    assert not (data / "secret.prev.key").is_symlink()
    assert (data / "secret.prev.key").read_bytes() == first
    ring = keyring.Keyring(data)
    assert set(ring.keys) == {new_id, previous_id}
    assert tokens.verify(ring.keys, tokens.issue(first, "bob")).key == previous_id


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give files to another user")
def test_a_rotate_run_as_root_leaves_the_keys_to_the_brokers_user(tmp_path):
    """`sudo homing secret rotate` on a data directory the broker's user owns: the new key
    files are that user's (those of the `secret.key` they replace), mode 0600, or the broker
    could not read them (its keys unreadable, new tokens refused, and no restart)."""
    data = tmp_path / "data"
    tokens.load_secret(data)
    os.chown(data / "secret.key", 65534, 65534)
    lines(homing("secret", "rotate", "--data", str(data)))
    for name in ("secret.key", "secret.prev.key"):
        st = (data / name).stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (65534, 65534, 0o600), name
