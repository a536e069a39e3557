"""Property-based fuzzing of every gRPC method with malformed, extreme and odd fields.

Each example opens two small sessions on a real server (the tiny Llama for text, the
tiny Qwen2-VL for images), makes a few calls drawn from ``tests/fuzz_strategies.py``
and checks that each is answered OK or with a status SPEC 2.5 names for that method,
with an ErrorInfo reason and a one-line message free of Python internals, within a
deadline (no hang), and with nothing logged as an unexpected failure. A Generate that
succeeds streams its events then exactly one Done that matches the session's new
length. After the example every session is closed: none may remain, the engine holds
no request, and every KV block is free again (nothing leaked). Then a plain greedy
Generate must still answer as it did before the example (the server still serves).

CI runs a bounded, derandomized profile; ``SALIENCE_FUZZ_EXAMPLES=N`` runs longer by
hand.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from salience_client.pb import salience_pb2 as pb
from tests import fuzz_strategies as fs
from tests.conftest import RunningServer, start_server
from tests.helpers import error_reason
from tests.tiny_models import build_tiny_vision_model

DEADLINE_S = 30.0
MAX_CONTEXT = 48
FUZZ = settings(
    max_examples=int(os.environ.get("SALIENCE_FUZZ_EXAMPLES", "25")),
    deadline=None,
    derandomize="SALIENCE_FUZZ_EXAMPLES" not in os.environ,
    database=None,
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
S = grpc.StatusCode
SESSION_CALL = {S.INVALID_ARGUMENT, S.NOT_FOUND}
ALLOWED = {
    "OpenSession": {S.INVALID_ARGUMENT, S.ALREADY_EXISTS, S.RESOURCE_EXHAUSTED},
    "Generate": SESSION_CALL | {S.ABORTED, S.FAILED_PRECONDITION, S.RESOURCE_EXHAUSTED},
    "AppendImage": SESSION_CALL | {S.ABORTED, S.FAILED_PRECONDITION, S.RESOURCE_EXHAUSTED},
    "CloseSession": SESSION_CALL,
    "ForkSession": SESSION_CALL | {S.ALREADY_EXISTS, S.FAILED_PRECONDITION, S.RESOURCE_EXHAUSTED},
    "GetSession": SESSION_CALL,
    "Tokenize": {S.INVALID_ARGUMENT, S.FAILED_PRECONDITION, S.RESOURCE_EXHAUSTED},
    "Detokenize": {S.INVALID_ARGUMENT, S.RESOURCE_EXHAUSTED},
    "Embed": {S.INVALID_ARGUMENT, S.RESOURCE_EXHAUSTED},
}
INTERNALS = ("Traceback", 'File "', "Error:", "Exception", "<class ")
"""Text of a Python traceback or exception repr, which no message may carry."""


class ErrorLog(logging.Handler):
    """Keeps the server's ERROR records (an unexpected failure is logged as one)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def errors() -> Iterator[ErrorLog]:
    handler = ErrorLog()
    logging.getLogger("salience_server").addHandler(handler)
    yield handler
    logging.getLogger("salience_server").removeHandler(handler)


@pytest.fixture(scope="module")
def text_server(tiny_llama_dir: Any) -> Iterator[RunningServer]:
    server = start_server(str(tiny_llama_dir), block_size=4, kv_cache_bytes=1 << 16, max_queue=8)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def vision_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    model_dir = build_tiny_vision_model(tmp_path_factory.mktemp("fuzz-vl"), "qwen2_vl")
    server = start_server(str(model_dir), block_size=4, kv_cache_bytes=1 << 18)
    yield server
    server.stop()


