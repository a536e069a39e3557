"""Adds ``authorization: Bearer <key>`` metadata to every call of a channel; and the
check the server and the shim make of it."""

from __future__ import annotations

import hmac
from typing import Any

import grpc


def is_bearer(given: bytes, key: bytes) -> bool:
    """Whether an authorization value is ``Bearer <key>``: the scheme in any case (HTTP's
    schemes are case-insensitive), the key compared in constant time."""
    scheme, _, token = given.strip().partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key)


def _with_key(details: Any, key: str, details_class: Any) -> Any:
    metadata = list(details.metadata or []) + [("authorization", f"Bearer {key}")]
    return details_class(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class _SyncDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready) -> None:  # type: ignore[no-untyped-def]
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready = credentials, wait_for_ready
        self.compression = None


class BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """For ``grpc.intercept_channel``."""

    def __init__(self, key: str) -> None:
        self._key = key

    def intercept_unary_unary(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        return continuation(_with_key(client_call_details, self._key, _SyncDetails), request)

    def intercept_unary_stream(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        return continuation(_with_key(client_call_details, self._key, _SyncDetails), request)


class _AsyncKey:
    def __init__(self, key: str) -> None:
        self._key = key

    def _details(self, details: Any) -> Any:
        return _with_key(details, self._key, grpc.aio.ClientCallDetails)


class _AsyncUnaryUnary(_AsyncKey, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        return await continuation(self._details(client_call_details), request)


class _AsyncUnaryStream(_AsyncKey, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        return await continuation(self._details(client_call_details), request)


def async_bearer_token(key: str) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors for ``grpc.aio.insecure_channel(..., interceptors=...)`` (grpc.aio
    files each interceptor under one kind only, so each kind gets its own)."""
    return [_AsyncUnaryUnary(key), _AsyncUnaryStream(key)]
