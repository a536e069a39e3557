"""The gRPC server: the Salience servicer, health, reflection, graceful stop."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from salience_client.pb import salience_pb2, salience_pb2_grpc
from salience_server.config import ServerConfig
from salience_server.engine.engine import Engine
from salience_server.engine.loader import LoadedModel, load_model
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
        ]
        self.server = grpc.aio.server(options=options)
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
        self.port = self.server.add_insecure_port(f"{config.host}:{config.port}")
        if self.port == 0:
            raise OSError(f"cannot listen on {config.host}:{config.port}")
        self.engine: Engine | None = None

    async def start(self, loader: Callable[[], LoadedModel] | None = None) -> None:
        """Listens at once (health NOT_SERVING), loads the model, then serves."""
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        log.info("listening on %s:%d; loading the model", self.config.host, self.port)
        loaded = await asyncio.to_thread(loader or (lambda: load_model(self.config.model)))
        self.engine = await asyncio.to_thread(Engine, loaded, self.config.engine)
        self.engine.start()
        self.servicer.engine = self.engine
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s on %s:%d", loaded.model_id, self.config.host, self.port)

    async def stop(self) -> None:
        """Refuses new work, fails what is pending with UNAVAILABLE, then stops."""
        await self.health.enter_graceful_shutdown()
        if self.engine is not None:
            await asyncio.to_thread(self.engine.stop)
        await self.server.stop(_STOP_GRACE_S)


async def serve(config: ServerConfig) -> None:
    """Runs the server until SIGTERM or SIGINT."""
    server = SalienceServer(config)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await server.start()
    await stopping.wait()
    log.info("stopping")
    await server.stop()