class Fuzzer:
    """One example's calls on ``server``: the sessions they made, each call's check."""

    def __init__(self, server: RunningServer, errors: ErrorLog) -> None:
        self.server, self.stub, self.errors = server, server.stub, errors
        self.lengths: dict[str, int] = {}
        """Live sessions this example opened or forked, with their known length."""

    def open(self, prefix: list[int]) -> None:
        session_id = self.stub.OpenSession(
            pb.OpenSessionRequest(max_context=MAX_CONTEXT)
        ).session_id
        self.lengths[session_id] = 0
        if prefix:
            self.generate(pb.GenerateRequest(session_id=session_id, append_tokens=prefix))

    def call(self, method: str, request: Any, cancel_after: int | None = None) -> Any:
        """``request`` answered, or None where it was refused (checked against SPEC);
        a Generate stream is cancelled after ``cancel_after`` events, if given."""
        try:
            if method == "Generate" and cancel_after is not None:
                return self.cancel(request, cancel_after)
            if method == "Generate":
                response = self.generate(request)
            else:
                response = getattr(self.stub, method)(request, timeout=DEADLINE_S)
        except grpc.RpcError as error:
            event(f"{method}: {error.code().name}")
            self.check_refusal(method, error)
            return None
        event(f"{method}: OK")
        if method == "Generate":
            return response
        if method in ("OpenSession", "ForkSession"):
            self.lengths[response.session_id] = getattr(response, "length", 0)
        elif method == "CloseSession":
            self.lengths.pop(request.session_id, None)
        elif method == "AppendImage":
            self.lengths[request.session_id] = response.total_length
        return response

    def generate(self, request: pb.GenerateRequest) -> pb.Done:
        events = list(self.stub.Generate(request, timeout=DEADLINE_S))
        assert events and events[-1].HasField("done"), "a stream that ended without Done"
        assert all(e.HasField("token") for e in events[:-1]), "an event after Done"
        done = events[-1].done
        assert done.total_tokens == done.prompt_tokens + done.completion_tokens
        assert done.completion_tokens <= request.max_tokens
        positions = [e.token.position for e in events[:-1]]
        assert positions == sorted(set(positions)), "positions repeated or out of order"
        if done.stop_string or done.finish_reason == pb.FINISH_REASON_STOP_STRING:
            assert done.finish_reason == pb.FINISH_REASON_STOP_STRING, done
            assert done.stop_string in request.stop_strings, done
        self.checked(request, events)
        self.lengths[request.session_id] = done.total_tokens
        return done

    def checked(self, request: pb.GenerateRequest, events: list[pb.GenerateEvent]) -> None:
        """Further checks of a finished Generate's events (``test_fuzz_readout``'s oracle)."""

    def cancel(self, request: pb.GenerateRequest, num_read: int) -> None:
        """Reads ``num_read`` events, then cancels; the session's length is then
        whatever the call committed before the cancel reached it."""
        stream = self.stub.Generate(request, timeout=DEADLINE_S)
        for _ in zip(range(num_read), stream, strict=False):
            pass
        stream.cancel()
        if request.session_id not in self.lengths:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            info = self.stub.GetSession(pb.GetSessionRequest(session_id=request.session_id))
            if not info.session.busy:
                self.lengths[request.session_id] = info.session.length
                return
            time.sleep(0.01)
        raise AssertionError("a cancelled call kept its session busy")

    def check_refusal(self, method: str, error: grpc.RpcError) -> None:
        code, message = error.code(), error.details() or ""
        assert code in ALLOWED[method], (method, code, message)
        assert error_reason(error), (method, message)
        assert "\n" not in message.strip(), (method, message)
        assert message.strip(), (method, message)
        assert not any(marker in message for marker in INTERNALS), (method, message)

    def finish(self) -> None:
        """Closes every session; checks nothing was left behind, nor logged."""
        for session_id in list(self.lengths):
            info = self.stub.GetSession(pb.GetSessionRequest(session_id=session_id)).session
            assert info.length == self.lengths[session_id], "the session's length drifted"
            self.stub.CloseSession(pb.CloseSessionRequest(session_id=session_id))
        engine = self.server.engine
        deadline = time.monotonic() + 10
        while engine.scheduler.has_work() and time.monotonic() < deadline:
            time.sleep(0.01)
        with engine._lock:
            assert not engine.scheduler.has_work(), "a request was left in the engine"
            assert not engine.sessions, f"sessions leaked: {list(engine.sessions)}"
            assert engine.block_manager.num_free == engine.block_manager.num_blocks
            assert engine.images.num_bytes() == 0 and engine.evictor.host_bytes_used == 0
        assert not self.errors.records, [r.getMessage() for r in self.errors.records]


def still_serves(server: RunningServer) -> list[int]:
    """A plain greedy decode of 4 tokens after ``[1, 2, 3]`` on a fresh session."""
    stub = server.stub
    session_id = stub.OpenSession(pb.OpenSessionRequest()).session_id
    request = pb.GenerateRequest(session_id=session_id, append_tokens=[1, 2, 3], max_tokens=4)
    events = list(stub.Generate(request, timeout=DEADLINE_S))
    stub.CloseSession(pb.CloseSessionRequest(session_id=session_id))
    return [e.token.id for e in events if e.HasField("token")]


