"""The shim's configuration: one frozen dataclass, checked on creation."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from salience_server.config import check_api_key, check_cors_origins

API_KEY_ENV = "SALIENCE_API_KEY"
"""Environment variable read for the bearer token when none is given on the command line."""


@dataclass(frozen=True)
class ShimConfig:
    """What the OpenAI shim needs: where the gRPC server is and how to serve HTTP."""

    target: str = "127.0.0.1:50051"
    """``host:port`` of the Salience gRPC server."""
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    """Bearer token every /v1 route requires; None leaves the shim open. /health is always open."""
    served_model_names: tuple[str, ...] = ()
    """Extra names the ``model`` field may use besides the server's model id."""
    max_pooled_sessions: int = 32
    """Idle server sessions kept for prefix reuse; more are closed, least recently used first."""
    max_stored_responses: int = 1024
    """Responses kept for ``previous_response_id``; older ones are forgotten (404)."""
    max_stored_image_bytes: int = 256 << 20
    """Bytes of images those responses may keep (older ones are forgotten first)."""
    max_stored_tokens: int = 4 << 20
    """Token ids those responses may keep, each its whole conversation's (older ones are
    forgotten first): about 36 bytes each in the shim's memory."""
    rpc_timeout_s: float = 30.0
    """Bound on every unary gRPC call (streams are not bounded)."""
    log_level: str = "info"
    """uvicorn's (its start, stop and access log); empty: the process's own."""
    allow_remote_images: bool = False
    """Fetch http(s) image URLs; otherwise only data: URLs are accepted (400)."""
    cors_origins: tuple[str, ...] = ()
    """Origins (``https://app.example``, or ``*`` for any) whose pages a browser lets call
    the shim (CORS); none: no CORS headers, so browsers refuse cross-origin calls."""
    max_image_bytes: int = 20 << 20
    """Largest remote image fetched."""
    keepalive_s: float = 15.0
    """A stream that has sent nothing for this long sends an SSE comment (``: keep-alive``);
    it is also how long a streaming request waits for its first event before its
    response starts (later errors come as error events). 0: no keep-alives."""
    replay: bool = True
    """Re-create pooled sessions lost with their replica by replaying their tokens, and
    resume broken streams (SPEC 2.7); off, such failures reach the HTTP client."""
    retry_budget_s: float = 10.0
    """How long a call keeps retrying while no server answers (a proxy moving the session
    to another replica). The shim beside its own server takes 0: there is no other."""
    grace_s: float = 30.0
    """On stop, how long open requests may run on; then the shim ends them (a streaming
    one with an error event and ``[DONE]``, as any error after its start)."""
    watch_interval_s: float = 5.0
    """How often the shim asks the server's health, logging each change (cannot be
    reached, not serving, serving). 0: never (the shim beside its own server, which logs
    its own state)."""

    @property
    def graceful_shutdown_s(self) -> float:
        """How long uvicorn lets requests run after a stop: the grace, then the last
        events written."""
        return self.grace_s + 2.0

    def __post_init__(self) -> None:
        if not self.target:
            raise ValueError("target must be host:port of a Salience server")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port {self.port} is out of range")
        if self.max_stored_image_bytes < 0 or self.max_stored_tokens < 0:
            raise ValueError("max_stored_image_bytes and max_stored_tokens must not be negative")
        if self.max_pooled_sessions < 1 or self.max_stored_responses < 0:
            raise ValueError("max_pooled_sessions must be positive, max_stored_responses >= 0")
        if self.rpc_timeout_s <= 0:
            raise ValueError("rpc_timeout_s must be positive")
        if not (math.isfinite(self.retry_budget_s) and self.retry_budget_s >= 0):
            raise ValueError("retry_budget_s must be a number >= 0")
        if not (math.isfinite(self.grace_s) and self.grace_s >= 0):
            raise ValueError("grace_s must be a number of seconds >= 0")
        if not (math.isfinite(self.keepalive_s) and self.keepalive_s >= 0):
            raise ValueError("keepalive_s must be 0 (off) or a positive number of seconds")
        if not (math.isfinite(self.watch_interval_s) and self.watch_interval_s >= 0):
            raise ValueError("watch_interval_s must be 0 (off) or a positive number of seconds")
        check_cors_origins(self.cors_origins)
        check_api_key(self.api_key)


def api_key_from_env() -> str | None:
    """The bearer token in ``$SALIENCE_API_KEY``, or None when unset or empty."""
    return os.environ.get(API_KEY_ENV) or None
