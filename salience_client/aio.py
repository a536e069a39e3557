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
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar, Unpack

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from salience_client.auth import async_bearer_token
from salience_client.client import (
    CHANNEL_OPTIONS,
    DEFAULT_TARGET,
    embed_request,
    not_ready,
    tokenize_chat_request,
)
from salience_client.pb import salience_pb2 as pb
from salience_client.pb import salience_pb2_grpc
from salience_client.session import (
    SYNC_WAIT_S,
    GenerateOptions,
    SessionBase,
    check_options,
    generate_request,
    last_done,
    sum_ranges,
)
from salience_client.types import (
    Done,
    Embeddings,
    ModelInfo,
    SalienceClientError,
    SessionInfo,
    TokenEvent,
)

_Response = TypeVar("_Response")


async def call_unary(
    method: Callable[..., Awaitable[_Response]], request: Any, timeout: float | None
) -> _Response:
    """Awaits a unary RPC, turning a failed call into SalienceClientError."""
    try:
        return await method(request, timeout=timeout)
    except grpc.RpcError as error:
        raise SalienceClientError.from_rpc_error(error) from None


class AsyncSession(SessionBase):
    """A server session (asyncio). Use ``async with`` to close it on exit."""

    _stub: salience_pb2_grpc.SalienceStub

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def generate(
        self,
        append_tokens: Sequence[int] = (),
        *,
        truncate_to: int | None = None,
        **options: Unpack[GenerateOptions],
    ) -> AsyncGenerator[TokenEvent | Done, None]:
        """Appends ``append_tokens`` and decodes; yields TokenEvents, then one Done.

        ``truncate_to`` rewinds the session to that length first. Closing the iterator
        before Done cancels the call and re-reads the session's length.
        """
        check_options(dict(options))
        return self._stream(append_tokens, truncate_to, options)

    async def _stream(
        self, append_tokens: Sequence[int], truncate_to: int | None, options: GenerateOptions
    ) -> AsyncGenerator[TokenEvent | Done, None]:
        offset, truncating = self._offset(truncate_to)
        request = generate_request(self.session_id, append_tokens, offset, truncating, options)
        manifest = self._manifest
        if request.readout_ranges and manifest is None:
            try:
                info = await self._stub.GetModelInfo(
                    pb.GetModelInfoRequest(), timeout=self._timeout
                )
            except grpc.RpcError as error:
                raise SalienceClientError.from_rpc_error(error) from None
            manifest = self._set_manifest(info)
        call = self._stub.Generate(request)
        is_done = is_failed = False
        try:
            async for event in call:
                converted = self._event(event, manifest)
                is_done = isinstance(converted, Done)
                yield converted
        except grpc.RpcError as error:
            is_failed = True
            raise SalienceClientError.from_rpc_error(error) from None
        finally:
            if not is_done:
                call.cancel()
                await self._resync(wait=not is_failed)

    async def _resync(self, wait: bool) -> None:
        with contextlib.suppress(SalienceClientError):
            await self.sync(wait_s=SYNC_WAIT_S if wait else 0.0)

    async def sync(self, wait_s: float = SYNC_WAIT_S) -> SessionInfo:
        """Re-reads ``length`` from the server, waiting up to ``wait_s`` while it is busy."""
        deadline = time.monotonic() + wait_s
        info = await self.info()
        while info.is_busy and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
            info = await self.info()
        self.length = info.length
        return info

    async def _collect(self, events: AsyncIterator[TokenEvent | Done]) -> list[TokenEvent | Done]:
        return [event async for event in events]

    async def prefill(self, tokens: Sequence[int]) -> Done:
        """Appends ``tokens`` without decoding."""
        return last_done(
            await self._collect(self.generate(tokens, max_tokens=0, return_text=False))
        )

    async def rewind(self, offset: int) -> Done:
        """Truncates the session (and its KV) to ``offset`` tokens."""
        return last_done(await self._collect(self.generate((), truncate_to=offset, max_tokens=0)))

    async def score(self, tokens: Sequence[int], ranges: Sequence[tuple[int, int]]) -> list[float]:
        """Appends ``tokens``; returns, per absolute position range, the summed logprob of
        the tokens in it (each under the model, given every token before it)."""
        events = self.generate(tokens, max_tokens=0, logprobs_ranges=ranges, return_text=False)
        return sum_ranges(await self._collect(events), ranges)

    async def fork(self, new_session_id: str = "") -> AsyncSession:
        """A new session sharing this one's committed tokens (copy-on-write KV)."""
        request = pb.ForkSessionRequest(session_id=self.session_id, new_session_id=new_session_id)
        response = await call_unary(self._stub.ForkSession, request, self._timeout)
        return AsyncSession(
            self._stub, response.session_id, self.max_context, response.length, self._timeout
        )

    async def append_image(
        self, data: bytes, mime_type: str, truncate_to: int | None = None
    ) -> int:
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
            response = await call_unary(self._stub.AppendImage, request, self._timeout)
        except SalienceClientError:
            await self._resync(wait=False)
            raise
        self.length = response.total_length
        return response.placeholder_count

    async def info(self) -> SessionInfo:
        """The server's view of this session."""
        request = pb.GetSessionRequest(session_id=self.session_id)
        response = await call_unary(self._stub.GetSession, request, self._timeout)
        return SessionInfo.from_pb(response.session)

    async def close(self) -> None:
        """Frees the session on the server; closing twice, or an expired one, is fine."""
        if self.is_closed:
            return
        self.is_closed = True
        request = pb.CloseSessionRequest(session_id=self.session_id)
        try:
            await call_unary(self._stub.CloseSession, request, self._timeout)
        except SalienceClientError as error:
            if error.code != grpc.StatusCode.NOT_FOUND:
                raise


