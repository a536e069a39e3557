"""``SessionCalls``: how a ``Session`` calls the server: one unary call, a call that
recovers (SPEC 2.7: a lost session re-created, a call no replica answered retried), and
the replay that re-creates a lost session from its history."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc

from salience_client import replay
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
from salience_client.unary import call_unary


class SessionCalls(SessionBase):
    """The calls of a ``Session``; it adds the public methods."""

    _stub: salience_pb2_grpc.SalienceStub

    def _unary(
        self, method: Any, request: Any, timeout: float | None = None, *, checks_copy: bool = False
    ) -> Any:
        """One call of a unary session RPC with the session's metadata, bounded by
        ``timeout`` (the client's when None). ``checks_copy``: the call reads or changes
        the session, and an answer from an old copy of it raises ``STALE_COPY`` (its
        effect on that copy is undone by the replay that follows)."""
        timeout = self._timeout if timeout is None else timeout
        try:
            response, call = method.with_call(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise self._failure(error) from None
        self._note_replica(call.initial_metadata())
        stale = self._stale_answer(call.initial_metadata()) if checks_copy else None
        if stale is not None:
            raise stale
        return response

    def _call(self, method: Any, request: Any, replay_length: int | None) -> Any:
        """A unary session RPC that recovers: replays (to ``replay_length``) a lost
        session, retries while no replica answers."""
        attempts = self._attempts()
        while True:
            try:
                return self._unary(method, request, checks_copy=True)
            except SalienceClientError as error:
                failure = error
            self._recover(failure, attempts, replay_length)

    def _read_info(self) -> pb.SessionInfo:
        request = pb.GetSessionRequest(session_id=self.session_id)
        return self._unary(self._stub.GetSession, request).session

    def _recover(
        self, error: SalienceClientError, attempts: Attempts, replay_length: int | None
    ) -> None:
        """Does what ``_recovery`` decides: waits, or re-creates the session (trying again
        until the replays are spent); raises when nothing can be done. The call's timeout
        bounds this recovery's waits and replays; a later one has it anew."""
        try:
            self._recover_in_time(error, attempts, replay_length)
        finally:
            attempts.replay_done()

    def _recover_in_time(
        self, error: SalienceClientError, attempts: Attempts, replay_length: int | None
    ) -> None:
        if self._replay_under_way(error, attempts):
            with self._replay_turn(attempts, error):  # until it is done
                if self._replayed_meanwhile(attempts, replay_length) or is_busy(error):
                    return
        recovery = self._recovery(error, attempts, replay_length)
        if recovery.replay_length is None:
            time.sleep(recovery.wait_s)
            return
        with self._replay_turn(attempts, error):
            if self._replayed_meanwhile(attempts, recovery.replay_length):
                return
            while True:
                try:  # logged as caused by ``error``, not by a failed try before it
                    self._replay(recovery.replay_length, error, attempts)
                    attempts.replays_seen = self.num_replays
                    attempts.replay_done()
                    return
                except SalienceClientError as failed:
                    failure = failed
                self._replay_failed(attempts, failure)
                time.sleep(self._failover.first_retry_wait_s)

    def _new_replay_lock(self) -> Any:
        return threading.Lock()

    @contextlib.contextmanager
    def _replay_turn(self, attempts: Attempts, error: SalienceClientError) -> Iterator[None]:
        """Holds the replay lock, waiting for another call's replay within this call's
        timeout (DEADLINE_EXCEEDED after: it waited however long that one took)."""
        wait_s = time_left_s(attempts.replay_deadline())
        if not self._replay_lock.acquire(timeout=-1 if wait_s is None else wait_s):
            raise replay_outwaited(self.session_id, error, attempts.timeout_s)
        try:
            yield
        finally:
            self._replay_lock.release()

    def _replay(self, length: int, cause: SalienceClientError, attempts: Attempts) -> None:
        """Re-creates the session under its id on whichever replica now serves it, holding
        the first ``length`` positions of its history, at the priority and within the
        timeout of the call that needs it (``attempts``)."""
        deadline = attempts.replay_deadline()
        if is_stale(cause):  # the old copy goes, with what the call did to it
            close = pb.CloseSessionRequest(session_id=self.session_id)
            with contextlib.suppress(SalienceClientError):
                self._unary(self._stub.CloseSession, close, time_left_s(deadline))
        request = pb.OpenSessionRequest(session_id=self.session_id, max_context=self.max_context)
        try:
            self._unary(self._stub.OpenSession, request, time_left_s(deadline))
            is_fresh = True
        except SalienceClientError as error:
            if error.code != grpc.StatusCode.ALREADY_EXISTS:
                raise
            is_fresh = False  # a stale copy: every step rewrites it from position 0
        for step in replay.steps(self._history, length, is_fresh):
            timeout = time_left_s(deadline)
            if isinstance(step, ImageStep):
                image = replay.image_request(self.session_id, step, attempts.priority)
                response = self._unary(self._stub.AppendImage, image, timeout)
                replay.check_replayed_image(
                    self.session_id, self.replica, step, response.placeholder_count
                )
                continue
            prefill = replay.prefill_request(self.session_id, step, attempts.priority)
            call = self._stub.Generate(prefill, timeout=timeout, metadata=self._metadata)
            try:
                for _ in call:
                    pass
            except grpc.RpcError as error:
                raise self._failure(error) from None
            self._note_replica(call.initial_metadata())
        self._replayed(cause, length)

    def _model_info(self) -> pb.GetModelInfoResponse:
        return call_unary(self._stub.GetModelInfo, pb.GetModelInfoRequest(), self._timeout)

    def _eos_ids(self) -> list[int]:
        if self._eos_token_ids is None:
            self._eos_token_ids = list(self._model_info().eos_token_ids)
        return self._eos_token_ids
