"""``Session``: one server session, tracking its committed length and sending ``offset``.

The request building and range arithmetic here are shared with ``AsyncSession``; so is
``SessionBase`` (its state and the failover decisions).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from typing import Any, TypedDict, TypeVar, Unpack

import grpc

from salience_client.failover import Attempts, StreamProgress
from salience_client.failover import new_session_id as fresh_session_id
from salience_client.history import ImageStep
from salience_client.pb import salience_pb2 as pb
from salience_client.pb import salience_pb2_grpc
from salience_client.session_base import SessionBase
from salience_client.types import Done, SalienceClientError, SessionInfo, TokenEvent

END = 2**32 - 1
"""A range end meaning "through the end of this call"."""

DEFAULT_MAX_TOKENS = 256
SYNC_WAIT_S = 5.0
"""How long a re-sync waits for a cancelled call to wind down on the server."""

_Response = TypeVar("_Response")


class GenerateOptions(TypedDict, total=False):
    """Keyword options of ``generate``; omitted ones take the server's defaults."""

    max_tokens: int
    """0: prefill only. Otherwise decode up to this many tokens (default 256)."""
    temperature: float
    """0 is greedy (the default)."""
    top_p: float
    top_k: int
    min_p: float
    repetition_penalty: float
    seed: int | None
    stop_token_ids: Sequence[int]
    stop_strings: Sequence[str]
    return_text: bool
    """Fill ``TokenEvent.text`` for decoded tokens (default True)."""
    logprobs_ranges: Sequence[tuple[int, int]]
    """Half-open absolute position ranges whose prefill tokens are scored."""
    logprob_top_k: int
    readout_ranges: Sequence[tuple[int, int]]
    priority: int
    """Lower runs first."""
    ignore_eos: bool
    """Decode past the model's EOS tokens (stop_token_ids still stop)."""
    frequency_penalty: float
    """OpenAI's, in [-2, 2]: times each token's count among the tokens decoded in this call."""
    presence_penalty: float
    """OpenAI's, in [-2, 2]: once for each token decoded in this call."""
    logit_bias: Mapping[int, float]
    """Token id -> value in [-100, 100] added to its logit."""
    min_tokens: int
    """EOS and stop_token_ids cannot end the call before this many decoded tokens."""
    constraint: Mapping[str, str | bool]
    """One of ``{"json_schema": SCHEMA_JSON}``, ``{"json_object": True}``,
    ``{"regex": ...}`` or ``{"ebnf": ...}``: the language the decoded text must be in."""


def check_options(options: dict[str, Any]) -> None:
    """Raises TypeError for a keyword ``generate`` does not know."""
    unknown = sorted(set(options) - set(GenerateOptions.__optional_keys__))
    if unknown:
        raise TypeError(f"generate() got unexpected keyword arguments: {', '.join(unknown)}")


def generate_request(
    session_id: str,
    append_tokens: Sequence[int],
    offset: int,
    truncating: bool,
    options: GenerateOptions,
) -> pb.GenerateRequest:
    """The ``GenerateRequest`` for these tokens and options."""

    def ranges(key: str) -> list[pb.PositionRange]:
        return [pb.PositionRange(start=s, end=e) for s, e in options.get(key, ())]  # type: ignore[attr-defined]

    request = pb.GenerateRequest(
        session_id=session_id,
        append_tokens=list(append_tokens),
        offset=offset,
        truncating=truncating,
        max_tokens=options.get("max_tokens", DEFAULT_MAX_TOKENS),
        logprobs_ranges=ranges("logprobs_ranges"),
        logprob_top_k=options.get("logprob_top_k", 0),
        readout_ranges=ranges("readout_ranges"),
        temperature=options.get("temperature", 0.0),
        top_p=options.get("top_p", 0.0),
        top_k=options.get("top_k", 0),
        min_p=options.get("min_p", 0.0),
        repetition_penalty=options.get("repetition_penalty", 0.0),
        stop_token_ids=list(options.get("stop_token_ids", ())),
        stop_strings=list(options.get("stop_strings", ())),
        return_text=options.get("return_text", True),
        priority=options.get("priority", 0),
        ignore_eos=options.get("ignore_eos", False),
        frequency_penalty=options.get("frequency_penalty", 0.0),
        presence_penalty=options.get("presence_penalty", 0.0),
        logit_bias=dict(options.get("logit_bias", {})),
        min_tokens=options.get("min_tokens", 0),
    )
    constraint = options.get("constraint")
    if constraint:
        request.constraint.CopyFrom(pb.Constraint(**dict(constraint)))  # type: ignore[arg-type]
    seed = options.get("seed")
    if seed is not None:
        request.seed = seed
    return request


