"""Running the shim under uvicorn: alone (``salience-shim``) or beside the gRPC server
(``salience-server --http-port``), in the same event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
from collections.abc import Iterator

import uvicorn
from prometheus_client import CollectorRegistry

from salience_server.http.app import create_app
from salience_server.http.config import ShimConfig, api_key_from_env
from salience_server.http.connections import HeadersInTime
from salience_server.http.errors import LoggedOnce

log = logging.getLogger(__name__)

STOP_POLL_S = 0.1
"""How often a stop is looked for (as uvicorn looks for it)."""


PROBE_PATHS = frozenset({"/health", "/metrics"})


class _NoProbes(logging.Filter):
    """Leaves health checks and metrics scrapes out of the access log: probes every few
    seconds (dozens while the model loads) buried the requests among them."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        return not (isinstance(args, tuple) and len(args) > 2 and args[2] in PROBE_PATHS)


def _quiet_probes() -> None:
    """Leaves probes out of the access log, and tracebacks logged already out of
    uvicorn's error log."""
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, _NoProbes) for f in access.filters):
        access.addFilter(_NoProbes())
    errors = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, LoggedOnce) for f in errors.filters):
        errors.addFilter(LoggedOnce())


class _HostedServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to the program hosting it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Leaves the process's signal handlers alone."""
        yield


def local_target(host: str, port: int) -> str:
    """``host:port`` that reaches a server listening on ``host`` from this machine."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ShimServer:
    """The shim's HTTP server, its socket bound at construction (so that a taken port
    fails at once, with the port in the message)."""

    def __init__(
        self, config: ShimConfig, metrics_registry: CollectorRegistry | None = None
    ) -> None:
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        try:
            self.socket = socket.create_server((config.host, config.port), family=family)
        except OSError as error:
            raise OSError(f"cannot listen on {config.host}:{config.port}: {error}") from error
        self.host = config.host
        self._grace_s = config.grace_s
        self._is_ending_calls = False
        self.port: int = self.socket.getsockname()[1]
        self._task: asyncio.Task[None] | None = None
        self._app = create_app(config, metrics_registry)
        uvicorn_config = uvicorn.Config(
            self._app,
            http=HeadersInTime,
            # uvicorn's records go to the program's handlers, in its format (its own
            # wrote "INFO:     ..." without the time, at INFO whatever the level).
            log_config=None,
            log_level=config.log_level.lower() or None,
            timeout_graceful_shutdown=math.ceil(config.graceful_shutdown_s),
        )
        self.server = _HostedServer(uvicorn_config)
        _quiet_probes()

    async def serve(self) -> None:
        """Serves until ``stop``."""
        ending = asyncio.get_running_loop().create_task(self._end_calls_after_grace())
        try:
            await self.server.serve(sockets=[self.socket])
        finally:
            if self._is_ending_calls:  # uvicorn is done once the calls it ends are
                await ending  # the pool's sessions are still being closed
            else:
                ending.cancel()
            self.socket.close()

    async def _end_calls_after_grace(self) -> None:
        """Once a stop is asked for and the grace has passed, closes the gRPC client: the
        calls still open fail, and their requests end with an error (a stream with an
        error event and ``[DONE]``) before uvicorn cuts their connections (a stream
        just stopped, and a traceback was logged)."""
        while not self.server.should_exit:
            await asyncio.sleep(STOP_POLL_S)
        await asyncio.sleep(self._grace_s)
        self._is_ending_calls = True
        backend = getattr(self._app.state, "backend", None)
        if backend is not None:  # None: stopped before it started
            await backend.end_calls()

    def start(self) -> None:
        """Serves in a task of the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self.serve())
        log.info("OpenAI shim on http://%s/v1", local_target(self.host, self.port))

    def request_stop(self) -> None:
        """Asks the server to stop (safe from a signal handler)."""
        self.server.should_exit = True

    async def stop(self) -> None:
        """Stops serving; open requests may finish within the grace."""
        self.request_stop()
        if self._task is not None:
            await self._task


def shim_beside(
    host: str,
    grpc_port: int,
    http_port: int,
    allow_remote_images: bool = False,
    api_key: str | None = None,
    metrics_registry: CollectorRegistry | None = None,
    grace_s: float = 30.0,
    cors_origins: tuple[str, ...] = (),
) -> ShimServer:
    """The shim of ``salience-server --http-port``: on ``host:http_port``, a client of the
    gRPC server on ``host:grpc_port``. The API key (given, else ``$SALIENCE_API_KEY``)
    guards the HTTP routes and is sent to the gRPC server. ``/metrics`` serves
    ``metrics_registry`` (the server's). On stop, its open requests run on while the
    server's calls drain (``grace_s``), and end with the server's UNAVAILABLE (503, or an
    error event) when the grace runs out: its one server has no other replica to retry."""
    config = ShimConfig(
        target=local_target(host, grpc_port),
        host=host,
        port=http_port,
        api_key=api_key or api_key_from_env(),
        allow_remote_images=allow_remote_images,
        cors_origins=cors_origins,
        retry_budget_s=0.0,
        grace_s=grace_s,
        log_level="",  # the server's (--log-level)
        watch_interval_s=0.0,
    )
    return ShimServer(config, metrics_registry)
