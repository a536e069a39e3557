"""``create_app``: the FastAPI application of the shim."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from salience_client.auth import is_bearer
from salience_server.http import chat, completions, embeddings, info, responses, tokenization
from salience_server.http.backend import Backend
from salience_server.http.config import ShimConfig
from salience_server.http.errors import (
    ApiError,
    handle_api_error,
    handle_http_exception,
    handle_unexpected,
)
from salience_server.http.server_health import watch_health

OPEN_PATHS = frozenset({"/health", "/metrics"})
"""Paths that never need the API key."""


def create_app(config: ShimConfig, metrics_registry: CollectorRegistry | None = None) -> FastAPI:
    """The shim for the Salience server at ``config.target``. The gRPC channel opens when
    the app starts (in the event loop that serves it). ``GET /metrics`` serves
    ``metrics_registry`` (the server's, beside it), else this process's own."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        """Opens the Backend in the serving loop, watching the server's health; closes its
        sessions and channels."""
        app.state.backend = backend = Backend(config)
        watch = None
        if config.watch_interval_s:
            watch = asyncio.get_running_loop().create_task(
                watch_health(backend.health_channel, config.target, config.watch_interval_s)
            )
        try:
            yield
        finally:
            if watch is not None:
                watch.cancel()
            await backend.close()

    app = FastAPI(title="Salience OpenAI shim", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.config = config
    for module in (chat, completions, responses, embeddings, tokenization, info):
        app.include_router(module.router)
    registry = metrics_registry or REGISTRY

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        """Prometheus metrics (text exposition format)."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.add_exception_handler(ApiError, handle_api_error)
    app.add_exception_handler(HTTPException, handle_http_exception)
    app.add_exception_handler(Exception, handle_unexpected)
    if config.api_key:
        app.add_middleware(BearerAuth, api_key=config.api_key)
    if config.cors_origins:  # outermost: a browser's preflight carries no API key
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_origins),
            allow_methods=["*"],
            allow_headers=["*"],
        )
    return app


class BearerAuth:
    """ASGI middleware: 401 unless ``Authorization: Bearer <api_key>`` (except OPEN_PATHS).

    Plain ASGI rather than BaseHTTPMiddleware, so that streams and disconnects pass
    through untouched."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        if is_bearer(given, self._key):
            await self.app(scope, receive, send)
            return
        error = ApiError(
            401,
            "Incorrect or missing API key (send Authorization: Bearer <key>)",
            "invalid_request_error",  # OpenAI's type for a 401
            code="invalid_api_key",
        )
        await error.response()(scope, receive, send)
