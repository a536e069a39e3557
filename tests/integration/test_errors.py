"""Every bad call gets its status code and reason, and leaves the session unchanged."""

from __future__ import annotations

import math

import grpc
import pytest

from salience_client.pb import salience_pb2 as pb
from tests.helpers import engine_held_in_a_step, error_reason, generate, open_session


def _length(stub, session_id: str) -> int:
    return stub.GetSession(pb.GetSessionRequest(session_id=session_id)).session.length


@pytest.fixture
def session(llama_server):
    session_id = open_session(llama_server.stub)
    generate(llama_server.stub, session_id, append_tokens=[1, 2, 3, 4, 5])
    yield session_id
    llama_server.stub.CloseSession(pb.CloseSessionRequest(session_id=session_id))


_RANGE = pb.PositionRange(start=5, end=6)

BAD_CALLS = {
    "offset past the end": (
        dict(offset=9, append_tokens=[1]),
        grpc.StatusCode.ABORTED,
        "OFFSET_MISMATCH",
    ),
    "rewind without truncating": (
        dict(offset=2, append_tokens=[1]),
        grpc.StatusCode.ABORTED,
        "OFFSET_MISMATCH",
    ),
    "out-of-vocabulary id": (
        dict(offset=5, append_tokens=[7, 100000]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_TOKEN",
    ),
    "NaN temperature": (
        dict(offset=5, max_tokens=3, temperature=math.nan),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_SAMPLING",
    ),
    "negative temperature": (
        dict(offset=5, max_tokens=3, temperature=-1.0),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_SAMPLING",
    ),
    "infinite temperature": (
        dict(offset=5, max_tokens=3, temperature=math.inf),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_SAMPLING",
    ),
    "top_p above 1": (
        dict(offset=5, max_tokens=3, top_p=1.5),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_SAMPLING",
    ),
    "min_p above 1": (
        dict(offset=5, max_tokens=3, min_p=2.0),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_SAMPLING",
    ),
    "context overflow": (
        dict(offset=5, append_tokens=[3] * 600),
        grpc.StatusCode.INVALID_ARGUMENT,
        "CONTEXT_EXCEEDED",
    ),
    "range ending before its start": (
        dict(offset=5, append_tokens=[3], logprobs_ranges=[pb.PositionRange(start=4, end=2)]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_RANGE",
    ),
    "too many top logprobs": (
        dict(offset=5, append_tokens=[3], logprob_top_k=21, logprobs_ranges=[_RANGE]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "TOO_MANY_LOGPROBS",
    ),
    "too many ranges": (
        dict(offset=5, append_tokens=[3], logprobs_ranges=[_RANGE] * 65),
        grpc.StatusCode.INVALID_ARGUMENT,
        "TOO_MANY_RANGES",
    ),
    "too many stop strings": (
        dict(offset=5, max_tokens=3, stop_strings=["x"] * 17),
        grpc.StatusCode.INVALID_ARGUMENT,
        "TOO_MANY_STOP_STRINGS",
    ),
    "a stop string too long": (
        dict(offset=5, max_tokens=3, stop_strings=["é" * 129]),  # 258 bytes
        grpc.StatusCode.INVALID_ARGUMENT,
        "STOP_STRING_TOO_LONG",
    ),
    "frequency penalty out of range": (
        dict(offset=5, max_tokens=3, frequency_penalty=2.5),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_SAMPLING",
    ),
    "NaN presence penalty": (
        dict(offset=5, max_tokens=3, presence_penalty=math.nan),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_SAMPLING",
    ),
    "logit bias out of range": (
        dict(offset=5, max_tokens=3, logit_bias={7: 101.0}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_SAMPLING",
    ),
    "logit bias on an unknown token": (
        dict(offset=5, max_tokens=3, logit_bias={100000: 1.0}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_TOKEN",
    ),
    "min_tokens above max_tokens": (
        dict(offset=5, max_tokens=3, min_tokens=4),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_SAMPLING",
    ),
    "an empty stop string": (
        dict(offset=5, max_tokens=3, stop_strings=["x", ""]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "EMPTY_STOP_STRING",
    ),
    "min_tokens on a prefill-only call": (
        dict(offset=5, append_tokens=[1], max_tokens=0, min_tokens=1),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_SAMPLING",
    ),
    "readout without a readout file": (
        dict(offset=5, append_tokens=[3], readout_ranges=[pb.PositionRange(start=5, end=6)]),
        grpc.StatusCode.FAILED_PRECONDITION,
        "READOUT_DISABLED",
    ),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_generate_is_refused_and_changes_nothing(name: str, llama_server, session: str) -> None:
    fields, code, reason = BAD_CALLS[name]
    stub = llama_server.stub
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Generate(pb.GenerateRequest(session_id=session, **fields)))
    assert caught.value.code() == code
    assert error_reason(caught.value) == reason
    assert _length(stub, session) == 5
    tokens, done = generate(stub, session, append_tokens=[6], offset=5, logprobs_ranges=[(5, 6)])
    assert done.total_tokens == 6 and [t.position for t in tokens] == [5]


def test_offset_mismatch_reports_the_session_length(llama_server, session: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        list(llama_server.stub.Generate(pb.GenerateRequest(session_id=session, offset=3)))
    metadata = dict(caught.value.trailing_metadata())
    assert metadata["salience-session-length"] == "5"
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    info = error_details_pb2.ErrorInfo()
    rpc_status.from_call(caught.value).details[0].Unpack(info)
    assert info.metadata["session_length"] == "5"


def test_unknown_session_is_not_found(llama_server) -> None:
    stub = llama_server.stub
    for call in (
        lambda: list(stub.Generate(pb.GenerateRequest(session_id="nope"))),
        lambda: stub.GetSession(pb.GetSessionRequest(session_id="nope")),
        lambda: stub.CloseSession(pb.CloseSessionRequest(session_id="nope")),
        lambda: stub.ForkSession(pb.ForkSessionRequest(session_id="nope")),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_reason(caught.value) == "SESSION_NOT_FOUND"


def test_decoding_an_empty_session_is_invalid(llama_server) -> None:
    session_id = open_session(llama_server.stub)
    with pytest.raises(grpc.RpcError) as caught:
        list(llama_server.stub.Generate(pb.GenerateRequest(session_id=session_id, max_tokens=4)))
    assert error_reason(caught.value) == "EMPTY_SESSION"


def test_busy_session_is_refused(llama_server, session: str) -> None:
    stub = llama_server.stub
    stream = stub.Generate(
        pb.GenerateRequest(session_id=session, offset=5, append_tokens=[9] * 400, max_tokens=50)
    )
    next(stream)  # the first call is running
    with engine_held_in_a_step(llama_server.engine) as in_step:  # and still is
        assert in_step.wait(10)
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Generate(pb.GenerateRequest(session_id=session, offset=5)))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(caught.value) == "SESSION_BUSY"
    stream.cancel()


def test_images_on_a_text_model_are_unsupported(llama_server, session: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        llama_server.stub.AppendImage(
            pb.AppendImageRequest(session_id=session, image=b"x", offset=5)
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(caught.value) == "IMAGES_UNSUPPORTED"


def test_bad_tokenize_and_detokenize_inputs(llama_server) -> None:
    stub = llama_server.stub
    with pytest.raises(grpc.RpcError) as caught:
        stub.Detokenize(pb.DetokenizeRequest(token_ids=[1, 999999]))
    assert error_reason(caught.value) == "INVALID_TOKEN"
    with pytest.raises(grpc.RpcError) as caught:
        stub.Tokenize(pb.TokenizeRequest(messages=pb.ChatMessages(messages_json="{not json")))
    assert error_reason(caught.value) == "BAD_JSON"


def test_a_lone_surrogate_in_json_text_is_bad_json(llama_server) -> None:
    """JSON may escape a lone UTF-16 surrogate, which is no Unicode text: refused as bad
    input (not UNKNOWN from the tokenizer), naming where it is."""
    stub = llama_server.stub
    cases = [
        (dict(messages_json='[{"role": "user", "content": "a\\ud800"}]'), "[0].content"),
        (
            dict(messages_json='[{"role": "user", "content": "ok"}]', tools_json='["\\udfff"]'),
            "[0]",
        ),
    ]
    for fields, where in cases:
        tools = fields.pop("tools_json", "")
        request = pb.TokenizeRequest(messages=pb.ChatMessages(**fields), tools_json=tools)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Tokenize(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_reason(caught.value) == "BAD_JSON"
        assert where in caught.value.details() and "surrogate" in caught.value.details()
    emoji = pb.ChatMessages(messages_json='[{"role": "user", "content": "\\ud83d\\ude00"}]')
    assert stub.Tokenize(pb.TokenizeRequest(messages=emoji)).token_ids  # a pair is fine


# A truncated field, and a session_id (field 1) that is not UTF-8.
UNPARSABLE = (b"\xff\xff\xff", b"\x0a\x02\xff\xfe")


@pytest.mark.parametrize("data", UNPARSABLE)
def test_unparsable_requests_are_invalid_argument(llama_server, data: bytes) -> None:
    """Bytes that do not parse as the request end INVALID_ARGUMENT (MALFORMED_REQUEST):
    grpc's asyncio server answered UNKNOWN, naming the parser's exception."""
    channel = llama_server.channel
    for method in ("OpenSession", "GetSession", "CloseSession", "AppendImage", "Tokenize"):
        call = channel.unary_unary(f"/salience.v1.Salience/{method}")
        with pytest.raises(grpc.RpcError) as caught:
            call(data, timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
        assert error_reason(caught.value) == "MALFORMED_REQUEST"
        assert f"/salience.v1.Salience/{method} does not parse" in caught.value.details()
    stream = channel.unary_stream("/salience.v1.Salience/Generate")
    with pytest.raises(grpc.RpcError) as caught:
        list(stream(data, timeout=30))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(caught.value) == "MALFORMED_REQUEST"


def test_an_unexpected_exception_ends_internal_not_unknown(llama_server, monkeypatch) -> None:
    """A handler's exception nothing expected (a bug) ends the call INTERNAL with a
    reason and the exception named, in a unary call and in a stream; grpc alone
    answered UNKNOWN "Unexpected <class ...>"."""
    from salience_server.rpc import convert

    engine = llama_server.engine

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(engine, "list_sessions", broken)
    with pytest.raises(grpc.RpcError) as unary:
        llama_server.stub.ListSessions(pb.ListSessionsRequest())
    monkeypatch.setattr(convert, "generate_params", broken)
    with pytest.raises(grpc.RpcError) as streamed:
        generate(llama_server.stub, open_session(llama_server.stub), append_tokens=[1])
    for caught, method in ((unary, "ListSessions"), (streamed, "Generate")):
        assert caught.value.code() == grpc.StatusCode.INTERNAL
        assert error_reason(caught.value) == "INTERNAL_ERROR"
        assert method in caught.value.details()
        assert "ZeroDivisionError: a bug" in caught.value.details()
