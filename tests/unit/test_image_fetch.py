"""Remote images (``--allow-remote-images``): a slow host gets a bounded time, and its
downloads hold none of the threads the server's other work runs in; and the images the
shim remembers stay bounded."""

from __future__ import annotations

import asyncio
import http.server
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from salience_server.http import image_fetch, image_markers
from salience_server.http.errors import ApiError


class _Trickler(http.server.BaseHTTPRequestHandler):
    """Sends ``head`` at once, then ``trickled`` a byte every 0.3 s while the client reads."""

    head = b""
    trickled = b""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.wfile.write(self.head)
        for byte in self.trickled:
            try:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
            except OSError:
                return
            time.sleep(0.3)

    def log_message(self, *args: object) -> None:
        pass


class _Trickle(_Trickler):
    """Headers at once, then the body a byte at a time."""

    head = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n"
    trickled = b"x" * 1000


class _TrickledHeaders(_Trickler):
    """Its status line and headers a byte at a time."""

    trickled = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nX-Pad: " + b"p" * 200


def _serving(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/image.png"
    finally:
        server.shutdown()


@pytest.fixture
def slow_url() -> Iterator[str]:
    yield from _serving(_Trickle)


@pytest.mark.parametrize("handler", [_Trickle, _TrickledHeaders], ids=["body", "headers"])
def test_a_host_sending_a_byte_at_a_time_gets_a_bounded_time(
    handler: type[http.server.BaseHTTPRequestHandler], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The socket timeout bounds each wait, not the download: a byte every few seconds
    held the request (and a thread) for as long as the host liked; the bound, checked
    between reads of the body, let headers trickle in without one."""
    monkeypatch.setattr(image_fetch, "FETCH_DEADLINE_S", 1.0)
    url = next(serving := _serving(handler))
    start = time.monotonic()
    with pytest.raises(ApiError, match="the download took over 1 s"):
        image_fetch.fetch_image(url, 1 << 20)
    assert time.monotonic() - start < 3
    serving.close()


def test_slow_downloads_leave_the_default_threads_free(
    slow_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Downloads ran in the event loop's default executor (6 threads on 2 cores), which
    gRPC's Tokenize shares: eight slow images stalled every other request. They have
    their own threads now, and a request that is cancelled stops its download."""
    monkeypatch.setattr(image_fetch, "FETCH_DEADLINE_S", 60.0)

    async def scenario() -> float:
        downloads = [asyncio.create_task(image_fetch.fetch(slow_url, 1 << 20)) for _ in range(8)]
        await asyncio.sleep(0.5)
        start = time.monotonic()
        await asyncio.to_thread(lambda: None)  # what Tokenize waits for
        waited = time.monotonic() - start
        for download in downloads:
            download.cancel()
        await asyncio.gather(*downloads, return_exceptions=True)
        return waited

    assert asyncio.run(scenario()) < 0.5
    deadline = time.monotonic() + 3
    while _downloading():  # each stops at its next byte
        assert time.monotonic() < deadline, "cancelled downloads went on"
        time.sleep(0.1)


def _downloading() -> int:
    """Threads now inside ``fetch_image``."""
    count = 0
    for frame in sys._current_frames().values():
        while frame is not None and frame.f_code is not image_fetch.fetch_image.__code__:
            frame = frame.f_back  # type: ignore[assignment]
        count += frame is not None
    return count


def test_the_images_known_are_the_most_recent(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each image's placeholder count was kept for good: a screenshot agent's shim grew
    without end."""
    monkeypatch.setattr(image_markers, "MAX_KNOWN_IMAGES", 3)
    counts = image_markers.RecentCounts()
    for marker in range(-1, -6, -1):
        counts[marker] = 16
    counts[-3] = 20  # stored again: the most recent
    counts[-6] = 16
    assert list(counts) == [-5, -3, -6]
    assert counts.get(-5) == 16  # read (a conversation's image, each turn): recent too
    counts[-7] = 16
    assert list(counts) == [-6, -5, -7] and counts.get(-1, 1) == 1
