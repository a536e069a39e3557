"""Python clients of the Salience session-inference server.

``SalienceClient`` (sync) and ``AsyncSalienceClient`` (asyncio) each hold one channel
that every session and call shares. Sessions track their committed length and send
``offset`` themselves; every value returned is a plain dataclass, never a protobuf.
Behind a proxy with several replicas, a session survives the loss of its replica
(``Failover``, SPEC 2.7).
"""

from salience_client.aio import AsyncSalienceClient, AsyncSession
from salience_client.client import DEFAULT_TARGET, SalienceClient
from salience_client.failover import Failover, FailoverStats
from salience_client.generation import END, GenerateOptions
from salience_client.session import Session
from salience_client.streams import AsyncGenerateStream, GenerateStream
from salience_client.types import (
    Done,
    Embeddings,
    ModelInfo,
    ReadoutManifest,
    ReadoutValues,
    SalienceClientError,
    SessionInfo,
    TokenEvent,
)

__all__ = [
    "DEFAULT_TARGET",
    "END",
    "AsyncGenerateStream",
    "AsyncSalienceClient",
    "AsyncSession",
    "Done",
    "Embeddings",
    "Failover",
    "FailoverStats",
    "GenerateOptions",
    "GenerateStream",
    "ModelInfo",
    "ReadoutManifest",
    "ReadoutValues",
    "SalienceClient",
    "SalienceClientError",
    "Session",
    "SessionInfo",
    "TokenEvent",
]
