"""The gRPC server: the Salience servicer, health, reflection, graceful stop."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from salience_client.pb import salience_pb2, salience_pb2_grpc
from salience_server.config import ServerConfig
from salience_server.engine.engine import Engine
from salience_server.engine.loader import LoadedModel, load_model
from salience_server.engine.readout import Readout, load_readout
from salience_server.rpc.auth import BearerTokenInterceptor
from salience_server.rpc.replica import ReplicaInterceptor
from salience_server.rpc.servicer import SalienceServicer

log = logging.getLogger(__name__)

_STOP_GRACE_S = 5.0


class SalienceServer:
    """Owns the grpc.aio server and the engine behind it."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        options = [
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            # Sessions live in this process: a second server on the same port must fail
            # to bind, not share the port and split the clients between two servers.
            ("grpc.so_reuseport", 0),
        ]
        # The replica interceptor comes first, so that even a refused call names the replica.
        self._replica = ReplicaInterceptor(config.replica_id)
        interceptors: list[grpc.aio.ServerInterceptor] = [self._replica]
        if config.api_key:
            interceptors.append(BearerTokenInterceptor(config.api_key))
        self.server = grpc.aio.server(options=options, interceptors=interceptors)
        self.servicer = SalienceServicer()
        self.health = health.aio.HealthServicer()
        salience_pb2_grpc.add_SalienceServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        service_names = (
            salience_pb2.DESCRIPTOR.services_by_name["Salience"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(service_names, self.server)
        try:
            self.port = self.server.add_insecure_port(f"{config.host}:{config.port}")
        except RuntimeError as error:  # grpc's bind failure
            raise OSError(f"cannot listen on {config.host}:{config.port} (in use?)") from error
        self.replica_id = config.replica_id or default_replica_id(config.host, self.port)
        """Sent as ``salience-replica`` initial metadata on every response."""
        self._replica.replica_id = self.replica_id
        self.engine: Engine | None = None

    async def start(self, loader: Callable[[], LoadedModel] | None = None) -> None:
        """Listens at once (health NOT_SERVING), loads the model, then serves.
        A model or readout file that fails to load stops the server again."""
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        log.info("listening on %s:%d; loading the model", self.config.host, self.port)
        try:
            loaded = await asyncio.to_thread(loader or (lambda: load_model(self.config.model)))
            readout = self._load_readout(loaded)
            self.engine = await asyncio.to_thread(Engine, loaded, self.config.engine, readout)
        except BaseException:
            await self.server.stop(None)
            raise
        self.engine.start()
        self.servicer.engine = self.engine
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "serving %s on %s:%d as replica %s",
            loaded.model_id,
            self.config.host,
            self.port,
            self.replica_id,
        )

    def _load_readout(self, loaded: LoadedModel) -> Readout | None:
        if not self.config.readout_path:
            return None
        text_config = loaded.model.config.get_text_config()
        readout = load_readout(
            self.config.readout_path, text_config.num_hidden_layers, text_config.hidden_size
        )
        log.info("readout: %d concepts at layers %s", len(readout.concepts), readout.layers)
        return readout

    async def stop(self) -> None:
        """Refuses new work, fails what is pending with UNAVAILABLE, then stops."""
        await self.health.enter_graceful_shutdown()
        if self.engine is not None:
            await asyncio.to_thread(self.engine.stop)
        await self.server.stop(_STOP_GRACE_S)


def default_replica_id(host: str, port: int) -> str:
    """``host:port``; the machine's name stands for a wildcard host."""
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = socket.gethostname()
    return f"{host}:{port}"


async def serve(config: ServerConfig) -> None:
    """Runs the server until SIGTERM or SIGINT; with ``http_port``, the OpenAI shim too, in
    this event loop, as a gRPC client of this server's own address."""
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
        )  # a taken port fails now
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await server.start()
    if shim is not None:
        shim.start()
    await stopping.wait()
    log.info("stopping")
    if shim is not None:
        await shim.stop()
    await server.stop()
