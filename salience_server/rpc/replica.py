"""Names the replica in the initial metadata of every response (SPEC 2.7).

Behind a proxy, a client learns from ``salience-replica`` which server answered it; the
tests and the logs use it to tell the replicas apart.
"""

from __future__ import annotations

from typing import Any

import grpc

from salience_server.rpc.handlers import HandlerInterceptor, with_prelude

REPLICA_METADATA = "salience-replica"


class ReplicaInterceptor(HandlerInterceptor):
    """Sends ``salience-replica: <replica_id>`` before anything else, on every call
    (health, reflection and refused calls included)."""

    def __init__(self, replica_id: str = "") -> None:
        self.replica_id = replica_id
        """Set by the server once its port is bound (the default id is host:port)."""

    def handler(
        self, handler: grpc.RpcMethodHandler, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        metadata = ((REPLICA_METADATA, self.replica_id),)

        async def send_name(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.send_initial_metadata(metadata)

        return with_prelude(handler, send_name)
