"""``Session``: one server session, tracking its committed length and sending ``offset``.

The request building and range arithmetic here are shared with ``AsyncSession``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from typing import Any, TypedDict, TypeVar, Unpack

import grpc

from salience_client.pb import salience_pb2 as pb
from salience_client.pb import salience_pb2_grpc
from salience_client.types import (
    Done,
    ReadoutManifest,
    SalienceClientError,
    SessionInfo,
    TokenEvent,
)

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


def last_done(events: Sequence[TokenEvent | Done]) -> Done:
    """The stream's Done (a finished stream always ends with one)."""
    if not events or not isinstance(events[-1], Done):
        raise SalienceClientError(
            grpc.StatusCode.INTERNAL, "NO_DONE", "the stream ended without Done"
        )
    return events[-1]


def call_unary(method: Callable[..., _Response], request: Any, timeout: float | None) -> _Response:
    """Calls a unary RPC, turning a failed call into SalienceClientError."""
    try:
        return method(request, timeout=timeout)
    except grpc.RpcError as error:
        raise SalienceClientError.from_rpc_error(error) from None


class SessionBase:
    """What a session knows about itself, with or without asyncio."""

    def __init__(
        self,
        stub: Any,
        session_id: str,
        max_context: int,
        length: int = 0,
        timeout: float | None = None,
    ) -> None:
        self._stub = stub
        self._timeout = timeout
        self.session_id = session_id
        self.max_context = max_context
        """Tokens this session may hold, image placeholders included."""
        self.length = length
        """The committed length as this client last saw it; the next call's ``offset``."""
        self.is_closed = False
        self._manifest: ReadoutManifest | None = None

    def _set_manifest(self, info: pb.GetModelInfoResponse) -> ReadoutManifest:
        manifest = info.readout_manifest
        self._manifest = ReadoutManifest(list(manifest.layers), list(manifest.concepts))
        return self._manifest

    def _event(
        self, event: pb.GenerateEvent, manifest: ReadoutManifest | None
    ) -> TokenEvent | Done:
        """Converts one streamed event; a Done also updates the tracked length."""
        if event.HasField("done"):
            done = Done.from_pb(event.done)
            self.length = done.total_tokens
            return done
        return TokenEvent.from_pb(event.token, manifest)

    def _offset(self, truncate_to: int | None) -> tuple[int, bool]:
        """(offset, truncating) for the next call."""
        return (self.length, False) if truncate_to is None else (truncate_to, True)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.session_id!r}, length={self.length})"


class Session(SessionBase):
    """A server session (sync). Use as a context manager to close it on exit."""

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
            info = call_unary(self._stub.GetModelInfo, pb.GetModelInfoRequest(), self._timeout)
            manifest = self._set_manifest(info)
        call = self._stub.Generate(request)
        is_done = is_failed = False
        try:
            for event in call:
                converted = self._event(event, manifest)
                is_done = isinstance(converted, Done)
                yield converted
        except grpc.RpcError as error:
            is_failed = True
            raise SalienceClientError.from_rpc_error(error) from None
        finally:
            if not is_done:
                call.cancel()
                self._resync(wait=not is_failed)

    def _resync(self, wait: bool) -> None:
        with contextlib.suppress(SalienceClientError):
            self.sync(wait_s=SYNC_WAIT_S if wait else 0.0)

    def sync(self, wait_s: float = SYNC_WAIT_S) -> SessionInfo:
        """Re-reads ``length`` from the server, waiting up to ``wait_s`` while it is busy."""
        deadline = time.monotonic() + wait_s
        info = self.info()
        while info.is_busy and time.monotonic() < deadline:
            time.sleep(0.01)
            info = self.info()
        self.length = info.length
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
        """A new session sharing this one's committed tokens (copy-on-write KV)."""
        request = pb.ForkSessionRequest(session_id=self.session_id, new_session_id=new_session_id)
        response = call_unary(self._stub.ForkSession, request, self._timeout)
        return Session(
            self._stub, response.session_id, self.max_context, response.length, self._timeout
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
        try:
            response = call_unary(self._stub.AppendImage, request, self._timeout)
        except SalienceClientError:
            self._resync(wait=False)
            raise
        self.length = response.total_length
        return response.placeholder_count

    def info(self) -> SessionInfo:
        """The server's view of this session."""
        request = pb.GetSessionRequest(session_id=self.session_id)
        return SessionInfo.from_pb(
            call_unary(self._stub.GetSession, request, self._timeout).session
        )

    def close(self) -> None:
        """Frees the session on the server; closing twice, or an expired one, is fine."""
        if self.is_closed:
            return
        self.is_closed = True
        request = pb.CloseSessionRequest(session_id=self.session_id)
        try:
            call_unary(self._stub.CloseSession, request, self._timeout)
        except SalienceClientError as error:
            if error.code != grpc.StatusCode.NOT_FOUND:
                raise
