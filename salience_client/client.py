"""``SalienceClient``: the synchronous client. One channel, shared by every session and call."""

from __future__ import annotations

import contextlib
import json
import operator
import time
from collections.abc import Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from salience_client.auth import BearerToken
from salience_client.closing import refuse_calls
from salience_client.failover import (
    OUTCOME_UNKNOWN,
    Attempts,
    Failover,
    FailoverStats,
    is_broken,
    new_session_id,
    routing_metadata,
)
from salience_client.history import History
from salience_client.pb import salience_pb2 as pb
from salience_client.pb import salience_pb2_grpc
from salience_client.session import Session
from salience_client.types import Embeddings, ModelInfo, SalienceClientError, SessionInfo
from salience_client.unary import call_unary

DEFAULT_TARGET = "127.0.0.1:50051"
MAX_MESSAGE_BYTES = 64 * 2**20
"""Images travel in one message."""
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


def tokenize_chat_request(
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
    tools: list[dict[str, Any]] | None,
    chat_template_kwargs: dict[str, Any] | None = None,
    continue_final_message: bool = False,
    images: Sequence[tuple[bytes, str]] = (),
) -> pb.TokenizeRequest:
    """Chat messages (and tools, template variables) as JSON, so tool calls and content
    parts pass unchanged; ``images`` as (bytes, mime type)."""
    return pb.TokenizeRequest(
        messages=pb.ChatMessages(messages_json=json.dumps(messages)),
        add_generation_prompt=add_generation_prompt,
        tools_json=json.dumps(tools) if tools else "",
        chat_template_kwargs_json=json.dumps(chat_template_kwargs) if chat_template_kwargs else "",
        continue_final_message=continue_final_message,
        images=[pb.ImageData(data=data, mime_type=mime_type) for data, mime_type in images],
    )


def embed_request(
    texts: Sequence[str] | None,
    token_lists: Sequence[Sequence[int]] | None,
    pooling: str,
    normalize: bool,
    add_special_tokens: bool,
    priority: int = 0,
) -> pb.EmbedRequest:
    """An EmbedRequest: texts or token lists, ``pooling`` "last" or "mean". A str is
    one text (it was a sequence of texts: one vector per character)."""
    if pooling not in ("last", "mean"):
        raise ValueError(f"pooling must be 'last' or 'mean', not {pooling!r}")
    try:
        fits = not isinstance(priority, bool) and -(2**31) <= operator.index(priority) < 2**31
    except TypeError:
        fits = False
    if not fits:
        raise ValueError(f"embed(): priority takes a 32-bit integer, got {priority!r}")
    return pb.EmbedRequest(
        texts=[texts] if isinstance(texts, str) else list(texts or ()),
        token_lists=[pb.TokenIds(token_ids=list(tokens)) for tokens in token_lists or ()],
        pooling=pb.POOLING_MEAN if pooling == "mean" else pb.POOLING_LAST,
        normalize=normalize,
        add_special_tokens=add_special_tokens,
        priority=priority,
    )


def retries_unanswered(policy: Failover, stats: FailoverStats, error: SalienceClientError) -> bool:
    """Whether a call that is no session's retries after ``error``: no replica answered
    it (and one has answered this client before: a wrong address fails at once)."""
    return policy.replay and stats.is_server_reached and is_broken(error)


def failover_policy(replay: bool | Failover) -> Failover:
    """``replay`` as a client takes it: a policy, or on/off with the default budget."""
    return replay if isinstance(replay, Failover) else Failover(replay=replay)


def not_ready(target: str, timeout_s: float) -> SalienceClientError:
    return SalienceClientError(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        "NOT_READY",
        f"the server at {target} was not serving after {timeout_s:g} s",
    )


