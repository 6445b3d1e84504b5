"""The exceptions the client SDK (broker/client.py) raises, each saying when, and the tables
that tell a connect that can never succeed (no such host, a broker not speaking TLS) from an
outage worth retrying. `broker.client` exports every one of them: import them from there, as
docs/CLIENT.md does.

Two roots: ClientError, the broker (or the SDK's own field checks, as the broker would) refused
a request; ConnectionLost, the client lost the broker or gave up on it.
"""

from __future__ import annotations

import socket

import protocol as wire


class ClientError(Exception):
    """The broker refused a request; `.code` is the ErrorCode, `.name` its wire name. `.cid`:
    see ConnectionLost (only the error of a send or a create whose name is in UNSURE has
    one). `.retry_after`: with "rate_limited", the seconds after which the rate that refused
    the request allows it again, as the broker said (None where it did not say)."""

    # Set on the copy raised to one `send` or `create` whose outcome is unknown (client.py
    # `_with_cid`).
    cid: str | None = None

    def __init__(self, code: int, name: str, message: str, *,
                 retry_after: float | None = None) -> None:
        super().__init__(f"{name}: {message}")
        self.code, self.name, self.message = code, name, message
        self.retry_after = retry_after

    @classmethod
    def of(cls, frame: wire.Error) -> ClientError:
        """The error the broker's `frame` says."""
        return cls(frame.code, frame.name, frame.message,
                   retry_after=None if frame.retry_ms is None else frame.retry_ms / 1000)


class StaleDelivery(ClientError):
    """An `ack` or `done` of a delivery from before the inbox went back (the broker was
    restored from an older backup while the client held it): its inbox_seq names another
    entry of the restored inbox now, one not handed to this application, so nothing is acked.
    `.name` is "invalid", as for the other refusals of a mistaken ack."""

    def __init__(self, what: str, seq: int) -> None:
        super().__init__(wire.ErrorCode.INVALID, wire.ErrorCode.INVALID.wire_name,
                         f"{what}: {seq} is a delivery from before the inbox went back (the "
                         "broker was restored from an older backup): that inbox_seq names "
                         "another entry now, not yet handed to this application, so nothing "
                         "was acked; drop the deliveries taken before the reset (they come "
                         "again if the restored broker has them)")
        self.seq = seq



class ConnectionLost(Exception):
    """The connection dropped while a request that cannot be safely repeated was in flight,
    or the broker could not be reached within the reconnect timeout.

    `.cid`, raised by `send`: the cid it sent (the one it made, when the caller passed none),
    since the broker may have accepted the message: sent again with that cid, it is a dup if
    it was. Raised by `create` (and `create_group`, `create_channel`) to a broker with the
    `create_cid` cap, likewise: called again with it, the create returns the conversation made
    first. None from any other call."""

    cid: str | None = None


class BrokerUnavailable(ConnectionLost):
    """The broker was reached but did not serve this client within the reconnect timeout: it
    refused each session with a refusal worth retrying (`unavailable`: its store unreadable;
    `limit_exceeded`, `shutting_down`, `timeout`), or welcomed it and closed it before it served
    anything (a closing `unavailable`: this device's deliveries unreadable, a damaged page, say).
    `.name` and `.code` are the broker's last refusal or closing error (None: it closed the
    connection without a word)."""

    def __init__(self, message: str, error: ClientError | None = None) -> None:
        super().__init__(message)
        self.name = error.name if error is not None else None
        self.code = error.code if error is not None else None


class NotTrusted(ConnectionLost):
    """The broker's TLS certificate failed verification against our context: retrying would
    not change that, so the client stops at once (a wrong --tls-ca, or a broker to distrust)."""


class NotTls(ConnectionLost):
    """We asked for TLS and the broker answered in the clear (it serves plaintext on that port):
    retrying would not change that, so the client stops at once."""


class UnknownHost(ConnectionLost):
    """The broker's host name does not exist (the resolver said so: no such name, not a
    resolver that failed to answer) when the client first connects: a typo in the address,
    which retrying would not fix, so the client stops at once. Once it was connected, a name
    that stops resolving is an outage like any other and is tried again."""


# The refusals after which a send or a create may have been carried out all the same: a
# broker stopping, or failing after its commit was durable (`internal`, `unavailable`) or past
# the request's time (`timeout`). Any other refusal (forbidden, invalid, conflict, ...) did nothing.
UNSURE = frozenset({"shutting_down", "unavailable", "internal", "timeout"})


# The resolver's answers that a name does not exist, as against one it could not get
# (EAI_AGAIN, EAI_FAIL: a DNS server down or slow), which may pass and is tried again.
_NO_SUCH_NAME = frozenset(getattr(socket, name) for name in ("EAI_NONAME", "EAI_NODATA")
                          if hasattr(socket, name))


# OpenSSL's reasons for a reply that is not TLS at all (a plaintext server's bytes).
_NOT_TLS_REASONS = frozenset({"WRONG_VERSION_NUMBER", "UNKNOWN_PROTOCOL", "HTTP_REQUEST",
                              "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE"})


class ClientClosed(ConnectionLost):
    """The client was closed (its `open_client` block ended): a request made after that, or
    still waiting for its answer then, raises this. It may have reached the broker."""


class Replaced(ConnectionLost):
    """Another session of the same user and device connected, and the broker closed this one
    (PROTOCOL.md §9). The client does not reconnect: two processes using one device name would
    otherwise take the session from each other for ever."""
