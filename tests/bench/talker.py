"""A TCP server in a thread that answers each connection with fixed bytes, or stays silent:
what a peer URL may meet at an address where another kind of server listens."""

from __future__ import annotations

import contextlib
import socket
import threading


class Talker:
    """A TCP server that answers every connection with `reply` (nothing: stays silent)."""

    def __init__(self, reply: bytes) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.reply, self.conns = reply, []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:  # closed
                return
            self.conns.append(conn)
            if self.reply:
                conn.sendall(self.reply)

    def close(self) -> None:
        with contextlib.suppress(OSError):  # wakes the accept() waiting in the thread (Linux)
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for conn in self.conns:
            conn.close()

    def __enter__(self) -> Talker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
