"""The gRPC server: the Salience servicer, health, reflection, graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from salience_client.pb import salience_pb2, salience_pb2_grpc
from salience_server.config import ServerConfig
from salience_server.engine.engine import Engine
from salience_server.engine.loader import LoadedModel, load_model
from salience_server.engine.readout import Readout, load_readout
from salience_server.metrics import Metrics
from salience_server.rpc.auth import BearerTokenInterceptor
from salience_server.rpc.compute_thread import in_own_thread
from salience_server.rpc.malformed import MalformedRequestInterceptor
from salience_server.rpc.metrics import RequestMetricsInterceptor
from salience_server.rpc.replica import ReplicaInterceptor
from salience_server.rpc.servicer import SalienceServicer
from salience_server.rpc.unexpected import UnexpectedErrorInterceptor

if TYPE_CHECKING:
    from salience_server.http.serving import ShimServer
from salience_server import stop_signals

log = logging.getLogger(__name__)

_FLUSH_S = 5.0
"""After the engine stops: how long the last events may take to reach the clients."""
PENDING_CALLS = 16_384
"""Calls that may wait for the event loop to take them up; past it gRPC refuses a share
of new calls, growing to all of them at half as many again. Its own defaults, 1,000 and
3,000, cancelled calls of a burst (CANCELLED, no reason: a shim's batch of 5,000 prompts
was a 503 "server unavailable") before the server's own admission could answer them."""


SALIENCE_SERVICE = salience_pb2.DESCRIPTOR.services_by_name["Salience"].full_name
"""``salience.v1.Salience``: its health is the server's."""


class SalienceServer:
    """Owns the grpc.aio server and the engine behind it."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        keepalive_ms = int(config.keepalive_s * 1000)
        options = [
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            # Sessions live in this process: a second server on the same port must fail
            # to bind, not share the port and split the clients between two servers.
            ("grpc.so_reuseport", 0),
            # Ping idle connections, so that a client that vanished without closing its
            # connection (a dead host, a cut network) is found and its work freed.
            ("grpc.keepalive_time_ms", keepalive_ms),
            ("grpc.keepalive_timeout_ms", min(keepalive_ms, 20_000)),
            ("grpc.http2.ping_timeout_ms", min(keepalive_ms, 20_000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            # gRPC spaces pings that no data answered by 5 minutes unless told otherwise.
            ("grpc.http2.min_time_between_pings_ms", keepalive_ms),
            # Clients may ping as often as every 10 s without being cut off.
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.server.max_pending_requests", PENDING_CALLS),
            ("grpc.server.max_pending_requests_hard_limit", PENDING_CALLS * 3 // 2),
        ]
        # The replica interceptor comes first, so that even a refused call names the replica.
        self._replica = ReplicaInterceptor(config.replica_id)
        self.metrics = Metrics()
        interceptors: list[grpc.aio.ServerInterceptor] = [
            self._replica,
            RequestMetricsInterceptor(self.metrics),
        ]
        if config.api_key:
            interceptors.append(BearerTokenInterceptor(config.api_key))
        # A call refused UNAUTHENTICATED is refused so whatever its bytes.
        interceptors.append(MalformedRequestInterceptor())
        # Innermost: every interceptor above sees INTERNAL, not UNKNOWN, for a handler's
        # unexpected exception.
        interceptors.append(UnexpectedErrorInterceptor())
        self.server = grpc.aio.server(options=options, interceptors=interceptors)
        self.servicer = SalienceServicer(config.stream_buffer_events, config.max_message_bytes)
        self.health = health.aio.HealthServicer()
        salience_pb2_grpc.add_SalienceServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        service_names = (
            SALIENCE_SERVICE,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(service_names, self.server)
        try:
            self.port = self.server.add_insecure_port(f"{config.host}:{config.port}")
        except RuntimeError as error:  # grpc's bind failure
            raise OSError(
                f"cannot listen on {config.host}:{config.port}: {_bind_failure(config.host)}"
            ) from error
        self.replica_id = config.replica_id or default_replica_id(config.host, self.port)
        """Sent as ``salience-replica`` initial metadata on every response."""
        self._replica.replica_id = self.replica_id
        self.engine: Engine | None = None

    async def start(self, loader: Callable[[], LoadedModel] | None = None) -> None:
        """Listens at once (health NOT_SERVING), loads the model, then serves.
        A model or readout file that fails to load stops the server again."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        log.info("listening on %s:%d; loading the model", self.config.host, self.port)
        try:
            self.engine = await in_own_thread(self._build_engine, loader)
        except BaseException:
            await self.server.stop(None)
            raise
        loop = asyncio.get_running_loop()
        self.engine.thread.on_death = lambda: self._call_soon(loop, self._not_serving)
        self.engine.start()
        self.servicer.engine = self.engine
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "serving %s on %s:%d as replica %s",
            self.engine.loaded.model_id,
            self.config.host,
            self.port,
            self.replica_id,
        )

    def _build_engine(self, loader: Callable[[], LoadedModel] | None) -> Engine:
        loaded = (loader or (lambda: load_model(self.config.model)))()
        return Engine(loaded, self.config.engine, self._load_readout(loaded), self.metrics)

    def _load_readout(self, loaded: LoadedModel) -> Readout | None:
        if not self.config.readout_path:
            return None
        text_config = loaded.model.config.get_text_config()
        readout = load_readout(
            self.config.readout_path, text_config.num_hidden_layers, text_config.hidden_size
        )
        log.info("readout: %d concepts at layers %s", len(readout.concepts), readout.layers)
        return readout

    @staticmethod
    def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        loop.call_soon_threadsafe(callback)

    def _not_serving(self) -> None:
        """The engine thread died: health says so (calls get UNAVAILABLE already)."""
        asyncio.ensure_future(self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING))

    async def _set_health(self, status: int) -> None:
        """The server's health, and the Salience service's by name (probes ask either)."""
        for service in ("", SALIENCE_SERVICE):
            await self.health.set(service, status)

    async def stop_now(self) -> None:
        """Ends the drain at once: the calls still in flight get UNAVAILABLE."""
        if self.engine is not None:
            log.info("stopping at once")
            await asyncio.to_thread(self.engine.stop)

    async def stop(self, grace_s: float | None = None) -> None:
        """Drains (SPEC 2.6): health turns NOT_SERVING and new calls get UNAVAILABLE,
        while the calls in flight run to their end for up to ``grace_s`` (default: the
        configured grace); what is left then ends UNAVAILABLE."""
        grace_s = self.config.grace_s if grace_s is None else grace_s
        await self.health.enter_graceful_shutdown()
        if self.engine is not None:
            log.info("draining: calls in flight may run for up to %.0f s", grace_s)
            left = await asyncio.to_thread(self.engine.drain, grace_s)
            if left:
                log.warning(
                    "the grace period ended with %d call%s in flight; they end UNAVAILABLE",
                    left,
                    "" if left == 1 else "s",
                )
            await asyncio.to_thread(self.engine.stop)
        await self.server.stop(_FLUSH_S)


