"""``Backend``: what every route shares: the gRPC client, the session pool, the token-text
cache, the response store, and the served model's description."""

from __future__ import annotations

import time
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from salience_client import AsyncSalienceClient, ModelInfo
from salience_server.http.config import ShimConfig
from salience_server.http.errors import ApiError, client_errors, invalid, model_not_found
from salience_server.http.logprobs import TokenTexts
from salience_server.http.messages import (
    ImageInput,
    template_messages,
    template_supports_tools,
)
from salience_server.http.response_store import ResponseStore
from salience_server.http.sessions_pool import SessionPool

HEALTH_TIMEOUT_S = 2.0


class Backend:
    """The shim's view of one Salience server."""

    def __init__(self, config: ShimConfig) -> None:
        self.config = config
        self.client = AsyncSalienceClient(config.target, timeout=config.rpc_timeout_s)
        self.pool = SessionPool(self.client, config.max_pooled_sessions)
        self.token_texts = TokenTexts(self.client)
        self.responses = ResponseStore(config.max_stored_responses)
        self.created = int(time.time())
        self._model_info: ModelInfo | None = None
        # A channel of its own, so that /health works whatever the client is doing.
        self._health_channel = grpc.aio.insecure_channel(config.target)

    async def close(self) -> None:
        """Closes the pooled sessions and the channels."""
        await self.pool.close()
        await self.client.close()
        await self._health_channel.close()

    async def model_info(self) -> ModelInfo:
        """The served model (asked once, then cached)."""
        if self._model_info is None:
            with client_errors():
                self._model_info = await self.client.model_info()
        return self._model_info

    def model_names(self, info: ModelInfo) -> list[str]:
        """Names the ``model`` field may use."""
        return [info.model_id, *self.config.served_model_names]

    async def check_model(self, name: str) -> ModelInfo:
        """The model info, or 404 if ``name`` is not the served model."""
        info = await self.model_info()
        if name not in self.model_names(info):
            raise model_not_found(name)
        return info

    async def is_serving(self) -> bool:
        """Whether the gRPC server's health service says SERVING."""
        stub = health_pb2_grpc.HealthStub(self._health_channel)
        try:
            response = await stub.Check(
                health_pb2.HealthCheckRequest(service=""), timeout=HEALTH_TIMEOUT_S
            )
        except grpc.RpcError:
            return False
        return bool(response.status == health_pb2.HealthCheckResponse.SERVING)

    async def render_chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], param: str
    ) -> list[int]:
        """Chat messages through the model's chat template, ending with the assistant
        turn's opening, as token ids."""
        info = await self.model_info()
        has_tool_template = template_supports_tools(info.chat_template)
        rendered = template_messages(messages, tools, has_tool_template)
        with client_errors(param):
            return await self.client.tokenize_chat(
                rendered, add_generation_prompt=True, tools=tools if has_tool_template else None
            )

    async def tokenize(self, text: str, param: str, add_special_tokens: bool = False) -> list[int]:
        """Text to token ids (errors name ``param``)."""
        if not text:
            return []
        with client_errors(param):
            return await self.client.tokenize(text, add_special_tokens=add_special_tokens)

    async def detokenize(self, token_ids: list[int], param: str) -> str:
        """Token ids to text (errors name ``param``)."""
        with client_errors(param):
            return await self.client.detokenize(token_ids)

    async def check_images(self, images: list[ImageInput], param: str) -> None:
        """Images need a model that takes them (the server answers IMAGES_UNSUPPORTED
        otherwise); asked up front so that no session is touched."""
        if not images:
            return
        info = await self.model_info()
        if not info.supports_images:
            raise invalid(
                f"The model {info.model_id!r} does not take images", param, "images_unsupported"
            )
        # The server cannot take images yet; when it can, Prompt segments become
        # AppendImage calls at the image parts' places (see messages.ImageInput).
        raise ApiError(501, "image input is not wired into the shim yet", "server_error")
