"""A replay runs as the call that needs it asks (SPEC 2.7): at its priority, within its
timeout. The server's one running place (``max_running=1``) is taken by a background
call held inside a step, so the replay of a lost session waits in the queue where the
test reads it; a control session that was never lost is the oracle of what the lost one
decodes afterwards."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from salience_client import (
    END,
    AsyncSalienceClient,
    AsyncSession,
    SalienceClient,
    SalienceClientError,
    Session,
    TokenEvent,
)
from salience_client.pb import salience_pb2 as pb
from tests.conftest import RunningServer
from tests.helpers import engine_held_in_a_step, open_session, random_tokens

PROMPT = random_tokens(9, 0)
TURN = random_tokens(4, 1)
WAIT_S = 10.0
TOLERANCE = 1e-4


@dataclass
class LostCall:
    """A thread that opens a session and a control, prefills both, loses the session (as
    its replica would: closed behind the client's back), then, once ``go`` is set, makes
    one call on it with ``options`` (``generate``, or ``prefill`` when ``is_prefill``);
    once ``released`` is set, one more turn on each."""

    server: RunningServer
    is_async: bool
    options: dict[str, Any]
    is_prefill: bool = False
    ready: threading.Event = field(default_factory=threading.Event)
    go: threading.Event = field(default_factory=threading.Event)
    called: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)
    session_id: str = ""
    error: SalienceClientError | None = None
    ended_at: float = 0.0
    """When the call ended (``time.monotonic()``)."""
    turns: tuple[list[tuple[int, float]], list[tuple[int, float]]] = ([], [])
    """The turn after (``_turn``), on the lost session and on its control."""

    def start(self) -> threading.Thread:
        run = self._run_async if self.is_async else self._run_sync
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        assert self.ready.wait(60)
        return thread

    def _lose(self, session_id: str) -> None:
        self.session_id = session_id
        self.server.stub.CloseSession(pb.CloseSessionRequest(session_id=session_id))
        self.ready.set()
        self.go.wait(60)

    def _ended(self, error: SalienceClientError | None) -> None:
        self.ended_at, self.error = time.monotonic(), error
        self.called.set()
        self.released.wait(60)

    def _run_sync(self) -> None:
        with SalienceClient(self.server.target, timeout=30) as client:
            lost, control = client.open_session(), client.open_session()
            for session in (lost, control):
                session.prefill(PROMPT)
            self._lose(lost.session_id)
            try:
                self._call(lost, **self.options)
                self._ended(None)
            except SalienceClientError as error:
                self._ended(error)
            if self.error is None:
                self._call(control)
            self.turns = (_turn(lost), _turn(control))

    def _call(self, session: Session, **options: Any) -> None:
        if self.is_prefill:
            session.prefill([5], **options)
        else:
            list(session.generate([5], max_tokens=2, **options))

    def _run_async(self) -> None:
        asyncio.run(self._scenario())

    async def _scenario(self) -> None:
        async with AsyncSalienceClient(self.server.target, timeout=30) as client:
            lost, control = await client.open_session(), await client.open_session()
            for session in (lost, control):
                await session.prefill(PROMPT)
            await asyncio.to_thread(self._lose, lost.session_id)
            try:
                await self._async_call(lost, **self.options)
                error = None
            except SalienceClientError as failure:
                error = failure
            await asyncio.to_thread(self._ended, error)
            if self.error is None:
                await self._async_call(control)
            self.turns = (await _async_turn(lost), await _async_turn(control))

    async def _async_call(self, session: AsyncSession, **options: Any) -> None:
        if self.is_prefill:
            await session.prefill([5], **options)
        else:
            [e async for e in session.generate([5], max_tokens=2, **options)]


def _turn(session: Session) -> list[tuple[int, float]]:
    """(token id, logprob) of every token of the turn after, appended or decoded."""
    events = session.generate(TURN, max_tokens=4, logprobs_ranges=[(session.length, END)])
    return [(e.token_id, e.logprob) for e in events if isinstance(e, TokenEvent)]


async def _async_turn(session: AsyncSession) -> list[tuple[int, float]]:
    events = session.generate(TURN, max_tokens=4, logprobs_ranges=[(session.length, END)])
    return [(e.token_id, e.logprob) async for e in events if isinstance(e, TokenEvent)]


def _assert_same(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> None:
    assert [token for token, _ in got] == [token for token, _ in want]
    assert len(got) == len(TURN) + 4
    for (_, a), (_, b) in zip(got, want, strict=True):
        assert a == pytest.approx(b, abs=TOLERANCE)


def _wait_until(predicate: Any) -> bool:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return False


def _busy_server(server_factory: Any, tiny_llama_dir: Any) -> tuple[RunningServer, str]:
    """A server with one running place, and a session for its background call."""
    server = server_factory(
        tiny_llama_dir, block_size=4, kv_cache_bytes=4 << 20, max_running=1, max_batch_tokens=1
    )
    return server, open_session(server.stub)


def _background_call(server: RunningServer, session_id: str) -> Any:
    """A long call at the default priority (30 prompt tokens fed one a step, 20 decoded)."""
    request = pb.GenerateRequest(
        session_id=session_id, append_tokens=[7] * 30, max_tokens=20, ignore_eos=True
    )
    return server.stub.Generate(request)


@pytest.mark.parametrize("is_prefill", [False, True], ids=["generate", "prefill"])
@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_a_replay_runs_at_the_priority_of_the_call_that_needs_it(
    tiny_llama_dir: Any, server_factory: Any, is_async: bool, is_prefill: bool
) -> None:
    """An urgent call on a lost session is not queued behind background work: its replay
    was queued at priority 0 and waited for the background call to end (and ``prefill``
    took no priority)."""
    server, background_id = _busy_server(server_factory, tiny_llama_dir)
    lost_call = LostCall(server, is_async, {"priority": -10}, is_prefill)
    thread = lost_call.start()
    scheduler = server.engine.scheduler
    with engine_held_in_a_step(server.engine) as in_step:
        background = _background_call(server, background_id)
        assert in_step.wait(WAIT_S)  # it runs; the replay will wait
        lost_call.go.set()

        def waiting() -> list[int]:
            return [
                r.priority for _, r in scheduler.waiting if r.session.session_id != background_id
            ]

        assert _wait_until(lambda: waiting())
        assert waiting() == [-10]
    list(background)
    background_ended_at = time.monotonic()
    assert lost_call.called.wait(WAIT_S)
    assert lost_call.error is None
    assert lost_call.ended_at < background_ended_at  # it overtook the background call
    lost_call.released.set()
    thread.join(WAIT_S)
    _assert_same(*lost_call.turns)


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_a_replay_ends_within_the_timeout_of_the_call_that_needs_it(
    tiny_llama_dir: Any, server_factory: Any, is_async: bool
) -> None:
    """The call fails DEADLINE_EXCEEDED when its replay cannot end within its timeout
    (it waited for its replay, unbounded, as long as the background call ran); the
    session is then re-created by its next call, which decodes what the control does."""
    server, background_id = _busy_server(server_factory, tiny_llama_dir)
    lost_call = LostCall(server, is_async, {"timeout": 0.5})
    thread = lost_call.start()
    with engine_held_in_a_step(server.engine) as in_step:
        background = _background_call(server, background_id)
        assert in_step.wait(WAIT_S)
        lost_call.go.set()
        is_called = lost_call.called.wait(WAIT_S)  # the step is held until this block ends
    assert is_called, "the call waited for its replay past its timeout"
    assert lost_call.error is not None
    assert lost_call.error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "within the call's timeout of 0.5 s" in lost_call.error.message
    list(background)
    lost_call.released.set()
    thread.join(WAIT_S)
    _assert_same(*lost_call.turns)


@pytest.mark.parametrize(
    ("is_async", "replaying_call"),
    [(False, "info"), (False, "generate"), (True, "info")],
    ids=["sync", "sync-stream", "async"],
)
def test_a_call_waiting_for_another_calls_replay_ends_within_its_timeout(
    tiny_llama_dir: Any, server_factory: Any, is_async: bool, replaying_call: str
) -> None:
    """A call that finds its session being re-created by another call of the session
    (``info()``, whose replay's prefill waits behind the background call) waits for that
    replay within its own timeout, then fails DEADLINE_EXCEEDED (it waited as long as
    the replay took, here until the background call let it run). The replay then goes
    through, and the next call goes on from it. So with a stream read in another thread
    that replays (``generate``): the later call supersedes it, and waits for its read
    within its timeout."""
    server, background_id = _busy_server(server_factory, tiny_llama_dir)
    scheduler = server.engine.scheduler

    def replay_waits(session_id: str) -> bool:
        return any(r.session.session_id == session_id for _, r in scheduler.waiting)

    def check(error: SalienceClientError, elapsed_s: float) -> None:
        assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED, error
        if replaying_call == "info":
            assert "is being re-created by another call" in error.message
        else:
            assert "another thread still reads the stream it supersedes" in error.message
        assert 0.5 <= elapsed_s < 3.5, elapsed_s

    def replay(session: Session, ended: list[Any]) -> None:
        try:
            if replaying_call == "info":
                ended.append(session.info())
            else:
                list(session.generate([7], max_tokens=1))
        except SalienceClientError as error:
            ended.append(error)

    def run_sync() -> None:
        with SalienceClient(server.target, timeout=30) as client:
            lost = client.open_session()
            lost.prefill(PROMPT)
            server.stub.CloseSession(pb.CloseSessionRequest(session_id=lost.session_id))
            infos: list[Any] = []
            with engine_held_in_a_step(server.engine) as in_step:
                background = _background_call(server, background_id)
                assert in_step.wait(WAIT_S)
                replayer = threading.Thread(target=replay, args=(lost, infos))
                replayer.start()
                assert _wait_until(lambda: replay_waits(lost.session_id))
                start = time.monotonic()
                with pytest.raises(SalienceClientError) as caught:
                    lost.prefill([5], timeout=0.5)
                check(caught.value, time.monotonic() - start)
            list(background)
            replayer.join(WAIT_S)
            if replaying_call == "info":
                assert [info.length for info in infos] == [len(PROMPT)]
            else:  # superseded once its replay went through; it sent nothing after
                assert [error.reason for error in infos] == ["SUPERSEDED"]
            done = lost.prefill([5])
            assert done.total_tokens == lost.length == lost.info().length == len(PROMPT) + 1
            assert lost.num_replays == 1

    async def run_async() -> None:
        async with AsyncSalienceClient(server.target, timeout=30) as client:
            lost = await client.open_session()
            await lost.prefill(PROMPT)
            server.stub.CloseSession(pb.CloseSessionRequest(session_id=lost.session_id))
            with engine_held_in_a_step(server.engine) as in_step:
                background = _background_call(server, background_id)
                assert await asyncio.to_thread(in_step.wait, WAIT_S)
                replayer = asyncio.create_task(lost.info())
                assert await asyncio.to_thread(_wait_until, lambda: replay_waits(lost.session_id))
                start = time.monotonic()
                with pytest.raises(SalienceClientError) as caught:
                    await lost.prefill([5], timeout=0.5)
                check(caught.value, time.monotonic() - start)
            await asyncio.to_thread(list, background)
            assert (await replayer).length == len(PROMPT)
            done = await lost.prefill([5])
            info = await lost.info()
            assert done.total_tokens == lost.length == info.length == len(PROMPT) + 1
            assert lost.num_replays == 1

    if is_async:
        asyncio.run(run_async())
    else:
        run_sync()
