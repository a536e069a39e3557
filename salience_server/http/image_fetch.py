"""Remote images (``--allow-remote-images``): downloads in threads of their own, bounded in
size and in time, and stopped when their request is.

A slow host must hold neither the threads the server's other work runs in (the event
loop's default executor: tokenization) nor a download for longer than the deadline: the
socket timeout bounds each wait on the host, not the whole (a byte every few seconds,
headers included, went on for as long as the host liked), so a timer shuts the
download's sockets at the deadline, as a cancelled request does.
"""

from __future__ import annotations

import asyncio
import http.client
import socket
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from salience_server.http.errors import invalid

FETCH_WORKERS = 4
"""Image downloads at once."""
FETCH_TIMEOUT_S = 10.0
"""Each wait on the image's host (connecting, each read)."""
FETCH_DEADLINE_S = 30.0
"""A whole download, from its start."""
_fetches: ThreadPoolExecutor | None = None


async def fetch(url: str, max_bytes: int) -> tuple[bytes, str]:
    """``fetch_image`` in the downloads' own threads; a request that is cancelled (its
    client left) stops its download."""
    global _fetches
    if _fetches is None:
        _fetches = ThreadPoolExecutor(FETCH_WORKERS, thread_name_prefix="salience-fetch")
    download = Download()
    loop = asyncio.get_running_loop()
    try:
        return await loop.run_in_executor(_fetches, fetch_image, url, max_bytes, download)
    except asyncio.CancelledError:
        download.stop("the request was cancelled")
        raise


class Download:
    """One download's sockets, which ``stop`` shuts (its deadline, its request's end)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.stopped = ""
        """Why it was stopped; empty while it may run."""

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.stopped:
                _shut(sock)

    def stop(self, why: str) -> None:
        with self._lock:
            self.stopped = self.stopped or why
            for sock in self._sockets:
                _shut(sock)

    def opener(self) -> urllib.request.OpenerDirector:
        """urllib's opener, its HTTP(S) connections' sockets watched."""
        return urllib.request.build_opener(_Http(self), _Https(self))


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)  # a read waiting on it returns at once
    except OSError:
        pass


def _watched(connection_class: Any, download: Download) -> Any:
    class Watched(connection_class):  # type: ignore[misc,valid-type]
        def connect(self) -> None:
            super().connect()
            download.watch(self.sock)

    return Watched


class _Http(urllib.request.HTTPHandler):
    def __init__(self, download: Download) -> None:
        super().__init__()
        self._download = download

    def http_open(self, req: Any) -> Any:
        return self.do_open(_watched(http.client.HTTPConnection, self._download), req)


class _Https(urllib.request.HTTPSHandler):
    def __init__(self, download: Download) -> None:
        super().__init__()
        self._download = download

    def https_open(self, req: Any) -> Any:
        connection = _watched(http.client.HTTPSConnection, self._download)
        return self.do_open(connection, req, context=self._context)  # type: ignore[attr-defined]


def fetch_image(url: str, max_bytes: int, download: Download | None = None) -> tuple[bytes, str]:
    """GETs an image URL (bounded size and time: ``FETCH_TIMEOUT_S`` a wait,
    ``FETCH_DEADLINE_S`` in all); an ApiError 400 when it fails."""
    download = download or Download()
    deadline = threading.Timer(
        FETCH_DEADLINE_S, download.stop, [f"the download took over {FETCH_DEADLINE_S:g} s"]
    )
    deadline.daemon = True
    deadline.start()
    chunks: list[bytes] = []
    size = 0
    try:
        if download.stopped:
            raise TimeoutError(download.stopped)
        with download.opener().open(url, timeout=FETCH_TIMEOUT_S) as response:
            mime_type = response.headers.get_content_type()
            while size <= max_bytes and (chunk := response.read1(64 << 10)):
                chunks.append(chunk)
                size += len(chunk)
        if download.stopped:  # the shut socket read as the body's end
            raise TimeoutError(download.stopped)
    except Exception as error:
        reason = download.stopped or error
        raise invalid(f"could not fetch the image {url!r}: {reason}", "image_url") from error
    finally:
        deadline.cancel()
    if size > max_bytes:
        raise invalid(f"the image at {url!r} is larger than {max_bytes} bytes", "image_url")
    return b"".join(chunks), mime_type