def sum_ranges(
    events: Sequence[TokenEvent | Done], ranges: Sequence[tuple[int, int]]
) -> list[float]:
    """Per range, the sum of the scored tokens' logprobs whose position lies in it."""
    logprobs = {e.position: e.logprob for e in events if isinstance(e, TokenEvent)}
    return [sum(lp for p, lp in logprobs.items() if start <= p < end) for start, end in ranges]


def no_done() -> SalienceClientError:
    """The error of a stream that ended without its Done."""
    return SalienceClientError(grpc.StatusCode.INTERNAL, "NO_DONE", "the stream ended without Done")


def last_done(events: Sequence[TokenEvent | Done]) -> Done:
    """The stream's Done (a finished stream always ends with one)."""
    if not events or not isinstance(events[-1], Done):
        raise no_done()
    return events[-1]


def call_unary(method: Callable[..., _Response], request: Any, timeout: float | None) -> _Response:
    """Calls a unary RPC, turning a failed call into SalienceClientError."""
    try:
        return method(request, timeout=timeout)
    except grpc.RpcError as error:
        raise SalienceClientError.from_rpc_error(error) from None


class Session(SessionBase):
    """A server session (sync). Use as a context manager to close it on exit.

    Every call carries the session's ``x-session-id``; behind a proxy with several
    replicas the session survives the loss of its replica (SPEC 2.7): a NOT_FOUND is
    answered by re-creating it from its history, a broken stream resumes (see
    ``salience_client.failover``).
    """

    _stub: salience_pb2_grpc.SalienceStub

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def generate(
        self,
        append_tokens: Sequence[int] = (),
        *,
        truncate_to: int | None = None,
        **options: Unpack[GenerateOptions],
    ) -> Generator[TokenEvent | Done, None, None]:
        """Appends ``append_tokens`` and decodes; yields TokenEvents, then one Done.

        ``truncate_to`` rewinds the session to that length first. The call starts at
        the first ``next()``. Leaving the iterator before Done cancels the call and
        re-reads the session's length from the server.
        """
        check_options(dict(options))
        return self._stream(append_tokens, truncate_to, options)

    def _stream(
        self, append_tokens: Sequence[int], truncate_to: int | None, options: GenerateOptions
    ) -> Generator[TokenEvent | Done, None, None]:
        offset, truncating = self._offset(truncate_to)
        request = generate_request(self.session_id, append_tokens, offset, truncating, options)
        manifest = self._manifest
        if request.readout_ranges and manifest is None:
            manifest = self._set_manifest(self._model_info())
        progress = StreamProgress(request)
        attempts = Attempts(self._failover)
        finish_reason = ""
        call = None
        failure: SalienceClientError | None = None
        is_done = False
        try:
            while not is_done:
                call = self._stub.Generate(request, metadata=self._metadata)
                try:
                    for index, event in enumerate(call):
                        if index == 0:
                            self._note_replica(call.initial_metadata())
                        converted = self._event(event, manifest, progress, finish_reason)
                        if converted is not None:
                            is_done = isinstance(converted, Done)
                            yield converted
                except grpc.RpcError as rpc_error:
                    failure = self._failure(rpc_error)
                if failure is None and not is_done:
                    failure = no_done()
                    raise failure
                if failure is not None:
                    request, finish_reason = self._recover_stream(failure, progress, attempts)
                    failure = None
        finally:
            if not is_done:
                if call is not None:
                    call.cancel()
                self._forget_unsure(progress, failure)
                self._resync(wait=failure is None)

    def _recover_stream(
        self, error: SalienceClientError, progress: StreamProgress, attempts: Attempts
    ) -> tuple[pb.GenerateRequest, str]:
        """Re-creates the session or waits, as the failure asks; the call that resumes
        the stream, and the finish reason it settles on when nothing is left."""
        self._commit(progress)  # a replay restores what has streamed too
        if not progress.is_resumable:
            raise error
        self._recover(error, attempts, progress.replay_length)
        self._resumed(error, progress)
        eos_token_ids = self._eos_ids() if progress.needs_eos_ids() else []
        return progress.next_request(eos_token_ids)

    def _resync(self, wait: bool) -> None:
        """Re-reads the length after a call that ended early; never replays."""
        deadline = time.monotonic() + (SYNC_WAIT_S if wait else 0.0)
        request = pb.GetSessionRequest(session_id=self.session_id)
        with contextlib.suppress(SalienceClientError):
            info = self._unary(self._stub.GetSession, request).session
            while info.busy and time.monotonic() < deadline:
                time.sleep(0.01)
                info = self._unary(self._stub.GetSession, request).session
            self._synced(info.length)

    def sync(self, wait_s: float = SYNC_WAIT_S) -> SessionInfo:
        """Re-reads ``length`` from the server, waiting up to ``wait_s`` while it is busy."""
        deadline = time.monotonic() + wait_s
        info = self.info()
        while info.is_busy and time.monotonic() < deadline:
            time.sleep(0.01)
            info = self.info()
        self._synced(info.length)
        return info

    def prefill(self, tokens: Sequence[int]) -> Done:
        """Appends ``tokens`` without decoding."""
        return last_done(list(self.generate(tokens, max_tokens=0, return_text=False)))

    def rewind(self, offset: int) -> Done:
        """Truncates the session (and its KV) to ``offset`` tokens."""
        return last_done(list(self.generate((), truncate_to=offset, max_tokens=0)))

    def score(self, tokens: Sequence[int], ranges: Sequence[tuple[int, int]]) -> list[float]:
        """Appends ``tokens``; returns, per absolute position range, the summed logprob of
        the tokens in it (each under the model, given every token before it)."""
        events = list(
            self.generate(tokens, max_tokens=0, logprobs_ranges=ranges, return_text=False)
        )
        return sum_ranges(events, ranges)

    def fork(self, new_session_id: str = "") -> Session:
        """A new session sharing this one's committed tokens (copy-on-write KV). It routes
        with this session's ``x-session-id``, so it stays on the replica holding the KV."""
        child_id = new_session_id or fresh_session_id()
        request = pb.ForkSessionRequest(session_id=self.session_id, new_session_id=child_id)
        attempts = Attempts(self._failover)
        while True:
            try:
                response = self._unary(self._stub.ForkSession, request)
                return self._child(response.session_id or child_id, response.length)
            except SalienceClientError as error:
                if error.code == grpc.StatusCode.ALREADY_EXISTS and attempts.num_retries:
                    return self._child(child_id, self.length)  # an earlier try went through
                failure = error
            self._recover(failure, attempts, self.length)

    def _child(self, child_id: str, length: int) -> Session:
        return Session(
            self._stub,
            child_id,
            self.max_context,
            length,
            self._timeout,
            **self._child_options(length),
        )

    def append_image(self, data: bytes, mime_type: str, truncate_to: int | None = None) -> int:
        """Appends one image; returns how many placeholder tokens it became."""
        offset, truncating = self._offset(truncate_to)
        request = pb.AppendImageRequest(
            session_id=self.session_id,
            image=data,
            mime_type=mime_type,
            offset=offset,
            truncating=truncating,
        )
        attempts = Attempts(self._failover)
        while True:
            try:
                response = self._unary(self._stub.AppendImage, request)
                break
            except SalienceClientError as error:
                failure = error
            try:
                self._recover(failure, attempts, offset)
            except SalienceClientError:
                self._forget_unsure_at(offset, failure)
                self._resync(wait=False)
                raise
            request.truncating = True  # whatever a broken try left goes
        self._image_appended(offset, data, mime_type, response)
        return response.placeholder_count

    def info(self) -> SessionInfo:
        """The server's view of this session."""
        request = pb.GetSessionRequest(session_id=self.session_id)
        return SessionInfo.from_pb(self._call(self._stub.GetSession, request, self.length).session)

    def close(self) -> None:
        """Frees the session on the server; closing twice, or an expired one, is fine."""
        if self.is_closed:
            return
        self.is_closed = True
        request = pb.CloseSessionRequest(session_id=self.session_id)
        try:
            self._unary(self._stub.CloseSession, request)
        except SalienceClientError as error:
            if error.code != grpc.StatusCode.NOT_FOUND:
                raise

    def _open(self) -> None:
        """Creates this session on the server under its id (retrying while no replica
        answers)."""
        request = pb.OpenSessionRequest(session_id=self.session_id, max_context=self.max_context)
        attempts = Attempts(self._failover)
        while True:
            try:
                self._opened(self._unary(self._stub.OpenSession, request))
                return
            except SalienceClientError as error:
                if error.code == grpc.StatusCode.ALREADY_EXISTS and attempts.num_retries:
                    self.max_context = self._read_info().max_context  # an earlier try went through
                    return
                failure = error
            self._recover(failure, attempts, None)

    # ----- calls and recovery ------------------------------------------------------------

    def _unary(self, method: Any, request: Any) -> Any:
        """One call of a unary session RPC with the session's metadata."""
        try:
            response, call = method.with_call(
                request, timeout=self._timeout, metadata=self._metadata
            )
        except grpc.RpcError as error:
            raise self._failure(error) from None
        self._note_replica(call.initial_metadata())
        return response

    def _call(self, method: Any, request: Any, replay_length: int | None) -> Any:
        """A unary session RPC that recovers: replays (to ``replay_length``) a lost
        session, retries while no replica answers."""
        attempts = Attempts(self._failover)
        while True:
            try:
                return self._unary(method, request)
            except SalienceClientError as error:
                failure = error
            self._recover(failure, attempts, replay_length)

    def _failure(self, error: grpc.RpcError) -> SalienceClientError:
        self._note_replica(error.initial_metadata())  # type: ignore[attr-defined]
        return SalienceClientError.from_rpc_error(error)

    def _read_info(self) -> pb.SessionInfo:
        request = pb.GetSessionRequest(session_id=self.session_id)
        return self._unary(self._stub.GetSession, request).session

    def _recover(
        self, error: SalienceClientError, attempts: Attempts, replay_length: int | None
    ) -> None:
        """Does what ``_recovery`` decides: waits, or re-creates the session (trying again
        until the replays are spent); raises when nothing can be done."""
        recovery = self._recovery(error, attempts, replay_length)
        if recovery.replay_length is None:
            time.sleep(recovery.wait_s)
            return
        cause = error
        while True:
            try:
                self._replay(recovery.replay_length, cause)
                return
            except SalienceClientError as failed:
                cause = failed
            attempts.begin_replay(self.session_id, cause)
            time.sleep(self._failover.first_retry_wait_s)

    def _replay(self, length: int, cause: SalienceClientError) -> None:
        """Re-creates the session under its id on whichever replica now serves it, holding
        the first ``length`` positions of its history."""
        request = pb.OpenSessionRequest(session_id=self.session_id, max_context=self.max_context)
        try:
            self._unary(self._stub.OpenSession, request)
            is_fresh = True
        except SalienceClientError as error:
            if error.code != grpc.StatusCode.ALREADY_EXISTS:
                raise
            is_fresh = False  # a stale copy: every step rewrites it from position 0
        for step in self._replay_steps(length, is_fresh):
            if isinstance(step, ImageStep):
                response = self._unary(self._stub.AppendImage, self._replay_image_request(step))
                self._check_replayed_image(step, response.placeholder_count)
                continue
            call = self._stub.Generate(self._replay_prefill_request(step), metadata=self._metadata)
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
