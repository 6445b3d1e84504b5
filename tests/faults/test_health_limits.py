"""What an operator sees of limits coming near, against real `homing serve` children: the
connections and descriptors `homing health` counts beside their limits, the refusals it
totals, the `broker_stats` rate of those refusals going back to 0 when they stop, the TLS
certificate's days left, and clients hitting a rate limit over and over named in the log."""

from __future__ import annotations

import datetime
import resource
import socket
import struct
import time

import msgpack
import pytest

from tests.procs import BrokerProcess, as_user, homing, lines
from tests.waits import wait_until_sync

HANG_GUARD_S = 60
FEW_FILES = 64  # the child broker's open-file limit (soft and hard): a few dozen sessions


def _few_files() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FEW_FILES, FEW_FILES))


def health(bp: BrokerProcess, *flags: str):
    return homing("health", *flags, env=as_user(bp, "ops", "monitor"), timeout=HANG_GUARD_S,
                  check=False)


def _hello(port: int, token: str, device: str,
           deliver: bool = True) -> tuple[socket.socket, dict | None]:
    """A raw hello, and the broker's answer (None: none within 5 s, or EOF)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    body = msgpack.packb({"t": "hello", "versions": [1], "token": token, "device": device,
                          "deliver": deliver})
    s.sendall(struct.pack(">I", len(body)) + body)
    try:
        head = s.recv(4, socket.MSG_WAITALL)
        if len(head) < 4:
            return s, None
        return s, msgpack.unpackb(s.recv(struct.unpack(">I", head)[0], socket.MSG_WAITALL))
    except (TimeoutError, ConnectionResetError):
        return s, None


def test_health_counts_connections_and_descriptors_beside_their_limits(broker_process):
    """`homing health` gives `--max-connections` beside `connections`, the descriptors the
    broker holds beside its open-file limit, and totals the hellos refused at the limit, so an
    operator sees the limit come near and be met (before 2026-12-07 it gave `connections`
    alone, and a refusal only as a warning now and then in the log)."""
    bp = broker_process("--max-connections", "4", preexec_fn=_few_files)
    held = []
    try:
        for i in range(3):  # the check's own session is the 4th
            s, answer = _hello(bp.port, bp.token(f"u{i}"), "d")
            assert answer is not None and answer["t"] == "welcome", answer
            held.append(s)
        [near] = lines(health(bp))
        assert near["connections"] == 4 and near["max_connections"] == 4
        assert near["connections_full"] == 0 and near["handshakes_full"] == 0
        assert near["open_files_limit"] == FEW_FILES
        assert near["connections"] < near["open_files"] < FEW_FILES, near
        assert near["tls_expires_s"] is None  # no TLS

        for device in ("fourth", "fifth"):  # the 5th is past --max-connections
            s, answer = _hello(bp.port, bp.token("late"), device)
            held.append(s)
        assert answer is not None and answer.get("name") == "limit_exceeded", answer
        held.pop(0).close()
        checks_refused = 0  # a check the broker is quicker to than to that connection's end

        def room() -> bool:
            nonlocal checks_refused
            fits = health(bp).returncode == 0
            checks_refused += not fits
            return fits

        assert wait_until_sync(room)  # room for the check again
        [after] = lines(health(bp))
        assert after["connections_full"] == 1 + checks_refused, (after, checks_refused)
        assert after["status"] == "ok", after
    finally:
        for s in held:
            s.close()


def test_the_refusals_rate_in_broker_stats_is_0_again_once_they_stop(broker_process):
    """Connections refused for want of a file descriptor count in `broker_stats`'
    `connections_full_per_s` for the line of their time only: once they stop, the next lines
    say 0 (found in a walk, 2026-12-07: every line after the first refusal said 1 per line's
    interval for good, as though refusals went on, so an alert on it never cleared)."""
    bp = broker_process("--stats-interval", "1", "--max-connections", "1000", preexec_fn=_few_files)
    held = []
    try:
        for i in range(FEW_FILES):
            s, answer = _hello(bp.port, bp.token(f"u{i % 8}"), f"d{i}")
            held.append(s)
            if answer is None or answer["t"] != "welcome":
                break
        assert answer is not None and "file descriptors" in answer["message"], answer
    finally:
        for s in held:
            s.close()
    refused_at = time.time()

    def stats() -> list[dict]:
        return [e for e in bp.log_events() if e.get("event") == "broker_stats"]

    def stamp(e: dict) -> float:
        return datetime.datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp()

    def later() -> list[dict]:
        """The lines after the first one written after the refusal: each covers the time
        since the line before it (however late a loaded machine writes them), none of it."""
        written = stats()
        first = next((i for i, e in enumerate(written) if stamp(e) > refused_at), len(written))
        return written[first + 1:]

    assert wait_until_sync(lambda: len(later()) >= 2), bp.log_tail()
    assert sum(e["connections_full_per_s"] for e in stats()) > 0  # the refusal was counted
    quiet = later()  # once: a line more may come meanwhile
    assert [e["connections_full_per_s"] for e in quiet] == [0.0] * len(quiet), quiet
    assert all(e["open_files"] < FEW_FILES for e in quiet)


def test_health_says_how_long_the_tls_certificate_has_left(broker_process, tmp_path):
    """A broker serving TLS gives the seconds its certificate has left (`tls_expires_s` in
    `homing health` and `broker_stats`), so a certificate is renewed before clients refuse it
    (before 2026-12-07 nothing said so until handshakes failed, `tls_failed`)."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    left = datetime.timedelta(days=3)
    cert = ca.issue_cert("127.0.0.1",
                         not_after=datetime.datetime.now(datetime.UTC) + left)
    pair, ca_file = tmp_path / "pair.pem", tmp_path / "ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(pair))
    ca.cert_pem.write_to_path(str(ca_file))
    bp = broker_process("--tls-cert", str(pair), "--tls-key", str(pair), "--stats-interval", "1")
    proc = health(bp, "--tls-ca", str(ca_file))
    assert proc.returncode == 0, proc.stderr
    [out] = lines(proc)
    assert left.total_seconds() - 120 < out["tls_expires_s"] <= left.total_seconds(), out
    assert wait_until_sync(lambda: any(e.get("event") == "broker_stats"
                                       for e in bp.log_events()))
    line = next(e for e in bp.log_events() if e.get("event") == "broker_stats")
    assert abs(line["tls_expires_s"] - out["tls_expires_s"]) < 120, line