class AsyncSalienceClient:
    """An asyncio client of a Salience server at ``target`` (``host:port``).

    ``timeout`` (seconds) bounds every unary call; streams are not bounded.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = None,
        api_key: str | None = None,
    ) -> None:
        """``api_key``: sent as ``authorization: Bearer`` metadata on every call."""
        self.target = target
        self._timeout = timeout
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
        """Closes the channel; sessions opened through it can no longer be used."""
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
                    return
            except grpc.RpcError:
                pass  # not listening yet
            await asyncio.sleep(0.05)
        raise not_ready(self.target, timeout_s)

    async def _call(self, method: str, request: Any) -> Any:
        return await call_unary(getattr(self._stub, method), request, self._timeout)

    async def open_session(self, max_context: int = 0, session_id: str = "") -> AsyncSession:
        """Creates an empty session; ``max_context`` 0 means the server's limit."""
        request = pb.OpenSessionRequest(session_id=session_id, max_context=max_context)
        response = await self._call("OpenSession", request)
        return AsyncSession(self._stub, response.session_id, response.max_context, 0, self._timeout)

    async def session(self, session_id: str) -> AsyncSession:
        """A handle on an existing session, its length read from the server."""
        info = await self.get_session(session_id)
        return AsyncSession(self._stub, session_id, info.max_context, info.length, self._timeout)

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
    ) -> list[int]:
        """Chat messages through the model's chat template to token ids.
        ``chat_template_kwargs`` are extra template variables (``enable_thinking``);
        ``continue_final_message`` leaves the last (assistant) message open."""
        request = tokenize_chat_request(
            messages, add_generation_prompt, tools, chat_template_kwargs, continue_final_message
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
    ) -> Embeddings:
        """One vector per text (or token list): the final hidden state of the last
        token, or the mean over all tokens, optionally L2-normalised."""
        request = embed_request(texts, token_lists, pooling, normalize, add_special_tokens)
        return Embeddings.from_pb(await self._call("Embed", request))

    async def list_sessions(self) -> list[SessionInfo]:
        """Every live session."""
        response = await self._call("ListSessions", pb.ListSessionsRequest())
        return [SessionInfo.from_pb(info) for info in response.sessions]

    async def get_session(self, session_id: str) -> SessionInfo:
        """One session's length, residency and idle time."""
        response = await self._call("GetSession", pb.GetSessionRequest(session_id=session_id))
        return SessionInfo.from_pb(response.session)
