"""A stream broken on a replica that keeps the session (a proxy reset, a network blip)
resumes there, and its ``Done`` counts as the unbroken call's: the positions found
cached are those before the call's offset (less those a scored range fed again), not
the whole prompt the resuming call found in the KV (after a call that decoded, the
client cannot tell that the server never fed its last token: the count can be one more). The break is a relay between the
client and a real server dropping every connection mid-stream, as a restarted proxy
does. Oracle: the same call, unbroken, on the same server."""

from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from salience_client import Done, Failover, SalienceClient, TokenEvent
from tests.helpers import random_tokens


class Relay:
    """Forwards loopback TCP connections to ``target``; ``cut()`` drops every one open."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.listener.getsockname()[1]}"

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                server = socket.create_connection(self.upstream)
                with self.lock:
                    self.sockets += [client, server]
                for source, sink in ((client, server), (server, client)):
                    threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        with self.lock:
            dropped, self.sockets = self.sockets, []
        for sock in dropped:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self.listener.close()
        self.cut()


def _call(client: SalienceClient, options: dict[str, Any], relay: Relay | None) -> tuple[Any, ...]:
    """A prefilled session, then a turn; its decoded tokens and Done."""
    with client.open_session() as session:
        session.prefill(random_tokens(11, 1))
        events = session.generate(random_tokens(8, 3), max_tokens=300, ignore_eos=True, **options)
        tokens = []
        for event in events:
            if isinstance(event, TokenEvent) and not event.is_prefill:
                tokens.append(event.token_id)
                if relay is not None and len(tokens) == 10:
                    relay.cut()
        assert isinstance(event, Done)
        return tokens, event, session.num_resumes, session.num_replays


@pytest.mark.parametrize(
    "options",
    [{}, {"logprobs_ranges": [(3, 2**32 - 1)]}, {"logprobs_ranges": [(11, 12)]}],
    ids=["plain", "scoring-from-before-the-offset", "scoring-the-first-appended"],
)
def test_a_stream_resumed_on_its_replica_counts_what_the_unbroken_call_found_cached(
    long_context_llama_dir: Path, server_factory: Any, options: dict[str, Any]
) -> None:
    server = server_factory(long_context_llama_dir, block_size=4, kv_cache_bytes=4 << 20)
    with SalienceClient(server.target, timeout=30) as client:
        want_tokens, want, _, _ = _call(client, options, None)
    relay = Relay(server.target)
    try:
        budget = Failover(retry_budget_s=10.0, first_retry_wait_s=0.05)
        with SalienceClient(relay.target, timeout=30, replay=budget) as client:
            tokens, done, num_resumes, num_replays = _call(client, options, relay)
    finally:
        relay.close()
    assert (num_resumes, num_replays) == (1, 0) and tokens == want_tokens
    assert (done.prompt_tokens, done.completion_tokens, done.total_tokens) == (
        want.prompt_tokens,
        want.completion_tokens,
        want.total_tokens,
    )
    assert (done.cached_tokens, done.recomputed_tokens) == (want.cached_tokens, 0)