def test_certificate_dates_are_read_in_both_asn1_forms(tmp_path):
    """A certificate's expiry is read whether it is a UTCTime (up to 2049) or a
    GeneralizedTime (from 2050); a file without a certificate, or none, gives None."""
    from broker.stats import certificate_not_after

    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    utc = datetime.UTC
    pem = tmp_path / "cert.pem"
    for when in (datetime.datetime(2031, 5, 6, 7, 8, 9, tzinfo=utc),
                 datetime.datetime(2061, 5, 6, 7, 8, 9, tzinfo=utc)):
        ca.issue_cert("example.org", not_after=when).cert_chain_pems[0].write_to_path(str(pem))
        assert certificate_not_after(pem) == when.timestamp()
    # A UTCTime of 1950 to 1968 (a certificate long expired) is of the 1900s: strptime's %y
    # read 55 as 2055, and `tls_expires_s` gave 29 years left (review, 2026-12-07).
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key, name = ec.generate_private_key(ec.SECP256R1()), x509.Name([])
    for when in (datetime.datetime(1955, 6, 1, tzinfo=utc),
                 datetime.datetime(2020, 1, 1, tzinfo=utc)):
        old = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
               .public_key(key.public_key()).serial_number(1)
               .not_valid_before(datetime.datetime(1950, 1, 1, tzinfo=utc))
               .not_valid_after(when).sign(key, hashes.SHA256()))
        pem.write_bytes(old.public_bytes(serialization.Encoding.PEM))
        assert certificate_not_after(pem) == when.timestamp()
    for junk in (b"-----BEGIN PRIVATE KEY-----\nAAAA\n",
                 b"-----BEGIN CERTIFICATE-----\nMAMCAQA=\n-----END CERTIFICATE-----\n"):
        pem.write_bytes(junk)
        assert certificate_not_after(pem) is None
    assert certificate_not_after(tmp_path / "missing.pem") is None


def test_a_client_held_at_a_rate_limit_is_named_in_the_log_now_and_then(broker_process):
    """Requests refused `rate_limited` over and over are logged as `rate_limited` (warning),
    naming the session of the first and counting the refusals, at most once per 10 s: the
    operator learns who is held back, not only how many (before 2026-12-07 nothing was logged,
    only `rate_limited_per_s` counted)."""
    bp = broker_process("--send-rate", "1")
    many = 30
    s, answer = _hello(bp.port, bp.token("shop"), "d", deliver=False)  # replies alone
    assert answer is not None and answer["t"] == "welcome", answer
    with s:  # `many` sends written at once: past the burst, each is refused
        for i in range(many):
            body = msgpack.packb({"t": "send", "id": i + 1, "cid": f"c{i}", "to": "bob",
                                  "body": f"m{i}"})
            s.sendall(struct.pack(">I", len(body)) + body)
        names = []
        for _ in range(many):
            size = struct.unpack(">I", s.recv(4, socket.MSG_WAITALL))[0]
            names.append(msgpack.unpackb(s.recv(size, socket.MSG_WAITALL)).get("name"))
    assert names.count("rate_limited") >= 5, names
    refused = lines(health(bp))[0]["rate_limited"]
    assert refused >= 5

    def rate_lines() -> list[dict]:
        return [e for e in bp.log_events() if e.get("event") == "rate_limited"]

    assert wait_until_sync(rate_lines), bp.log_tail()  # a line its log file may not have yet
    logged = rate_lines()
    assert 1 <= len(logged) < refused, logged
    first = logged[0]
    assert first["level"] == "warning" and first["user"] == "shop" and first["refused"] == 1
    assert "too many sends" in first["message"] and first["retry_ms"] >= 1


def test_health_shows_a_connected_device_falling_behind(broker_process):
    """A device that stays connected but takes none of its deliveries while messages for it
    keep coming shows in `homing health` without naming it: `backlog_max` counts the entries
    waiting for its ack and `windows_full` the devices sent nothing more until they ack;
    both are 0 again once it has gone (before 2026-12-07 only a `--backlog` check naming the
    device saw it)."""
    bp = broker_process("--window", "8")
    s, answer = _hello(bp.port, bp.token("bob"), "phone")
    assert answer is not None and answer["t"] == "welcome", answer
    with s:  # reads nothing, acks nothing
        homing("send", "--to", "bob", "--stdin", env=as_user(bp, "shop"),
               input="".join(f"order {i}\n" for i in range(20)))
        out = {}

        def behind() -> bool:  # once the broker has written the device its window's worth
            nonlocal out
            [out] = lines(health(bp))
            return out["backlog_max"] == 20 and out["windows_full"] == 1

        assert wait_until_sync(behind), out
        assert out["status"] == "ok"
    assert wait_until_sync(lambda: lines(health(bp))[0]["backlog_max"] == 0)
    assert lines(health(bp))[0]["windows_full"] == 0
