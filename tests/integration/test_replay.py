"""Replays of real sessions (SPEC 2.7) on the tiny models: a session lost on its server
(closed behind the client's back, as when its replica dies or its TTL passes) is
re-created from its tokens and images, and then decodes exactly what a control session
that was never lost decodes: greedy tokens equal, logprobs within TOLERANCE."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from salience_client import (
    END,
    AsyncSalienceClient,
    Done,
    SalienceClient,
    SalienceClientError,
    TokenEvent,
)
from salience_client import Session as SyncSession
from salience_client.pb import salience_pb2 as pb
from tests.conftest import RunningServer, start_server
from tests.helpers import random_tokens
from tests.tiny_models import build_tiny_vision_model

TOLERANCE = 1e-4


def _lose(server: RunningServer, session_id: str) -> None:
    server.stub.CloseSession(pb.CloseSessionRequest(session_id=session_id))


def _turn(session: SyncSession, tokens: list[int], max_tokens: int = 6) -> list[tuple[int, float]]:
    """(token id, logprob) of every token the call appends or decodes."""
    ranges = [(max(1, session.length), END)]
    events = session.generate(tokens, max_tokens=max_tokens, logprobs_ranges=ranges)
    return [(e.token_id, e.logprob) for e in events if hasattr(e, "token_id")]


def _scored(events: Iterable[TokenEvent | Done]) -> list[tuple[int, float]]:
    return [(e.token_id, e.logprob) for e in events if isinstance(e, TokenEvent)]


def _assert_same(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> None:
    assert [token for token, _ in got] == [token for token, _ in want]
    for (_, a), (_, b) in zip(got, want, strict=True):
        assert a == pytest.approx(b, abs=TOLERANCE)


def test_a_lost_session_and_its_fork_replay_to_what_was_never_lost(
    llama_server: RunningServer,
) -> None:
    turns = [random_tokens(9, seed) for seed in range(5)]
    with SalienceClient(llama_server.target, timeout=30) as client:
        lost, control = client.open_session(), client.open_session()
        for index, turn in enumerate(turns[:3]):
            if index == 2:
                _lose(llama_server, lost.session_id)
            _assert_same(_turn(lost, turn), _turn(control, turn))
        assert (lost.num_replays, control.num_replays) == (1, 0)
        assert lost.info().length == control.info().length == control.length
        lost_child, control_child = lost.fork(), control.fork()
        _assert_same(_turn(lost_child, turns[3]), _turn(control_child, turns[3]))
        _lose(llama_server, lost_child.session_id)
        _assert_same(_turn(lost_child, turns[4]), _turn(control_child, turns[4]))
        assert lost_child.num_replays == 1 and client.failover_stats.num_replays == 2
        # The parent was left alone: it continues as its control does.
        _assert_same(_turn(lost, turns[4]), _turn(control, turns[4]))
        for session in (lost, control, lost_child, control_child):
            session.close()


@pytest.mark.parametrize("left", [False, True], ids=["ended", "left"])
def test_a_replayed_calls_done_counts_the_replayed_positions_recomputed(
    llama_server: RunningServer, left: bool
) -> None:
    """They were counted cached: the server held them when the retried call came, but
    the replay had just put them in (a shim reported a whole rebuilt history cached).
    So too where the replay comes as the call settles a previous call its caller left
    (``left``: the shim leaves a stream whose client went away)."""
    with SalienceClient(llama_server.target, timeout=30) as client:
        dones = []
        for lose in (False, True):
            session = client.open_session()
            session.prefill(random_tokens(9, 0))
            events = session.generate(random_tokens(5, 1), max_tokens=2 if not left else 50)
            if left:  # two tokens decoded, then the caller leaves: the session holds 16
                assert all(hasattr(next(events), "token_id") for _ in range(2))
                events.close()
            else:
                list(events)
            if lose:
                _lose(llama_server, session.session_id)
            *_, done = session.generate(random_tokens(4, 2), max_tokens=2)
            dones.append(done)
            session.close()
        kept, replayed = dones
        assert kept.cached_tokens > 0 and kept.recomputed_tokens == 0
        assert replayed.cached_tokens == 0
        assert replayed.recomputed_tokens == 9 + 5 + 2  # the whole session before the call
        assert replayed.prompt_tokens == kept.prompt_tokens == 20


@pytest.mark.parametrize("replayed_by", ["info", "fork"])
def test_a_replay_made_by_info_or_fork_is_counted_by_the_next_call(
    llama_server: RunningServer, replayed_by: str
) -> None:
    """``info()`` and ``fork()`` replay a lost session too; the KV the next call then
    finds (on the session, or shared by its fork) was just recomputed, not cached."""
    with SalienceClient(llama_server.target, timeout=30) as client:
        session = client.open_session()
        session.prefill(random_tokens(9, 0))
        _lose(llama_server, session.session_id)
        if replayed_by == "info":
            assert session.info().length == 9
            caller = session
        else:
            caller = session.fork()
        assert session.num_replays == 1
        *_, done = caller.generate(random_tokens(4, 2), max_tokens=2)
        assert (done.cached_tokens, done.recomputed_tokens, done.prompt_tokens) == (0, 9, 13)
        *_, again = caller.generate(random_tokens(3, 3), max_tokens=1)
        # Counted once; the last decoded token has no KV yet.
        assert (again.cached_tokens, again.recomputed_tokens) == (9 + 4 + 1, 0)
        if caller is not session:
            *_, parent_done = session.generate(random_tokens(4, 2), max_tokens=2)
            assert (parent_done.cached_tokens, parent_done.recomputed_tokens) == (0, 9)
            caller.close()
        session.close()


def test_the_async_client_counts_a_replay_made_as_it_settles_a_left_call_recomputed(
    llama_server: RunningServer,
) -> None:
    async def scenario() -> Done:
        async with AsyncSalienceClient(llama_server.target, timeout=30) as client:
            session = await client.open_session()
            await session.prefill(random_tokens(9, 0))
            events = session.generate(random_tokens(5, 1), max_tokens=50)
            for _ in range(2):
                assert hasattr(await anext(events), "token_id")
            await events.aclose()  # left with 16 tokens
            _lose(llama_server, session.session_id)
            done = [e async for e in session.generate(random_tokens(4, 2), max_tokens=2)][-1]
            assert session.num_replays == 1
            await session.close()
            return done

    done = asyncio.run(scenario())
    assert (done.cached_tokens, done.recomputed_tokens, done.prompt_tokens) == (0, 16, 20)


def test_the_async_client_replays_a_lost_session(llama_server: RunningServer) -> None:
    async def scenario() -> None:
        async with AsyncSalienceClient(llama_server.target, timeout=30) as client:
            lost, control = await client.open_session(), await client.open_session()
            got: dict[str, list[int]] = {lost.session_id: [], control.session_id: []}
            for index, turn in enumerate([random_tokens(7, seed) for seed in range(3)]):
                if index == 2:
                    _lose(llama_server, lost.session_id)
                for session in (lost, control):
                    async for event in session.generate(turn, max_tokens=5):
                        if hasattr(event, "token_id"):
                            got[session.session_id].append(event.token_id)
            assert got[lost.session_id] == got[control.session_id]
            assert lost.num_replays == 1 and lost.length == control.length
            await lost.close()
            await control.close()

    asyncio.run(scenario())


def _cut_behind_the_clients_back(server: RunningServer, session_id: str, length: int) -> None:
    """The server's copy now holds only the first ``length`` positions: a stale copy on a
    replica the proxy came back to, or a replay a refused step left part-built."""
    request = pb.GenerateRequest(
        session_id=session_id, offset=length, truncating=True, max_tokens=0
    )
    list(server.stub.Generate(request))


@pytest.mark.parametrize("kept", [0, 10])
def test_a_server_copy_shorter_than_the_history_is_replayed_not_believed(
    llama_server: RunningServer, kept: int
) -> None:
    """OFFSET_MISMATCH naming fewer positions than the client saw committed: the client
    took the server's length and cut its history to it, and the next call went on
    without the lost turns (silently, under a framework that retries). It rebuilds the
    session from its history and retries, as for a lost one."""
    turns = [random_tokens(9, seed) for seed in range(3)]
    with SalienceClient(llama_server.target, timeout=30) as client:
        cut, control = client.open_session(), client.open_session()
        for turn in turns[:2]:
            _assert_same(_turn(cut, turn), _turn(control, turn))
        _cut_behind_the_clients_back(llama_server, cut.session_id, kept)
        _assert_same(_turn(cut, turns[2]), _turn(control, turns[2]))
        assert cut.num_replays == 1
        assert cut.length == cut.info().length == cut.history.length == control.length

    async def asynchronous() -> None:
        async with AsyncSalienceClient(llama_server.target, timeout=30) as client:
            session = await client.open_session()
            await session.prefill(turns[0] + turns[1])
            _cut_behind_the_clients_back(llama_server, session.session_id, kept)
            events = [e async for e in session.generate(turns[2], max_tokens=0)]
            assert session.num_replays == 1 and isinstance(events[-1], Done)
            assert session.length == (await session.info()).length == 27
            await session.close()

    asyncio.run(asynchronous())


def test_a_fork_of_a_server_copy_shorter_than_the_history_rebuilds_it_first(
    llama_server: RunningServer,
) -> None:
    """A replay cut off after it opened the session (its caller cancelled) leaves the
    server's copy part-built. A fork of it copied what was there and the child was taken
    to hold that, so its next call past it failed OFFSET_MISMATCH (the shim's pooled
    forks answered 409). The fork rebuilds the parent from its history first."""
    tokens = random_tokens(20, 0)
    with SalienceClient(llama_server.target, timeout=30) as client:
        parent = client.open_session()
        parent.prefill(tokens)
        _cut_behind_the_clients_back(llama_server, parent.session_id, 0)
        child = parent.fork()
        assert parent.num_replays == 1 and parent.info().length == 20
        assert child.length == child.info().length == 20
        assert isinstance(list(child.generate([5], truncate_to=12, max_tokens=0))[-1], Done)

    async def asynchronous() -> None:
        async with AsyncSalienceClient(llama_server.target, timeout=30) as client:
            parent = await client.open_session()
            await parent.prefill(tokens)
            _cut_behind_the_clients_back(llama_server, parent.session_id, 5)
            child = await parent.fork()
            assert parent.num_replays == 1 and (await parent.info()).length == 20
            assert child.length == (await child.info()).length == 20

    asyncio.run(asynchronous())


def test_a_handle_without_the_history_takes_the_shorter_servers_length(
    llama_server: RunningServer,
) -> None:
    """Where the client cannot rebuild the session (a handle on a session opened
    elsewhere), OFFSET_MISMATCH reaches the caller and the server's length is taken."""
    with SalienceClient(llama_server.target, timeout=30) as client:
        owner = client.open_session()
        owner.prefill(random_tokens(9, 0))
        handle = client.session(owner.session_id)
        _cut_behind_the_clients_back(llama_server, owner.session_id, 4)
        with pytest.raises(SalienceClientError) as caught:
            handle.prefill([5])
        assert caught.value.reason == "OFFSET_MISMATCH" and handle.length == 4
        owner.close()