def default_replica_id(host: str, port: int) -> str:
    """``host:port``; the machine's name stands for a wildcard host."""
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = socket.gethostname()
    return f"{host}:{port}"


async def serve(config: ServerConfig) -> bool:
    """Runs the server until SIGTERM, SIGINT or SIGHUP; with ``http_port``, the OpenAI
    shim too, in this event loop, as a gRPC client of this server's own address. Metrics are served
    at the shim's ``/metrics`` and on ``metrics_port``, each where given. False when the
    signal came before the model finished loading: its thread is still inside torch,
    and the process must end without the interpreter's clean-up (``os._exit``), which
    would abort it there."""
    server = SalienceServer(config)
    shim = None
    if config.http_port:
        from salience_server.http.serving import shim_beside

        shim = shim_beside(
            config.host,
            server.port,
            config.http_port,
            config.allow_remote_images,
            config.api_key,
            server.metrics.registry,
            config.grace_s,
            config.cors_origins,
        )  # a taken port fails now
    metrics_server = None
    if config.metrics_port:
        try:
            metrics_server, _ = start_http_server(
                config.metrics_port, config.host, server.metrics.registry
            )
        except OSError as error:
            raise OSError(
                f"cannot serve metrics on {config.host}:{config.metrics_port}: {error}"
            ) from error
    stopping = asyncio.Event()

    def on_stop_signal() -> None:
        """The first signal drains; any later one ends the calls in flight at once (the
        grace is for calls, not for an operator's patience). One handler for both: a
        second signal that came while the loop was busy is handled in the same turn as
        the first, before a handler installed on the first could take it."""
        if stopping.is_set():
            asyncio.ensure_future(server.stop_now())
        else:
            stopping.set()

    try:
        with stop_signals.handled_in(asyncio.get_running_loop(), on_stop_signal):
            return await _serve_until_stopped(server, shim, stopping)
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()


async def _serve_until_stopped(
    server: SalienceServer, shim: ShimServer | None, stopping: asyncio.Event
) -> bool:
    """Starts ``server`` (and ``shim``), and drains them once ``stopping`` is set; False
    when it was set before the model finished loading."""
    if shim is not None:
        shim.start()  # answers at once: /health is 503 until the model is loaded
    try:
        started = await _started_unless_stopped(server, stopping)
    except BaseException:  # the model failed to load: the shim goes quietly with it
        if shim is not None:
            await shim.stop()
        raise
    if not started:
        log.info("stopping before the model finished loading")
        if shim is not None:
            await shim.stop()  # its requests get 503 at once while the model loads
        return False
    await stopping.wait()
    log.info("stopping; a second signal ends the calls in flight at once")
    if shim is not None:
        shim.request_stop()  # no new HTTP requests; open ones end with their calls
    await server.stop()  # the shim's calls in flight drain with the others
    if shim is not None:
        await shim.stop()
    log.info("stopped")
    return True


async def _started_unless_stopped(server: SalienceServer, stopping: asyncio.Event) -> bool:
    """Starts ``server``; False, with the start abandoned, when ``stopping`` is set
    first: a signal during a long load or conversion ends the process at once (the
    loading thread is a daemon, and a conversion only ever renames a finished cache)."""
    starting = asyncio.ensure_future(server.start())
    stop_requested = asyncio.ensure_future(stopping.wait())
    await asyncio.wait({starting, stop_requested}, return_when=asyncio.FIRST_COMPLETED)
    stop_requested.cancel()
    if starting.done():
        starting.result()  # a model that failed to load raises here
        return True
    starting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await starting  # start() stops listening as it is cancelled
    return False


def _bind_failure(host: str) -> str:
    """Why binding ``host`` failed, as far as can be told: a name that does not resolve
    (``999.1.1.1``, a typo) said "in use?" as a port taken does."""
    if host in ("", "0.0.0.0", "::", "[::]"):  # every interface
        return "the port is in use"
    try:
        socket.getaddrinfo(host.strip("[]"), None)
    except (OSError, UnicodeError):
        return f"the host {host!r} does not resolve to an address of this machine"
    return "the port is in use, or the address is not this machine's"
