"""Hostile or careless traffic against the gRPC server: a burst of calls, a huge
Detokenize, clients that leave while their call is being answered. Each gets its
answer (or goes quietly), and the other clients are served meanwhile."""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import types
from typing import Any

import grpc
import pytest
from grpc._cython.cygrpc import ExecuteBatchError

from salience_client.pb import salience_pb2 as pb
from salience_client.pb import salience_pb2_grpc
from salience_server.engine import tokenization
from salience_server.engine.errors import Code, SalienceError
from salience_server.rpc.errors import abort
from salience_server.rpc.replica import ReplicaInterceptor
from salience_server.rpc.unexpected import UnexpectedErrorInterceptor
from tests.helpers import engine_held_in_a_step, error_reason, generate, open_session


def test_a_burst_of_calls_on_one_connection_is_answered_not_cancelled(llama_server) -> None:
    """4,000 calls sent at once: gRPC's default backlog (1,000 calls, all refused past
    3,000) cancelled a third of them, CANCELLED with no reason, before the event loop
    could take them up."""

    async def burst() -> collections.Counter[str]:
        outcomes: collections.Counter[str] = collections.Counter()
        async with grpc.aio.insecure_channel(llama_server.target) as channel:
            stub = salience_pb2_grpc.SalienceStub(channel)

            async def one() -> None:
                try:
                    await stub.Tokenize(pb.TokenizeRequest(text="a b c"), timeout=120)
                    outcomes["OK"] += 1
                except grpc.aio.AioRpcError as error:
                    outcomes[error.code().name] += 1

            await asyncio.gather(*(one() for _ in range(4000)))
        return outcomes

    assert asyncio.run(burst()) == {"OK": 4000}


def test_a_huge_detokenize_does_not_stall_the_other_calls(
    llama_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Detokenize decodes off the event loop: 16 million ids (within the 64 MiB message
    limit) held every other call, streams included, for 8 s."""
    entered, gate = threading.Event(), threading.Event()
    decode = tokenization.decode

    def slow_decode(*args: Any, **kwargs: Any) -> str:
        entered.set()
        gate.wait(20)
        return decode(*args, **kwargs)

    monkeypatch.setattr(tokenization, "decode", slow_decode)
    answer: dict[str, str] = {}
    caller = threading.Thread(
        target=lambda: answer.update(
            text=llama_server.stub.Detokenize(pb.DetokenizeRequest(token_ids=[5, 6])).text
        )
    )
    caller.start()
    try:
        assert entered.wait(10)
        info = llama_server.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
        assert info.vocab_size > 0
    finally:
        gate.set()
        caller.join(30)
    assert answer["text"] == decode(llama_server.engine.loaded.tokenizer, [5, 6], 10**6, False)


def _serve_and_leave(interceptors: list[grpc.aio.ServerInterceptor]) -> None:
    """A server with ``interceptors`` whose one streaming method sends one message, then
    waits; a client that reads it and cancels. The handler, cancelled, answers with an
    error, as a Generate does when the engine's SESSION_CLOSED comes just as its client
    leaves."""

    async def handler(request: bytes, context: grpc.aio.ServicerContext) -> Any:
        yield b"first"
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            closed = SalienceError(Code.CANCELLED, "SESSION_CLOSED", "the session was closed")
            await abort(context, closed)
            raise

    async def main() -> None:
        server = grpc.aio.server(interceptors=interceptors)
        method = grpc.unary_stream_rpc_method_handler(handler)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("t.T", {"S": method}),)
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.unary_stream("/t.T/S")(b"")
                async for _ in call:
                    break
                call.cancel()
                await asyncio.sleep(1.0)  # the server notices, and ends the call
        finally:
            await server.stop(None)

    asyncio.run(main())


def test_a_client_that_leaves_while_its_call_is_answered_logs_no_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An error status for a call whose client has just gone cannot be sent: the call
    ends cancelled, quietly. It was logged as the handler's unexpected failure, with
    three tracebacks, then aborted again ("Abort already called!", logged by gRPC)."""
    interceptors: list[grpc.aio.ServerInterceptor] = [
        ReplicaInterceptor("r"),
        UnexpectedErrorInterceptor(),
    ]
    with caplog.at_level(logging.DEBUG):
        _serve_and_leave(interceptors)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]