def test_a_session_sync_made_hold_unseen_tokens_says_why_it_cannot_be_replayed(
    llama_server: RunningServer,
) -> None:
    """``sync()`` keeps what a left call committed past what its caller received: tokens
    the client never saw (no RPC returns them), so its history stops there and the
    session cannot be re-created past it. A call that finds it lost says why (it blamed
    a handle on a session opened elsewhere, or a call that ended before its Done). One
    that rewinds to within the history still re-creates it, and decodes what a control
    holding those tokens does."""
    with SalienceClient(llama_server.target, timeout=30) as client:
        session = client.open_session()
        session.prefill(random_tokens(9, 0))
        stream = session.generate(random_tokens(3, 1), max_tokens=100, ignore_eos=True)
        next(stream), next(stream)
        time.sleep(0.3)  # the server decodes on meanwhile
        stream.close()
        session.sync()
        known = session.history.token_ids.tolist()
        assert len(known) == 9 + 3 + 2 < session.length
        _turn(session, random_tokens(4, 2))
        assert session.history.length == len(known)  # still all this client knows
        _lose(llama_server, session.session_id)
        with pytest.raises(SalienceClientError) as caught:
            _turn(session, random_tokens(4, 3))
        assert caught.value.reason == "SESSION_LOST"
        assert "sync() kept" in caught.value.message
        assert f"at most {len(known)} positions" in caught.value.message
        with client.open_session() as control:
            control.prefill(known)
            turn, ranges = random_tokens(4, 3), [(len(known), END)]
            options: dict[str, Any] = {"max_tokens": 6, "logprobs_ranges": ranges}
            got = session.generate(turn, truncate_to=len(known), **options)
            want = control.generate(turn, **options)
            _assert_same(*[_scored(events) for events in (got, want)])
        assert session.num_replays == 1
        assert session.history.length == session.length == control.length
        session.close()


