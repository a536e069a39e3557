"""Property-based fuzzing of the OpenAI shim's routes with odd JSON bodies.

Each example sends one body drawn from ``tests/fuzz_bodies.py`` (a valid request with
some fields replaced by wrong types, nulls, huge numbers, deep nesting, odd unicode,
bad image URLs; streaming on or off) or raw bytes that are barely JSON, to the shim in
front of the tiny Llama server (or the tiny Qwen2-VL, for image parts); sometimes the
client leaves after the first line of the answer. The answer must come within a
deadline, never be a 5xx, and an error must have OpenAI's shape with a one-line message
free of Python internals; a stream must be well-formed SSE that ends with ``[DONE]`` or
an error event. After the example the shim leases no session, the server runs no
request and holds no busy session, every server session is one the shim's pool knows,
and the block pool balances. A plain greedy chat completion still answers as before.

CI runs a bounded, derandomized profile; ``SALIENCE_FUZZ_EXAMPLES=N`` runs longer.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from tests.conftest import RunningServer, start_server
from tests.fuzz_bodies import ENDPOINTS, body, encode
from tests.integration.test_fuzz_grpc import FUZZ, INTERNALS
from tests.shim_support import RunningShim, start_shim
from tests.tiny_models import build_tiny_vision_model

DEADLINE_S = 60.0
RAW = [
    b"",
    b"{",
    b"[]",
    b"null",
    b"1",
    b'"x"',
    b'{"model": NaN}',
    b'{"a": Infinity}',
    b"\xff\xfe{}",
    b'{"model": "\\ud800"}',
    b"{" * 100000,
    b'{"messages": [{"role": "user", "content": "' + b"a" * 100 + b'"}], "x": 1e999}',
]


def check_error(response: httpx.Response, what: Any) -> None:
    assert response.status_code < 500, (what, response.status_code, response.text[:2000])
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, (what, error)
    check_message(str(error["message"]), what)


def check_message(message: str, what: Any) -> None:
    assert message.strip() and "\n" not in message.strip(), (what, message)
    assert not any(marker in message for marker in INTERNALS), (what, message)


def check_stream(response: httpx.Response, what: Any) -> None:
    """Every ``data:`` line is JSON or ``[DONE]``; it ends with ``[DONE]`` or an error."""
    datas = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert datas, (what, response.text[:500])
    for data in datas[:-1]:
        chunk = json.loads(data)
        if isinstance(chunk, dict) and "error" in chunk:
            check_message(str(chunk["error"].get("message", "")), what)
    last = datas[-1]
    if last != "[DONE]":
        chunk = json.loads(last)
        kind = chunk.get("type", "")
        assert "error" in chunk or kind in ("response.completed", "response.failed", "error"), (
            what,
            last[:500],
        )
        if "error" in chunk and isinstance(chunk["error"], dict):
            check_message(str(chunk["error"].get("message", "")), what)


def post(shim: RunningShim, path: str, content: bytes) -> httpx.Response:
    url = shim.base_url.removesuffix("/v1") + path
    headers = {"content-type": "application/json"}
    return httpx.post(url, content=content, headers=headers, timeout=DEADLINE_S)


def leave_early(shim: RunningShim, path: str, content: bytes) -> None:
    """Sends the body, reads the answer's first line (a stream's first event), and
    closes the connection: the shim must stop the generation and free its session."""
    url = shim.base_url.removesuffix("/v1") + path
    headers = {"content-type": "application/json"}
    with httpx.stream("POST", url, content=content, headers=headers, timeout=DEADLINE_S) as r:
        assert r.status_code < 500, (path, r.status_code)
        next(r.iter_lines(), None)


def check_answer(response: httpx.Response, what: Any) -> None:
    event(f"{what[0]}: {response.status_code}")
    if response.status_code >= 400:
        check_error(response, what)
    elif response.headers.get("content-type", "").startswith("text/event-stream"):
        check_stream(response, what)
    else:
        response.json()


def left_nothing(shim: RunningShim, server: Any) -> None:
    """No lease, no request, no busy or unknown session; the block pool balances."""
    pool, engine = shim.backend.pool, server.engine

    def settling() -> bool:  # the pool closes a session it dropped in a task of its own
        busy = pool.num_leased or engine.scheduler.has_work()
        return bool(busy or len(engine.sessions) > pool.num_sessions)

    deadline = time.monotonic() + 10
    while settling() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pool.num_leased == 0, "the shim kept a session leased"
    with engine._lock:
        assert not engine.scheduler.has_work(), "a request was left in the engine"
        sessions = list(engine.sessions.values())
        assert not [s.session_id for s in sessions if s.is_busy], "a session left busy"
        assert len(sessions) <= pool.num_sessions, "a session the shim no longer knows"
        engine.block_manager.check_invariants([s.block_table for s in sessions])


def greedy(shim: RunningShim, model: str) -> str:
    completion = shim.client().chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0
    )
    return str(completion.choices[0].message.content)


@pytest.fixture(scope="module")
def expected(shim: RunningShim, model: str) -> str:
    return greedy(shim, model)


@pytest.fixture(scope="module")
def vision_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    model_dir = build_tiny_vision_model(tmp_path_factory.mktemp("fuzz-shim-vl"), "qwen2_vl")
    server = start_server(str(model_dir), block_size=4, kv_cache_bytes=1 << 20)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def vision_shim(vision_server: RunningServer) -> Iterator[RunningShim]:
    """The shim in front of the tiny Qwen2-VL, fetching remote images too (the fuzzed
    ones point at a loopback port no one listens on)."""
    running = start_shim(vision_server.target, allow_remote_images=True)
    yield running
    running.stop()


@FUZZ
@given(data=st.data())
def test_fuzzed_bodies_get_4xx_or_answers_and_leave_nothing_behind(
    shim: RunningShim, llama_server: Any, model: str, expected: str, data: st.DataObject
) -> None:
    fuzz_one(shim, llama_server, model, expected, data, sorted(ENDPOINTS))


@FUZZ
@given(data=st.data())
def test_fuzzed_image_bodies_get_4xx_or_answers_and_leave_nothing_behind(
    vision_shim: RunningShim, vision_server: RunningServer, data: st.DataObject
) -> None:
    model = vision_shim.client().models.list().data[0].id
    expected = greedy(vision_shim, model)
    paths = ["/v1/chat/completions", "/v1/responses", "/tokenize"]
    fuzz_one(vision_shim, vision_server, model, expected, data, paths, images=True)


def fuzz_one(
    shim: RunningShim,
    server: RunningServer,
    model: str,
    expected: str,
    data: st.DataObject,
    paths: list[str],
    images: bool = False,
) -> None:
    """One fuzzed body to one of ``paths``, checked; then nothing left, and serving."""
    path = data.draw(st.sampled_from(paths), label="path")
    if data.draw(st.integers(0, 9), label="raw?") == 0:
        content = data.draw(st.sampled_from(RAW), label="raw")
        what: Any = (path, content[:200])
    else:
        request = data.draw(body(path, model, images), label="body")
        content = encode(request)
        what = (path, request)
    if data.draw(st.integers(0, 4), label="leave early?") == 0:
        leave_early(shim, path, content)
    else:
        check_answer(post(shim, path, content), what)
    left_nothing(shim, server)
    assert greedy(shim, model) == expected
