"""``AsyncSessionCalls``: ``SessionCalls`` over ``grpc.aio``, for ``AsyncSession``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc

from salience_client import replay
from salience_client.closing import closed_client_calls
from salience_client.failover import (
    Attempts,
    is_busy,
    is_stale,
    replay_outwaited,
    time_left_s,
)
from salience_client.history import ImageStep
from salience_client.pb import salience_pb2 as pb
from salience_client.pb import salience_pb2_grpc
from salience_client.session_base import SessionBase
from salience_client.types import SalienceClientError
from salience_client.unary import await_unary


class AsyncSessionCalls(SessionBase):
    """The calls of an ``AsyncSession``; it adds the public methods."""

    _stub: salience_pb2_grpc.SalienceStub

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._no_live_streams = asyncio.Event()
        """Set while no ``generate()`` call of the session is under way
        (``_num_live_streams`` is 0)."""
        self._no_live_streams.set()

    async def _unary(
        self, method: Any, request: Any, timeout: float | None = None, *, checks_copy: bool = False
    ) -> Any:
        """As ``SessionCalls._unary``."""
        timeout = self._timeout if timeout is None else timeout
        call = method(request, timeout=timeout, metadata=self._metadata)
        try:
            with closed_client_calls(self._stub):
                response = await call
        except grpc.RpcError as error:
            raise self._failure(error) from None
        metadata = await call.initial_metadata()
        self._note_replica(metadata)
        stale = self._stale_answer(metadata) if checks_copy else None
        if stale is not None:
            raise stale
        return response

    async def _call(self, method: Any, request: Any, replay_length: int | None) -> Any:
        """A unary session RPC that recovers: replays (to ``replay_length``) a lost
        session, retries while no replica answers."""
        attempts = self._attempts()
        while True:
            try:
                return await self._unary(method, request, checks_copy=True)
            except SalienceClientError as error:
                failure = error
            await self._recover(failure, attempts, replay_length)

    async def _recover(
        self, error: SalienceClientError, attempts: Attempts, replay_length: int | None
    ) -> None:
        """As ``SessionCalls._recover``."""
        try:
            await self._recover_in_time(error, attempts, replay_length)
        finally:
            attempts.replay_done()

    async def _recover_in_time(
        self, error: SalienceClientError, attempts: Attempts, replay_length: int | None
    ) -> None:
        if self._replay_under_way(error, attempts):
            async with self._replay_turn(attempts, error):  # until it is done
                if self._replayed_meanwhile(attempts, replay_length) or is_busy(error):
                    return
        recovery = self._recovery(error, attempts, replay_length)
        if recovery.replay_length is None:
            await asyncio.sleep(recovery.wait_s)
            return
        async with self._replay_turn(attempts, error):
            if self._replayed_meanwhile(attempts, recovery.replay_length):
                return
            while True:
                try:  # logged as caused by ``error``, not by a failed try before it
                    await self._replay(recovery.replay_length, error, attempts)
                    attempts.replays_seen = self.num_replays
                    attempts.replay_done()
                    return
                except SalienceClientError as failed:
                    failure = failed
                self._replay_failed(attempts, failure)
                await asyncio.sleep(self._failover.first_retry_wait_s)

    def _new_replay_lock(self) -> Any:
        return asyncio.Lock()

    @contextlib.asynccontextmanager
    async def _replay_turn(
        self, attempts: Attempts, error: SalienceClientError
    ) -> AsyncIterator[None]:
        """As ``SessionCalls._replay_turn``."""
        try:
            async with asyncio.timeout(time_left_s(attempts.replay_deadline())):
                await self._replay_lock.acquire()
        except TimeoutError:
            raise replay_outwaited(self.session_id, error, attempts.timeout_s) from None
        try:
            yield
        finally:
            self._replay_lock.release()

    async def _replay(self, length: int, cause: SalienceClientError, attempts: Attempts) -> None:
        """As ``SessionCalls._replay``."""
        deadline = attempts.replay_deadline()
        if is_stale(cause):  # the old copy goes, with what the call did to it
            close = pb.CloseSessionRequest(session_id=self.session_id)
            with contextlib.suppress(SalienceClientError):
                await self._unary(self._stub.CloseSession, close, time_left_s(deadline))
        request = pb.OpenSessionRequest(session_id=self.session_id, max_context=self.max_context)
        try:
            await self._unary(self._stub.OpenSession, request, time_left_s(deadline))
            is_fresh = True
        except SalienceClientError as error:
            if error.code != grpc.StatusCode.ALREADY_EXISTS:
                raise
            is_fresh = False  # a stale copy: every step rewrites it from position 0
        for step in replay.steps(self._history, length, is_fresh):
            timeout = time_left_s(deadline)
            if isinstance(step, ImageStep):
                image = replay.image_request(self.session_id, step, attempts.priority)
                response = await self._unary(self._stub.AppendImage, image, timeout)
                replay.check_replayed_image(
                    self.session_id, self.replica, step, response.placeholder_count
                )
                continue
            prefill = replay.prefill_request(self.session_id, step, attempts.priority)
            call = self._stub.Generate(prefill, timeout=timeout, metadata=self._metadata)
            try:
                with closed_client_calls(self._stub):
                    async for _ in call:
                        pass
            except grpc.RpcError as error:
                raise self._failure(error) from None
            self._note_replica(await call.initial_metadata())
        self._replayed(cause, length)

    async def _model_info(self) -> pb.GetModelInfoResponse:
        with closed_client_calls(self._stub):
            request = pb.GetModelInfoRequest()
            return await await_unary(self._stub.GetModelInfo, request, self._timeout)

    async def _eos_ids(self) -> list[int]:
        if self._eos_token_ids is None:
            self._eos_token_ids = list((await self._model_info()).eos_token_ids)
        return self._eos_token_ids
