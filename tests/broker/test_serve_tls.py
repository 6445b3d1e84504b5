"""`homing serve --tls-cert --tls-key` as a child process: key files that cannot serve."""

from __future__ import annotations

import json
import os
import pty
import ssl
import subprocess
import time

import trustme
from cryptography.hazmat.primitives import serialization

from tests.procs import BrokerProcess, as_user, free_port, homing, homing_cmd, last_error


def _encrypted_pair(tmp_path):
    """A certificate, and its key encrypted with a passphrase (as `openssl req` makes it
    without -nodes)."""
    cert = trustme.CA().issue_cert("127.0.0.1")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    key = serialization.load_pem_private_key(cert.private_key_pem.bytes(), password=None)
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    return cert_path, key_path


def test_an_encrypted_key_is_a_usage_error_not_a_passphrase_prompt(tmp_path):
    """A key that asks for a passphrase: `serve` cannot take one (no flag for it), so it is a
    usage error saying so, exit 2, nothing created. It used to let OpenSSL prompt `Enter PEM
    pass phrase:` (on a terminal the start hung there, and a passphrase typed in was asked for
    again when the broker loaded the pair; without one, the prompt and then `Invalid argument`
    on stderr)."""
    cert_path, key_path = _encrypted_pair(tmp_path)
    cmd = [*homing_cmd(), "serve", "--data", str(tmp_path / "data"), "--port", str(free_port()),
           "--tls-cert", str(cert_path), "--tls-key", str(key_path)]
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert "pass phrase" not in proc.stderr, proc.stderr
    err = last_error(proc.stderr)
    assert err["error"] == "usage"
    assert f"--tls-key {key_path}" in err["message"] and "passphrase" in err["message"], err
    assert not (tmp_path / "data").exists()

    # On a terminal: the same error, at once (it waited for a passphrase).
    controller, terminal = pty.openpty()
    try:
        child = subprocess.Popen(cmd, stdin=terminal, stdout=terminal, stderr=terminal)
        os.close(terminal)
        try:
            assert child.wait(timeout=10) == 2
        finally:
            child.kill()
            child.wait()
        said = b""
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the terminal's other side is closed
                break
            if not chunk:
                break
            said += chunk
    finally:
        os.close(controller)
    assert b"pass phrase" not in said, said
    assert json.loads(said.decode().strip().splitlines()[-1])["error"] == "usage", said
    assert not (tmp_path / "data").exists()


def test_a_tls_pair_that_does_not_load_names_the_file_at_fault(tmp_path):
    """Files swapped, a DER certificate, an empty key, a key of another certificate: a usage
    error (exit 2, nothing created) naming the flag and file at fault and what is wrong, where
    it said `--tls-cert C / --tls-key K: [SSL] PEM lib (_ssl.c:3905)` for all but the last."""
    one, other = trustme.CA().issue_cert("127.0.0.1"), trustme.CA().issue_cert("127.0.0.1")
    cert, key, other_key = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "other.pem"
    one.cert_chain_pems[0].write_to_path(str(cert))
    one.private_key_pem.write_to_path(str(key))
    other.private_key_pem.write_to_path(str(other_key))
    der, empty = tmp_path / "cert.der", tmp_path / "empty.pem"
    der.write_bytes(ssl.PEM_cert_to_DER_cert(cert.read_text()))
    empty.write_bytes(b"")
    for cert_file, key_file, says in (
            (key, cert, f"--tls-cert {key}: no PEM certificate in it"),
            (der, key, f"--tls-cert {der}: no PEM certificate in it"),
            (cert, empty, f"--tls-key {empty}: no PEM private key in it"),
            (cert, cert, f"--tls-key {cert}: no PEM private key in it"),
            (cert, other_key, f"--tls-key {other_key} is not the key of --tls-cert {cert}")):
        proc = subprocess.run(
            [*homing_cmd(), "serve", "--data", str(tmp_path / "data"), "--port",
             str(free_port()), "--tls-cert", str(cert_file), "--tls-key", str(key_file)],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
        err = last_error(proc.stderr)
        assert proc.returncode == 2 and err["error"] == "usage", proc.stderr
        assert err["message"].startswith(says), (says, err["message"])
        assert not (tmp_path / "data").exists()


def test_client_commands_against_a_tls_broker(tmp_path):
    """`homing serve` with TLS: a command with --tls-ca works; one without is refused at once
    (exit 1, `bad_frame`, saying the port speaks TLS), not after --connect-timeout with
    `unreachable` and `expected welcome, got NoneType`; the broker serves on."""
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    cert, key, ca_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    with BrokerProcess(tmp_path / "data", "--tls-cert", str(cert), "--tls-key", str(key)) as bp:
        env = as_user(bp, "alice")
        started = time.monotonic()
        proc = homing("send", "--to", "bob", "in the clear", env=env, check=False, timeout=60)
        err = last_error(proc.stderr)
        assert proc.returncode == 1 and err["error"] == "bad_frame", proc.stderr
        assert "speaks TLS" in err["message"] and "--tls" in err["message"], err
        assert time.monotonic() - started < 10
        sent = json.loads(homing("send", "--tls-ca", str(ca_file), "--to", "bob", "over tls",
                                 env=env).stdout)
        assert sent["seq"] == 1
        assert bp.terminate() == 0
