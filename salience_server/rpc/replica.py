"""Names the replica in the initial metadata of every response (SPEC 2.7).

Behind a proxy, a client learns from ``salience-replica`` which server answered it; the
tests and the logs use it to tell the replicas apart.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from salience_server.rpc.handlers import with_prelude

REPLICA_METADATA = "salience-replica"


class ReplicaInterceptor(grpc.aio.ServerInterceptor):
    """Sends ``salience-replica: <replica_id>`` before anything else, on every call
    (health, reflection and refused calls included)."""

    def __init__(self, replica_id: str = "") -> None:
        self.replica_id = replica_id
        """Set by the server once its port is bound (the default id is host:port)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        metadata = ((REPLICA_METADATA, self.replica_id),)

        async def send_name(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.send_initial_metadata(metadata)

        return with_prelude(handler, send_name)