def test_the_server_names_itself_as_told_even_when_refusing(tiny_llama_dir: Path) -> None:
    server = start_server(str(tiny_llama_dir), api_key="key", replica_id="replica-7")
    try:
        with pytest.raises(grpc.RpcError) as caught:
            server.stub.GetModelInfo(pb.GetModelInfoRequest())
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert ("salience-replica", "replica-7") in caught.value.initial_metadata()
        with SalienceClient(server.target, api_key="key", timeout=30) as client:
            with client.open_session() as session:
                session.prefill([1, 2, 3])
                assert session.replica == "replica-7"
    finally:
        server.stop()


# ----- images --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vision_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    model_dir = build_tiny_vision_model(tmp_path_factory.mktemp("replay-vl"), "qwen2_vl")
    server = start_server(str(model_dir), block_size=4, kv_cache_bytes=4 << 20)
    yield server
    server.stop()


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_lost_session_replays_its_images(vision_server: RunningServer) -> None:
    with SalienceClient(vision_server.target, timeout=30) as client:
        info = client.model_info()
        start, end = info.vision_start_token_id, info.vision_end_token_id
        assert start is not None and end is not None
        lost, control = client.open_session(), client.open_session()
        for session in (lost, control):
            session.prefill([5, 6, start])
            session.append_image(_png(1), "image/png")
            session.prefill([end, 7])
        _assert_same(_turn(lost, [8, 9]), _turn(control, [8, 9]))
        _lose(vision_server, lost.session_id)
        _assert_same(_turn(lost, [10]), _turn(control, [10]))
        assert lost.num_replays == 1 and len(lost.history.images) == 1
        # Truncating into the image is refused there as it was here: nothing was lost.
        image_at = lost.history.images[0].position
        with pytest.raises(SalienceClientError) as caught:
            lost.rewind(image_at + 1)
        assert caught.value.reason == "TRUNCATES_IMAGE"
        _assert_same(_turn(lost, [11]), _turn(control, [11]))


def test_a_replay_puts_the_images_back_at_the_calls_priority(
    vision_server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every call of a replay runs at the priority of the call that needs the session,
    its AppendImage calls included (they ran at 0: ahead of the call's own background
    work, behind an urgent call's)."""
    engine = vision_server.engine
    submitted: list[tuple[bool, int]] = []  # (an image, priority)
    submit = engine.submit

    def recording_submit(params: Any, sink: Any, image: Any = None) -> Any:
        submitted.append((image is not None, params.priority))
        return submit(params, sink, image)

    with SalienceClient(vision_server.target, timeout=30) as client:
        info = client.model_info()
        assert info.vision_start_token_id is not None and info.vision_end_token_id is not None
        session = client.open_session()
        session.prefill([5, 6, info.vision_start_token_id])
        session.append_image(_png(2), "image/png")
        session.prefill([info.vision_end_token_id, 7])
        _lose(vision_server, session.session_id)
        monkeypatch.setattr(engine, "submit", recording_submit)
        list(session.generate([8], max_tokens=2, priority=9))
        assert session.num_replays == 1
    assert (True, 9) in submitted
    assert {priority for _, priority in submitted} == {9}