class SalienceClient:
    """A synchronous client of a Salience server at ``target`` (``host:port``), or of
    several replicas behind a proxy there (SPEC 2.7).

    ``timeout`` (seconds) bounds every unary call; streams are not bounded.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = None,
        api_key: str | None = None,
        replay: bool | Failover = True,
    ) -> None:
        """``api_key``: sent as ``authorization: Bearer`` metadata on every call.
        ``replay``: re-create sessions lost with their replica and resume broken streams
        (on by default; ``False`` turns it off, a ``Failover`` sets its budget)."""
        self.target = target
        self._timeout = timeout
        self.failover = failover_policy(replay)
        self.failover_stats = FailoverStats()
        """Replays and resumes over every session of this client."""
        self._channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        if api_key:
            self._channel = grpc.intercept_channel(self._channel, BearerToken(api_key))
        self._stub = salience_pb2_grpc.SalienceStub(self._channel)

    def __enter__(self) -> SalienceClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel; sessions opened through it can no longer be used (their
        calls raise ``CLIENT_CLOSED``; closing them is a no-op)."""
        refuse_calls(self._stub)
        self._channel.close()

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Waits until the server reports SERVING (its model is loaded)."""
        health = health_pb2_grpc.HealthStub(self._channel)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                response = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    self.failover_stats.is_server_reached = True
                    return
            except grpc.RpcError:
                pass  # not listening yet
            time.sleep(0.05)
        raise not_ready(self.target, timeout_s)

    def _call(self, method: str, request: Any) -> Any:
        """A call that is no session's; while no replica answers, it retries within the
        failover's budget as a session's call does (it failed at once)."""
        attempts = Attempts(self.failover)
        while True:
            try:
                response = call_unary(getattr(self._stub, method), request, self._timeout)
            except SalienceClientError as error:
                if not retries_unanswered(self.failover, self.failover_stats, error):
                    raise
                time.sleep(attempts.retry_wait_s(error))
                continue
            self.failover_stats.is_server_reached = True
            return response

    def open_session(self, max_context: int = 0, session_id: str = "") -> Session:
        """Creates an empty session; ``max_context`` 0 means the server's limit.
        ``session_id``: the caller's choice (ALREADY_EXISTS when taken), else a fresh
        random id chosen here, so that a proxy can route even this first call."""
        session = self._session(session_id or new_session_id(), max_context, 0, "", History())
        try:
            session._open()
        except SalienceClientError as error:
            # The call may have made the session all the same (its answer came too late,
            # or the connection broke on the way back): close it, rather than leave it
            # to the server's TTL. Only an id chosen here is surely no one else's.
            if not session_id and error.code in OUTCOME_UNKNOWN:
                with contextlib.suppress(SalienceClientError):
                    session.close()
            raise
        return session

    def session(self, session_id: str, routing_key: str = "") -> Session:
        """A handle on an existing session, its length read from the server.
        ``routing_key``: its ``x-session-id`` when it is a fork (its family's root id).
        The handle knows none of its tokens, so it cannot be replayed."""
        info = self.get_session(session_id, routing_key)
        return self._session(session_id, info.max_context, info.length, routing_key, History())

    def _session(
        self, session_id: str, max_context: int, length: int, routing_key: str, history: History
    ) -> Session:
        return Session(
            self._stub,
            session_id,
            max_context,
            length,
            self._timeout,
            routing_key=routing_key,
            history=history,
            failover=self.failover,
            stats=self.failover_stats,
        )

    def model_info(self) -> ModelInfo:
        """The served model: ids, limits, special tokens, capabilities."""
        return ModelInfo.from_pb(self._call("GetModelInfo", pb.GetModelInfoRequest()))

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Text to token ids."""
        request = pb.TokenizeRequest(text=text, add_special_tokens=add_special_tokens)
        return list(self._call("Tokenize", request).token_ids)

    def tokenize_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        continue_final_message: bool = False,
        images: Sequence[tuple[bytes, str]] = (),
    ) -> list[int]:
        """Chat messages through the model's chat template to token ids.
        ``chat_template_kwargs`` are extra template variables (``enable_thinking``);
        ``continue_final_message`` leaves the last (assistant) message open. ``images``,
        (bytes, mime type) for each image pad token of the rendered messages in order,
        make each of those as many pad tokens as ``append_image`` makes of its image."""
        request = tokenize_chat_request(
            messages,
            add_generation_prompt,
            tools,
            chat_template_kwargs,
            continue_final_message,
            images,
        )
        return list(self._call("Tokenize", request).token_ids)

    def detokenize(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Token ids to text."""
        request = pb.DetokenizeRequest(
            token_ids=list(token_ids), skip_special_tokens=skip_special_tokens
        )
        return str(self._call("Detokenize", request).text)

    def token_bytes(self, token_ids: Sequence[int]) -> list[bytes]:
        """Each token's own bytes (a piece of a UTF-8 character, for some tokens)."""
        request = pb.DetokenizeRequest(token_ids=list(token_ids), return_token_bytes=True)
        return list(self._call("Detokenize", request).token_bytes)

    def embed(
        self,
        texts: Sequence[str] | None = None,
        token_lists: Sequence[Sequence[int]] | None = None,
        pooling: str = "last",
        normalize: bool = False,
        add_special_tokens: bool = False,
        priority: int = 0,
    ) -> Embeddings:
        """One vector per text (or token list): the final hidden state of the last
        token, or the mean over all tokens, optionally L2-normalised; ``priority``: lower
        runs first, as in ``generate``."""
        request = embed_request(
            texts, token_lists, pooling, normalize, add_special_tokens, priority
        )
        return Embeddings.from_pb(self._call("Embed", request))

    def list_sessions(self) -> list[SessionInfo]:
        """Every live session (of the one replica that answers, behind a proxy)."""
        response = self._call("ListSessions", pb.ListSessionsRequest())
        return [SessionInfo.from_pb(info) for info in response.sessions]

    def get_session(self, session_id: str, routing_key: str = "") -> SessionInfo:
        """One session's length, residency and idle time (``routing_key``: as in
        ``session``)."""
        request = pb.GetSessionRequest(session_id=session_id)
        metadata = routing_metadata(routing_key or session_id)
        try:
            response = self._stub.GetSession(request, timeout=self._timeout, metadata=metadata)
        except grpc.RpcError as error:
            raise SalienceClientError.from_rpc_error(error) from None
        return SessionInfo.from_pb(response.session)