def test_a_write_to_a_client_that_has_just_gone_ends_the_call_cancelled() -> None:
    """A stream's write fails in gRPC's core when its client has just gone, before the
    core has told the server so. Yielded to gRPC, the response was written by gRPC's own
    loop, which logged that failure at ERROR ("ExecuteBatchError raised in core by
    servicer method"; it failed one CI run) and left the handler suspended at its
    ``yield``. The interceptor writes each response itself: the call ends cancelled, and
    the handler is closed at once (its clean-up cancels the engine's request)."""
    events: list[str] = []

    async def handler(request: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            yield b"first"
            yield b"second"
        finally:
            events.append("closed")

    class ClientGone:
        async def write(self, message: bytes) -> None:
            events.append(f"write {message!r}")
            raise ExecuteBatchError('Failed "execute_batch"')

    method = grpc.unary_stream_rpc_method_handler(handler)
    details = types.SimpleNamespace(method="/t.T/S")
    guarded = UnexpectedErrorInterceptor().handler(method, details).unary_stream

    async def main() -> None:
        with pytest.raises(asyncio.CancelledError):
            await guarded(b"", ClientGone())

    asyncio.run(main())
    assert events == ["write b'first'", "closed"]


def test_a_stop_list_of_repeated_ids_is_held_once_per_id(llama_server) -> None:
    """A Generate whose 4 million stop_token_ids repeat four ids (8 MiB on the wire) kept
    the whole list for as long as it ran: 32 MB of Python list, four times its message,
    per call. Each id is kept once now (at most the vocabulary), and the call decodes
    as the same call with each id once."""
    stub, engine = llama_server.stub, llama_server.engine
    prompt = [5, 6, 7]
    solo, _ = generate(stub, open_session(stub), append_tokens=prompt, max_tokens=6)
    stops = [solo[3].id, *(i for i in (250, 251, 252) if i != solo[3].id)]
    once_tokens, once = generate(
        stub, open_session(stub), append_tokens=prompt, max_tokens=6, stop_token_ids=stops
    )
    request = pb.GenerateRequest(
        session_id=open_session(stub),
        append_tokens=prompt,
        max_tokens=6,
        stop_token_ids=stops * 10**6,
    )
    with engine_held_in_a_step(engine) as in_step:
        stream = stub.Generate(request, timeout=30)
        assert in_step.wait(10)
        with engine._lock:
            (running,) = engine.scheduler.running
            assert running.params.stop_token_ids == stops
    *tokens, done = list(stream)
    assert [t.token.id for t in tokens] == [t.id for t in once_tokens]
    assert done.done.finish_reason == once.finish_reason == pb.FINISH_REASON_STOP


def test_a_text_past_the_tokenize_limit_is_refused_before_it_is_tokenized(
    llama_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 60 MB text held the server at 10 GB for four minutes (the tokenizer keeps about
    160 bytes a character), and an answer over the message limit was refused at the end.
    A text, or a chat as rendered, past MAX_TOKENIZED_CHARS is TEXT_TOO_LONG at once; a
    text at the limit is tokenized (a lower limit here: the oracle is the tokenizer)."""
    monkeypatch.setattr(tokenization, "MAX_TOKENIZED_CHARS", 64)
    stub, tokenizer = llama_server.stub, llama_server.engine.loaded.tokenizer
    text = "the cat sat on the mat. " * 2 + "abcdefghijklmnop"
    assert len(text) == 64
    got = stub.Tokenize(pb.TokenizeRequest(text=text)).token_ids
    assert list(got) == tokenizer.encode(text, add_special_tokens=False)
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=text)])
    for request in (
        pb.TokenizeRequest(text=text + "q"),
        pb.TokenizeRequest(messages=chat, add_generation_prompt=True),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            stub.Tokenize(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_reason(caught.value) == "TEXT_TOO_LONG"
        assert "at most 64 are tokenized" in caught.value.details()


def test_too_many_ids_to_detokenize_are_refused_before_they_are_decoded(
    llama_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 64 MiB Detokenize holds 67 million one-byte ids (gigabytes once decoded, and a
    text past the message limit, refused after the work): past MAX_DETOKENIZED_IDS it is
    TOO_MANY_TOKENS at once; at the limit it is decoded (a lower limit here)."""
    monkeypatch.setattr(tokenization, "MAX_DETOKENIZED_IDS", 8)
    stub, tokenizer = llama_server.stub, llama_server.engine.loaded.tokenizer
    ids = [5, 6, 7, 8, 9, 10, 11, 12]
    assert stub.Detokenize(pb.DetokenizeRequest(token_ids=ids)).text == tokenizer.decode(ids)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Detokenize(pb.DetokenizeRequest(token_ids=[*ids, 13], return_token_bytes=True))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(caught.value) == "TOO_MANY_TOKENS"
    assert "at most 8 are decoded" in caught.value.details()