def run_example(server: RunningServer, errors: ErrorLog, data: st.DataObject, calls: Any) -> None:
    errors.records.clear()
    expected = still_serves(server)
    fuzzer = Fuzzer(server, errors)
    try:
        fuzzer.open([])
        prefix = st.lists(st.integers(0, 255), min_size=1, max_size=8)
        fuzzer.open(data.draw(prefix, label="prefix"))
        for _ in range(data.draw(st.integers(1, 4), label="calls")):
            method, request = data.draw(calls(fuzzer), label="call")
            cancel = data.draw(st.none() | st.none() | st.integers(0, 3), label="cancel after")
            fuzzer.call(method, request, cancel)
        fuzzer.finish()
    finally:  # a failed example leaves nothing to the next one
        close_all(server)
    assert still_serves(server) == expected


def close_all(server: RunningServer) -> None:
    stub = server.stub
    for info in stub.ListSessions(pb.ListSessionsRequest()).sessions:
        try:
            stub.CloseSession(pb.CloseSessionRequest(session_id=info.session_id))
        except grpc.RpcError:
            pass  # closed meanwhile


def text_calls(fuzzer: Fuzzer) -> st.SearchStrategy[tuple[str, Any]]:
    live = fuzzer.lengths
    ids = fs.session_id(list(live))

    def on(method: str, strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[tuple[str, Any]]:
        return strategy.map(lambda request: (method, request))

    choices: list[st.SearchStrategy[tuple[str, Any]]] = [
        on("Generate", fs.generate_request(dict(live))),
        on("Generate", fs.generate_request(dict(live))),
        on(
            "OpenSession",
            st.builds(pb.OpenSessionRequest, session_id=st.just("") | ids, max_context=fs.u32),
        ),
        on(
            "ForkSession",
            st.builds(pb.ForkSessionRequest, session_id=ids, new_session_id=st.just("") | ids),
        ),
        on("CloseSession", st.builds(pb.CloseSessionRequest, session_id=ids)),
        on("GetSession", st.builds(pb.GetSessionRequest, session_id=ids)),
        on("Tokenize", fs.tokenize_request()),
        on("Detokenize", fs.detokenize_request()),
        on("Embed", fs.embed_request()),
        on("AppendImage", image_request(live)),
    ]
    return st.one_of(choices)


def image_request(live: dict[str, int]) -> st.SearchStrategy[pb.AppendImageRequest]:
    def build(session_id: str, image: tuple[bytes, str], offset: int, truncating: bool) -> Any:
        return pb.AppendImageRequest(
            session_id=session_id,
            image=image[0],
            mime_type=image[1],
            offset=live.get(session_id, 0) if offset < 0 else offset,
            truncating=truncating,
        )

    offset = st.just(-1) | st.just(-1) | fs.u32
    return st.builds(build, fs.session_id(list(live)), fs.image_bytes(), offset, st.booleans())


def vision_calls(fuzzer: Fuzzer) -> st.SearchStrategy[tuple[str, Any]]:
    live = fuzzer.lengths
    return st.one_of(
        image_request(live).map(lambda request: ("AppendImage", request)),
        fs.generate_request(dict(live)).map(lambda request: ("Generate", request)),
        fs.tokenize_request().map(lambda request: ("Tokenize", request)),
    )


@FUZZ
@given(data=st.data())
def test_fuzzed_calls_get_spec_statuses_and_leave_nothing_behind(
    text_server: RunningServer, errors: ErrorLog, data: st.DataObject
) -> None:
    run_example(text_server, errors, data, text_calls)


@FUZZ
@given(data=st.data())
def test_fuzzed_image_calls_get_spec_statuses_and_leave_nothing_behind(
    vision_server: RunningServer, errors: ErrorLog, data: st.DataObject
) -> None:
    run_example(vision_server, errors, data, vision_calls)


@FUZZ
@given(method=st.sampled_from(sorted(ALLOWED)), raw=st.binary(max_size=64))
def test_fuzzed_bytes_get_spec_statuses(
    text_server: RunningServer, errors: ErrorLog, method: str, raw: bytes
) -> None:
    """Bytes on the wire rather than a message: those that parse are whatever request
    they spell (unknown fields, odd varints, a session id of any bytes)."""
    errors.records.clear()
    fuzzer = Fuzzer(text_server, errors)
    identity = dict(request_serializer=lambda b: b, response_deserializer=lambda b: b)
    path = f"/salience.v1.Salience/{method}"
    try:
        if method == "Generate":
            list(text_server.channel.unary_stream(path, **identity)(raw, timeout=DEADLINE_S))
        else:
            text_server.channel.unary_unary(path, **identity)(raw, timeout=DEADLINE_S)
    except grpc.RpcError as error:
        fuzzer.check_refusal(method, error)
    finally:
        close_all(text_server)
    fuzzer.finish()
