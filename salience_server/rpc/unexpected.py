"""A call whose handler raised an exception nothing expected ends INTERNAL
(``INTERNAL_ERROR``, naming the exception), logged with its traceback.

Left alone, grpc's asyncio server ends such a call UNKNOWN with "Unexpected <class
...>": a status clients cannot act on, and for bad input one SPEC 2.5 rules out (a bug
that lets some input through to an exception is still the server's fault, so INTERNAL).
The call's own endings (``context.abort``, a cancellation) pass through untouched, and
so does a write to a call whose client has gone (``client_gone_is_cancelled``).

A streaming handler's responses are written here (``context.write``), not yielded to
gRPC: a write that fails because the client has just gone then fails inside the call,
where it ends cancelled. Yielded, each was written by gRPC's own loop, which logs such a
failure at ERROR ("ExecuteBatchError raised in core") when the core has not yet told the
server that the client left; and the handler, left suspended at its ``yield``, was only
closed when the garbage collector came to it. Every interceptor outside this one sees a
coroutine that writes.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from typing import Any

import grpc

from salience_server.engine.errors import Code, SalienceError
from salience_server.rpc.errors import abort, client_gone_is_cancelled
from salience_server.rpc.handlers import HandlerInterceptor, rewrapped

log = logging.getLogger(__name__)


class UnexpectedErrorInterceptor(HandlerInterceptor):
    def handler(
        self, handler: grpc.RpcMethodHandler, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        method = str(handler_call_details.method)
        return rewrapped(handler, lambda behavior: _guarded(behavior, method))


def _guarded(behavior: Any, method: str) -> Any:
    """The behavior, of the same kind, ending INTERNAL where it raised unexpectedly."""
    if inspect.isasyncgenfunction(behavior):

        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> None:
            try:
                with client_gone_is_cancelled():
                    async with contextlib.aclosing(behavior(request, context)) as responses:
                        async for response in responses:
                            await context.write(response)
            except grpc.aio.AbortError:
                raise
            except Exception as error:
                await _end(context, method, error)

        return streaming

    async def returning(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            with client_gone_is_cancelled():
                return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            await _end(context, method, error)

    return returning


async def _end(context: grpc.aio.ServicerContext, method: str, error: Exception) -> None:
    log.error("%s failed unexpectedly", method, exc_info=error)
    message = f"{method} failed: {type(error).__name__}: {error}"
    await abort(context, SalienceError(Code.INTERNAL, "INTERNAL_ERROR", message))
