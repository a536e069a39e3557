"""The OpenAI-compatible HTTP shim: Chat Completions, Completions and Responses over
Salience sessions.

It is a gRPC client of the server (through ``salience_client``), never an import of the
engine, so it works against a server on another host given only its address. Layout:
``app`` (the FastAPI app), ``chat``, ``completions``, ``responses``, ``tokenization``
(the endpoints), ``info`` (models, health, readout manifest), ``generation`` (one prompt
decoded into n choices), ``sessions_pool`` (prefix reuse), ``response_store``,
``reply`` / ``reasoning`` / ``tool_parser`` / ``response_stream`` (a reply as it
streams), ``constraints`` (structured output), ``messages``, ``tools``, ``logprobs``,
``streaming``, ``errors``, ``schemas``, ``config``, ``serving``.
"""

from salience_server.http.app import create_app
from salience_server.http.config import ShimConfig

__all__ = ["ShimConfig", "create_app"]
