"""The shim's HTTP connections: uvicorn's h11 protocol, with a bound on how long a
request's headers may take to arrive.

uvicorn times out an idle connection only after a response (its keep-alive), and stops
that timer at the first byte that comes: a connection that sends nothing, or part of a
request's headers and then nothing (slowloris), was held forever, and enough of them
take every file descriptor of the process, the gRPC server's included. The body has its
own bounds (``request_body``).
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADERS_TIMEOUT_S = 30.0
"""How long a request's line and headers may take to arrive, from the connection's start
or from the first byte of a request that follows another on it; the connection is then
closed."""


class HeadersInTime(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request headers do not all
    arrive within ``HEADERS_TIMEOUT_S``."""

    _headers_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watch_headers()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_headers()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # uvicorn's keep-alive timer bounds the idle wait
        self._stop_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        super().connection_lost(exc)

    def _awaits_headers(self) -> bool:
        """No request's headers have all come since the connection began or the last
        response ended (h11 gives the request once they have)."""
        return self.conn.their_state is h11.IDLE and not self.transport.is_closing()

    def _watch_headers(self) -> None:
        """Arms the timer while headers are awaited and uvicorn's keep-alive timer is not
        running (a new connection; bytes of a request after a response, which stopped
        it), and stops it once they are all in."""
        if not self._awaits_headers():
            self._stop_timer()
        elif self._headers_timer is None and self.timeout_keep_alive_task is None:
            self._headers_timer = self.loop.call_later(HEADERS_TIMEOUT_S, self._headers_late)

    def _headers_late(self) -> None:
        self._headers_timer = None
        if self._awaits_headers():
            self.logger.info("closed a connection whose request headers did not come in time")
            self.transport.close()

    def _stop_timer(self) -> None:
        if self._headers_timer is not None:
            self._headers_timer.cancel()
            self._headers_timer = None
