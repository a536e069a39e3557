"""``AsyncSalienceClient`` and ``AsyncSession``: the asyncio client over ``grpc.aio``.

They mirror ``SalienceClient`` and ``Session`` method for method; every call is awaited
and ``generate`` is an async iterator. Leave a stream early inside
``contextlib.aclosing(session.generate(...))`` to cancel it at once (a stream merely
dropped is cancelled when it is garbage-collected).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from salience_client.aio_session import AsyncSession
from salience_client.auth import async_bearer_token
from salience_client.client import (
    CHANNEL_OPTIONS,
    DEFAULT_TARGET,
    embed_request,
    failover_policy,
    not_ready,
    retries_unanswered,
    tokenize_chat_request,
)
from salience_client.closing import closed_client_calls, refuse_calls
from salience_client.failover import (
    OUTCOME_UNKNOWN,
    Attempts,
    Failover,
    FailoverStats,
    routing_metadata,
)
from salience_client.failover import new_session_id as fresh_session_id
from salience_client.history import History
from salience_client.pb import salience_pb2 as pb
from salience_client.pb import salience_pb2_grpc
from salience_client.types import Embeddings, ModelInfo, SalienceClientError, SessionInfo
from salience_client.unary import await_unary

__all__ = ["AsyncSalienceClient", "AsyncSession"]


class AsyncSalienceClient:
    """An asyncio client of a Salience server at ``target`` (``host:port``), or of
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
        ``replay``: as in ``SalienceClient``."""
        self.target = target
        self._timeout = timeout
        self.failover = failover_policy(replay)
        self.failover_stats = FailoverStats()
        """Replays and resumes over every session of this client."""
        interceptors = async_bearer_token(api_key) if api_key else None
        self._channel = grpc.aio.insecure_channel(
            target, options=CHANNEL_OPTIONS, interceptors=interceptors
        )
        self._stub = salience_pb2_grpc.SalienceStub(self._channel)

    async def __aenter__(self) -> AsyncSalienceClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the channel; sessions opened through it can no longer be used (as in
        ``SalienceClient.close``)."""
        refuse_calls(self._stub)
        await self._channel.close()

    async def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Waits until the server reports SERVING (its model is loaded)."""
        health = health_pb2_grpc.HealthStub(self._channel)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                response = await health.Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=1.0
                )
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    self.failover_stats.is_server_reached = True
                    return
            except grpc.RpcError:
                pass  # not listening yet
            await asyncio.sleep(0.05)
        raise not_ready(self.target, timeout_s)

    async def _call(self, method: str, request: Any) -> Any:
        """As ``SalienceClient._call``."""
        attempts = Attempts(self.failover)
        while True:
            try:
                with closed_client_calls(self._stub):
                    response = await await_unary(
                        getattr(self._stub, method), request, self._timeout
                    )
            except SalienceClientError as error:
                if not retries_unanswered(self.failover, self.failover_stats, error):
                    raise
                await asyncio.sleep(attempts.retry_wait_s(error))
                continue
            self.failover_stats.is_server_reached = True
            return response

    async def open_session(self, max_context: int = 0, session_id: str = "") -> AsyncSession:
        """As ``SalienceClient.open_session``."""
        session = self._session(session_id or fresh_session_id(), max_context, 0, "")
        try:
            await session._open()
        except SalienceClientError as error:
            if not session_id and error.code in OUTCOME_UNKNOWN:  # as in SalienceClient
                with contextlib.suppress(SalienceClientError):
                    await session.close()
            raise
        except asyncio.CancelledError:
            if not session_id:  # the server may have made it, and only we know its id
                session.close_in_background(session.session_id)
            raise
        return session

    async def session(self, session_id: str, routing_key: str = "") -> AsyncSession:
        """As ``SalienceClient.session``."""
        info = await self.get_session(session_id, routing_key)
        return self._session(session_id, info.max_context, info.length, routing_key)

    def _session(
        self, session_id: str, max_context: int, length: int, routing_key: str
    ) -> AsyncSession:
        return AsyncSession(
            self._stub,
            session_id,
            max_context,
            length,
            self._timeout,
            routing_key=routing_key,
            history=History(),
            failover=self.failover,
            stats=self.failover_stats,
        )

    async def model_info(self) -> ModelInfo:
        """The served model: ids, limits, special tokens, capabilities."""
        return ModelInfo.from_pb(await self._call("GetModelInfo", pb.GetModelInfoRequest()))

    async def tokenize(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Text to token ids."""
        request = pb.TokenizeRequest(text=text, add_special_tokens=add_special_tokens)
        return list((await self._call("Tokenize", request)).token_ids)

    async def tokenize_chat(
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
        return list((await self._call("Tokenize", request)).token_ids)

    async def detokenize(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Token ids to text."""
        request = pb.DetokenizeRequest(
            token_ids=list(token_ids), skip_special_tokens=skip_special_tokens
        )
        return str((await self._call("Detokenize", request)).text)

    async def token_bytes(self, token_ids: Sequence[int]) -> list[bytes]:
        """Each token's own bytes (a piece of a UTF-8 character, for some tokens)."""
        request = pb.DetokenizeRequest(token_ids=list(token_ids), return_token_bytes=True)
        return list((await self._call("Detokenize", request)).token_bytes)

    async def embed(
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
        return Embeddings.from_pb(await self._call("Embed", request))

    async def list_sessions(self) -> list[SessionInfo]:
        """Every live session (of the one replica that answers, behind a proxy)."""
        response = await self._call("ListSessions", pb.ListSessionsRequest())
        return [SessionInfo.from_pb(info) for info in response.sessions]

    async def get_session(self, session_id: str, routing_key: str = "") -> SessionInfo:
        """As ``SalienceClient.get_session``."""
        request = pb.GetSessionRequest(session_id=session_id)
        metadata = routing_metadata(routing_key or session_id)
        try:
            with closed_client_calls(self._stub):
                response = await self._stub.GetSession(
                    request, timeout=self._timeout, metadata=metadata
                )
        except grpc.RpcError as error:
            raise SalienceClientError.from_rpc_error(error) from None
        return SessionInfo.from_pb(response.session)
