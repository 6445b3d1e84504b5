"""Failed hellos counted per peer address, and the addresses past `--auth-fail-rate` throttled.

A hello refused `unauthorized` (a forged, malformed, expired, revoked or retired token) takes
one token from its address's bucket (`--auth-fail-rate` a second, a burst of AUTH_FAIL_BURST_S
seconds' worth); so does a connection refused before a hello for what it sent instead
(broker/handshake.py `not_a_hello`: a frame that does not decode, a first frame that is not a
hello, a hello of another protocol version whose token fails, plaintext on a TLS port; and
`_tls_failed`, a TLS handshake that fails; the token and TLS since the review of 2026-12-07): a
failed hello is a failed hello, one bucket an address, or a peer would dodge the count by
sending garbage (it did until 2026-12-07, two log lines and up to a second's linger each). While
the bucket is empty, the address's failed hellos are answered as within it (`unauthorized`, or
the garbage's own code and message), with `retry_ms`, but with no `auth_failed` or
`frame_rejected` line of their own (one `auth_throttled` warning per address per REPEAT_EVERY_S
says how many) and no wait for the peer's EOF. The code is not `rate_limited` (it was, on
2026-12-07): a genuine token that expired or was revoked, behind a NAT address others throttle,
is one its client must replace, and `rate_limited` told it to keep it and try again. A good
token is never counted nor refused (one of a key made since the broker last read its key files
too: they are looked at, as for an address not throttled); the token is verified first (about 7
us, a small part of what the connection costs), so the stores of a fleet behind one NAT address
are welcomed however many broken ones share it (docs/OPERATIONS.md, "Limits").

An address is an IPv4 address, or an IPv6 address's /64 (the least a site is given, so one
host cannot dodge the count by walking its own prefix); an IPv4-mapped IPv6 address is its
IPv4 address. At most `--auth-fail-addresses` are kept, the least recently failed forgotten
first: an address forgotten starts again with a full burst.
"""

from __future__ import annotations

import ipaddress
from typing import NamedTuple

from broker.logs import Repeated
from broker.ratelimit import TokenBucket

AUTH_FAIL_BURST_S = 60.0  # the burst, in seconds' worth of --auth-fail-rate (at least one)
IPV6_PREFIX = 64  # the bits of an IPv6 address that name one peer


def address_key(host: str) -> str:
    """The address failed hellos are counted under, for the peer's `host` (as getpeername
    gives it): IPv4 as it is, IPv6 as its /64, anything else (a Unix socket's "") as it is."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, IPV6_PREFIX), strict=False))
    return str(ip)


class Throttled(NamedTuple):
    """A failed hello past its address's rate: when to try again, and the count to log (None:
    its address was logged within REPEAT_EVERY_S)."""

    retry_ms: int
    refused: int | None


class FailedHellos:
    """The failed-hello buckets of the peer addresses, at most `max_addresses` of them."""

    def __init__(self, rate: float, max_addresses: int) -> None:
        self.rate = rate  # failed hellos a second per address; 0: not limited
        self.burst = max(1.0, rate * AUTH_FAIL_BURST_S)
        self.max_addresses = max_addresses
        # address -> its bucket and its `auth_throttled` lines, least recently failed first
        self._addresses: dict[str, tuple[TokenBucket, Repeated]] = {}
        self.throttled = 0  # hellos refused past the rate since the start (`broker_stats`)
        self.forgotten = 0  # addresses forgotten to keep within max_addresses

    def failed(self, address: str, now: float) -> Throttled | None:
        """Count a failed hello from `address` at monotonic `now`: None if its rate allows it
        (answer and log it as ever), else the throttle's answer."""
        if self.rate <= 0:
            return None
        entry = self._addresses.pop(address, None)  # put back last: the most recent
        if entry is None:
            if len(self._addresses) >= self.max_addresses:
                del self._addresses[next(iter(self._addresses))]
                self.forgotten += 1
            entry = (TokenBucket(self.rate, self.burst), Repeated())
            entry[0].stamp = now
        self._addresses[address] = entry
        bucket, said = entry
        if bucket.take(1.0, now):
            return None
        self.throttled += 1
        return Throttled(max(1, int(bucket.wait(1.0, now) * 1000 + 0.999)), said.count(now))

    def __len__(self) -> int:
        return len(self._addresses)
