"""The Python client against a real server in a subprocess (the CLI: test_cli.py).

Oracles: a plain transformers forward pass (score, decoded logprobs) and transformers
``generate(do_sample=False)`` (greedy decoding), on the tiny random Llama of conftest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from salience_client import (
    END,
    AsyncSalienceClient,
    Done,
    SalienceClient,
    SalienceClientError,
    TokenEvent,
)
from salience_client.pb import salience_pb2 as pb
from salience_client.pb import salience_pb2_grpc
from tests.client_support import (
    PROMPT,
    PROMPT_TEXT,
    TOKENIZER,
    UNREACHABLE,
    oracle_sum,
)
from tests.helpers import error_reason, reference_greedy, reference_logprobs
from tests.tiny_models import reference_model

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def oracle(tiny_llama_dir: Path) -> Any:
    return reference_model(tiny_llama_dir)


def _split(events: list[TokenEvent | Done]) -> tuple[list[TokenEvent], Done]:
    *tokens, done = events
    assert isinstance(done, Done) and all(isinstance(t, TokenEvent) for t in tokens)
    return tokens, done  # type: ignore[return-value]


# ----- the sync client -------------------------------------------------------------


def test_model_info_and_tokenizer_round_trip(client: SalienceClient, tiny_llama_dir: Path) -> None:
    info = client.model_info()
    assert info.model_id == tiny_llama_dir.name and info.max_context == 512
    assert info.vocab_size == len(TOKENIZER) and info.chat_template
    assert info.eos_token_ids == [TOKENIZER.eos_token_id]
    assert client.tokenize(PROMPT_TEXT) == PROMPT
    assert client.detokenize(PROMPT) == PROMPT_TEXT
    chat_ids = client.tokenize_chat([{"role": "user", "content": "hi"}])
    assert client.detokenize(chat_ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(SalienceClientError) as caught:  # a model that takes no images
        client.tokenize_chat([{"role": "user", "content": "hi"}], images=[(b"png", "image/png")])
    assert caught.value.reason == "IMAGES_UNSUPPORTED"


def test_prefill_generate_and_rewind_track_the_length(client: SalienceClient) -> None:
    with client.open_session() as session:
        assert session.length == 0 and session.max_context == 512
        done = session.prefill(PROMPT)
        assert done.finish_reason == "prefill" and done.total_tokens == len(PROMPT)
        assert session.length == len(PROMPT)
        tokens, done = _split(list(session.generate(max_tokens=6, temperature=0.8, seed=3)))
        assert [t.position for t in tokens] == list(range(len(PROMPT), done.total_tokens))
        assert not any(t.is_prefill for t in tokens) and done.completion_tokens == len(tokens)
        assert session.length == done.total_tokens == session.info().length
        done = session.rewind(4)
        assert session.length == done.total_tokens == 4
        assert client.get_session(session.session_id).length == 4
        session_id = session.session_id
    assert session_id not in [s.session_id for s in client.list_sessions()]


def test_greedy_generate_equals_transformers(client: SalienceClient, oracle: Any) -> None:
    want = reference_greedy(oracle, PROMPT, 12)
    with client.open_session() as session:
        tokens, done = _split(list(session.generate(PROMPT, max_tokens=12)))
    got = [t.token_id for t in tokens]
    assert got == want
    assert done.finish_reason == ("stop" if len(got) < 12 else "length")
    logprobs = reference_logprobs(oracle, PROMPT + got)
    for token in tokens:
        want_logprob = float(logprobs[token.position - 1, token.token_id])
        assert token.logprob == pytest.approx(want_logprob, abs=TOLERANCE)


def test_score_equals_a_plain_forward_pass(client: SalienceClient, oracle: Any) -> None:
    rng = random.Random(11)
    token_ids = [rng.randrange(256) for _ in range(40)]
    logprobs = reference_logprobs(oracle, token_ids)
    with client.open_session() as session:
        first = session.score(token_ids[:10], [(0, 10), (0, 1), (3, 7)])
        ranges = [(10, 20), (15, 30), (10, END), (38, 39)]
        rest = session.score(token_ids[10:], ranges)
        assert session.length == 40
    assert first[1] == 0.0  # position 0 has no context
    for got, (start, end) in zip(first + rest, [(0, 10), (0, 1), (3, 7), *ranges], strict=True):
        assert got == pytest.approx(oracle_sum(logprobs, token_ids, start, end), abs=TOLERANCE)


def test_fork_shares_the_prefix_and_diverges(client: SalienceClient, oracle: Any) -> None:
    continuation = [65, 66, 67, 68]
    with client.open_session() as parent:
        parent.prefill(PROMPT)
        with parent.fork() as child:
            assert child.session_id != parent.session_id and child.length == len(PROMPT)
            child_score = child.score(continuation, [(len(PROMPT), END)])
            assert child.length == len(PROMPT) + 4 and parent.info().length == len(PROMPT)
        parent_score = parent.score(continuation[::-1], [(len(PROMPT), END)])
    logprobs = reference_logprobs(oracle, PROMPT + continuation)
    assert child_score[0] == pytest.approx(
        oracle_sum(logprobs, PROMPT + continuation, len(PROMPT), END), abs=TOLERANCE
    )
    assert parent_score[0] != pytest.approx(child_score[0], abs=TOLERANCE)


def test_errors_carry_code_reason_and_session_length(client: SalienceClient) -> None:
    with client.open_session() as session:
        session.prefill(PROMPT)
        session.length = 3  # a stale view: the server holds 12 tokens
        with pytest.raises(SalienceClientError) as caught:
            session.prefill([1])
        error = caught.value
        assert error.code == grpc.StatusCode.ABORTED and error.reason == "OFFSET_MISMATCH"
        assert error.session_length == len(PROMPT)
        assert session.length == len(PROMPT)  # re-synced after the failure
        assert session.prefill([1]).total_tokens == len(PROMPT) + 1
        with pytest.raises(TypeError, match="max_token"):
            session.generate(max_token=3)  # type: ignore[call-arg]
        # Values their fields cannot carry fail as the call is made, naming the field
        # (the protobuf encoder raised at the first next(), without it).
        bad_calls: list[tuple[dict[str, Any], str]] = [
            (dict(max_tokens=-1), "max_tokens"),
            (dict(seed=-3), "seed"),
            (dict(stop_token_ids=[2**32]), "stop_token_ids"),
            (dict(logprobs_ranges=[(-1, 5)]), "logprobs_ranges"),
            (dict(priority=2**31), "priority"),
            (dict(top_k=1.5), "top_k"),
            (dict(max_tokens=True), "max_tokens"),
            (dict(temperature="0.5"), "temperature"),
            (dict(logprobs_ranges=[(1, 2, 3)]), "logprobs_ranges"),
            (dict(logprobs_ranges=(0, 5)), "logprobs_ranges"),
            (dict(stop_strings=[3]), "stop_strings"),
        ]
        for options, name in bad_calls:
            with pytest.raises(ValueError, match=name):
                session.generate(**options)
        with pytest.raises(ValueError, match="append_tokens"):
            session.generate([5, -1])
        with pytest.raises(ValueError, match="truncate_to"):
            session.generate(truncate_to=-2)
        assert session.prefill(np.array([1, 2])).total_tokens == len(PROMPT) + 3  # numpy ids
        # Any iterable is read once (a generator was used up by the checks and sent empty),
        # and a lone stop string is one (it was split into one per character).
        assert session.prefill(t for t in (3, 4)).total_tokens == len(PROMPT) + 5
        # numpy numbers and rows as options (a check once refused them).
        (scored,) = session.score(
            np.array([5, 6]), ranges=np.array([[len(PROMPT) + 5, len(PROMPT) + 7]])
        )
        assert scored < 0
        events = list(session.generate(max_tokens=2, temperature=np.float32(0.5), seed=3))
        assert isinstance(events[-1], Done) and events[-1].completion_tokens == 2
        start = session.length
        events = list(session.generate(max_tokens=40, ignore_eos=True, return_text=True))
        text = "".join(e.text for e in events if isinstance(e, TokenEvent))
        stop = text[5:8]  # three characters the reply holds, at index 5 or earlier
        events = list(
            session.generate(truncate_to=start, max_tokens=40, ignore_eos=True, stop_strings=stop)
        )
        assert isinstance(events[-1], Done) and events[-1].finish_reason == "stop_string"
        shown = "".join(e.text for e in events if isinstance(e, TokenEvent))
        assert shown == text[: text.index(stop)]
    with pytest.raises(SalienceClientError) as caught:
        client.get_session("no-such-session")
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    assert caught.value.reason == "SESSION_NOT_FOUND"
    with SalienceClient(UNREACHABLE) as unreachable, pytest.raises(SalienceClientError) as caught:
        unreachable.model_info()
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "asyncio"])
def test_opening_a_session_where_no_server_ever_answered_fails_at_once(is_async: bool) -> None:
    """The failover retries a replica that stopped answering, not an address where
    nothing ever did (it retried OpenSession for its whole 10 s budget)."""
    start = time.monotonic()
    with pytest.raises(SalienceClientError) as caught:
        if is_async:
            asyncio.run(_open_async(UNREACHABLE))
        else:
            with SalienceClient(UNREACHABLE) as client:
                client.open_session()
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - start < 2


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "asyncio"])
def test_a_session_of_a_closed_client_says_so(server_target: str, is_async: bool) -> None:
    """Its calls raised grpc's own ValueError (UsageError in asyncio), which code
    catching SalienceClientError missed; closing it (a ``with`` block's exit) raised too."""

    async def scenario() -> list[SalienceClientError]:
        errors = []
        async with AsyncSalienceClient(server_target, timeout=30) as client:
            session = await client.open_session()
        for call in (lambda: session.prefill([1, 2]), session.info, client.model_info):
            with pytest.raises(SalienceClientError) as caught:
                await call()
            errors.append(caught.value)
        await session.close()  # nothing to do: the server's TTL frees it
        return errors

    if is_async:
        errors = asyncio.run(scenario())
    else:
        with SalienceClient(server_target, timeout=30) as client:
            session = client.open_session()
        errors = []
        for call in (lambda: session.prefill([1, 2]), session.info, client.model_info):
            with pytest.raises(SalienceClientError) as caught:
                call()
            errors.append(caught.value)
        session.close()
    for error in errors:
        assert error.code == grpc.StatusCode.FAILED_PRECONDITION
        assert error.reason == "CLIENT_CLOSED"


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "asyncio"])
def test_closing_the_client_mid_stream_is_no_broken_stream(
    server_target: str, is_async: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """The stream of a client closed by its caller ends CLIENT_CLOSED. Its channel's
    cancellation looked like a stream broken in transit: the client logged "the stream
    broke ...; resuming" and counted a resume that never was."""

    async def scenario() -> tuple[SalienceClientError, int, int]:
        client = AsyncSalienceClient(server_target, timeout=30)
        session = await client.open_session()
        stream = session.generate([1, 2, 3], max_tokens=400, ignore_eos=True)
        await anext(stream)
        await client.close()
        with pytest.raises(SalienceClientError) as caught:
            async for _ in stream:
                pass
        return caught.value, session.num_resumes, client.failover_stats.num_resumes

    caplog.set_level(logging.WARNING, logger="salience_client")
    if is_async:
        error, num_resumes, total_resumes = asyncio.run(scenario())
    else:
        client = SalienceClient(server_target, timeout=30)
        session = client.open_session()
        stream = session.generate([1, 2, 3], max_tokens=400, ignore_eos=True)
        next(stream)
        client.close()
        with pytest.raises(SalienceClientError) as caught:
            for _ in stream:
                pass
        error, num_resumes = caught.value, session.num_resumes
        total_resumes = client.failover_stats.num_resumes
    assert (error.code, error.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "CLIENT_CLOSED")
    assert num_resumes == total_resumes == 0
    assert not [r for r in caplog.records if "resuming" in r.getMessage()]


async def _open_async(target: str) -> None:
    async with AsyncSalienceClient(target) as client:
        await client.open_session()


# ----- the async client --------------------------------------------------------------


async def _async_scenario(target: str, oracle: Any) -> None:
    async with AsyncSalienceClient(target, timeout=30) as client:
        assert (await client.model_info()).vocab_size == len(TOKENIZER)
        prompt = await client.tokenize(PROMPT_TEXT)
        assert prompt == PROMPT
        async with await client.open_session() as session:
            assert (await session.prefill(prompt)).total_tokens == len(PROMPT)
            events = [event async for event in session.generate(max_tokens=8)]
            tokens, done = _split(events)
            assert [t.token_id for t in tokens] == reference_greedy(oracle, PROMPT, 8)
            assert session.length == done.total_tokens == (await session.info()).length
            child = await session.fork()
            [total] = await child.score([70, 71, 72], [(child.length, END)])
            assert total < 0.0 and child.length == session.length + 3
            await child.close()
            session.length += 1
            with pytest.raises(SalienceClientError) as caught:
                await session.prefill([5])
            assert caught.value.reason == "OFFSET_MISMATCH"
            assert caught.value.session_length == session.length == done.total_tokens
            async with contextlib.aclosing(session.generate([1] * 200, max_tokens=200)) as stream:
                async for _ in stream:
                    break
            await session.sync()
            info = await session.info()
            assert not info.is_busy and session.length == info.length
            listed = [s.session_id for s in await client.list_sessions()]
            assert session.session_id in listed and child.session_id not in listed
        with pytest.raises(SalienceClientError) as caught:
            await client.get_session(session.session_id)
        assert caught.value.reason == "SESSION_NOT_FOUND"


def test_async_client(server_target: str, oracle: Any) -> None:
    asyncio.run(_async_scenario(server_target, oracle))


def test_a_session_id_no_server_takes_is_refused_at_once(
    client: SalienceClient, server_target: str
) -> None:
    """Ids travel as x-session-id metadata: a tab or a non-ASCII letter made every call
    fail inside gRPC, retried for seconds. The client refuses them before any call; the
    server refuses them from other clients (INVALID_ARGUMENT)."""
    for bad in ("tab\tid", "ünï", "x" * 129):
        start = time.monotonic()
        with pytest.raises(ValueError, match="visible ASCII"):
            client.open_session(session_id=bad)
        for handle in (client.session, client.get_session):  # INTERNAL "Invalid metadata"
            with pytest.raises(ValueError, match="visible ASCII"):
                handle(bad)
        assert time.monotonic() - start < 0.5
    channel = grpc.insecure_channel(server_target)
    stub = salience_pb2_grpc.SalienceStub(channel)
    for bad in ("ünï", "x" * 129, "x" * 100_000):
        with pytest.raises(grpc.RpcError) as caught:
            stub.OpenSession(pb.OpenSessionRequest(session_id=bad))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_reason(caught.value) == "INVALID_SESSION_ID"
    # The message quotes the id; a whole 100,000-character one overflowed the status's
    # metadata (RESOURCE_EXHAUSTED from gRPC instead of the server's answer).
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetSession(pb.GetSessionRequest(session_id="y" * 100_000))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "(100000 characters)" in str(caught.value.details())
    channel.close()
    with client.open_session(session_id="my-agent:42") as session:  # punctuation is fine
        assert session.prefill([1]).total_tokens == 1
