"""The shim when its HTTP client leaves: before the first token, mid-stream, or during a
plain request, the call ends and the session goes back to the pool."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from salience_client import SalienceClient
from tests.shim_support import HELLO, RunningShim, Script, start_scripted, start_shim


def _settled(target: str, shim: RunningShim, timeout_s: float = 10.0) -> list[Any]:
    """The server's sessions once none is busy and the shim has lent none."""
    with SalienceClient(target) as client:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            sessions = client.list_sessions()
            if not any(s.is_busy for s in sessions) and shim.backend.pool.num_leased == 0:
                return sessions
            time.sleep(0.05)
    raise AssertionError("a session stayed busy after the client went away")


def test_a_dropped_stream_stops_the_generation(
    default_shim: RunningShim, default_server: Any
) -> None:
    client = default_shim.client()
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": "Write a long story about a lighthouse."}]
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=400, temperature=0, stream=True
    )
    for _, _chunk in zip(range(4), stream, strict=False):
        pass
    stream.close()
    sessions = _settled(default_server.target, default_shim)
    prompt_length = len(SalienceClient(default_server.target).tokenize_chat(messages))
    assert max(s.length for s in sessions) < prompt_length + 200  # cut well short of 400


def test_a_dropped_plain_request_stops_the_generation(
    default_shim: RunningShim, default_server: Any
) -> None:
    model = default_shim.client().models.list().data[0].id
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Describe the sea at length."}],
        "max_tokens": 400,
        "temperature": 0,
    }
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{default_shim.base_url}/chat/completions", json=body, timeout=1.0)
    sessions = _settled(default_server.target, default_shim)
    assert max(s.length for s in sessions) < 300


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("chat/completions", {"messages": HELLO}),
        ("completions", {"prompt": "x"}),
        ("responses", {"input": "x"}),
    ],
)
def test_a_stream_dropped_before_its_first_token_stops_the_call_at_once(
    path: str, body: dict[str, Any]
) -> None:
    """The client leaves while the first token is awaited (a long prefill, a queue):
    the call ends then. It ran on until the first keep-alive (15 s by default), or with
    keep-alives off, until its first token however long that took."""
    script = Script(first_token_delay_s=60)
    server = start_scripted(script)
    running = start_shim(server.target, keepalive_s=0)
    try:
        request = {"model": "scripted", "stream": True, **body}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{running.base_url}/{path}", json=request, timeout=0.5)
        deadline = time.monotonic() + 5
        while running.backend.pool.num_leased and time.monotonic() < deadline:
            time.sleep(0.05)
        assert running.backend.pool.num_leased == 0
    finally:
        running.stop()
        server.stop()
