"""The gRPC server's health as the shim sees it, and the shim alone's watch on it: its
operator learns from the log that the server cannot be reached (a wrong ``--target``,
the server down) or is not serving, and when it serves again. Every request meanwhile
is a 503, which the log alone did not explain."""

from __future__ import annotations

import asyncio
import enum
import logging
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

log = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 2.0


class Health(enum.Enum):
    SERVING = "serving"
    NOT_SERVING = "not serving"
    """Loading its model, draining, or its engine failed."""
    UNREACHABLE = "unreachable"


@dataclass(frozen=True)
class ServerHealth:
    health: Health
    detail: str = ""
    """Why the server could not be reached (gRPC's words)."""


async def check_health(channel: grpc.aio.Channel) -> ServerHealth:
    """The server's answer to a health check on ``channel``."""
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        response = await stub.Check(
            health_pb2.HealthCheckRequest(service=""), timeout=HEALTH_TIMEOUT_S
        )
    except grpc.RpcError as error:
        if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return ServerHealth(Health.UNREACHABLE, error.details() or error.code().name)
        return ServerHealth(Health.NOT_SERVING)  # it answered, though not with a health
    if response.status == health_pb2.HealthCheckResponse.SERVING:
        return ServerHealth(Health.SERVING)
    return ServerHealth(Health.NOT_SERVING)


async def watch_health(channel: grpc.aio.Channel, target: str, interval_s: float) -> None:
    """Asks the server at ``target`` its health every ``interval_s`` seconds and logs
    each change (the first answer too): a warning while it cannot serve, a line when it
    serves. Runs until cancelled."""
    last: Health | None = None
    while True:
        state = await check_health(channel)
        if state.health != last:
            _log_change(state, target, is_first=last is None)
            last = state.health
        await asyncio.sleep(interval_s)


def _log_change(state: ServerHealth, target: str, is_first: bool) -> None:
    if state.health == Health.SERVING:
        log.info("the Salience server at %s is serving", target)
    elif state.health == Health.NOT_SERVING:
        log.warning(
            "the Salience server at %s is not serving (loading its model, draining, or its "
            "engine failed); requests get 503 until it serves",
            target,
        )
    else:
        log.warning(
            "cannot reach the Salience server at %s (%s); requests get 503 until it answers%s",
            target,
            state.detail,
            " (is --target right?)" if is_first else "",
        )
