"""Running the OpenAI shim in tests, and a scripted gRPC server for what a model cannot be
relied on to do (call tools, fail halfway).

``start_shim`` serves the real shim app with uvicorn on a free loopback port in a
background thread; tests drive it with the official ``openai`` SDK. ``start_scripted``
serves a fake ``salience.v1.Salience`` whose Generate streams a given text, one token
per character, so the whole HTTP path runs on output chosen by the test.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
import openai
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from salience_client import SalienceClient
from salience_client.pb import salience_pb2 as pb
from salience_client.pb import salience_pb2_grpc
from salience_server.http.config import ShimConfig
from salience_server.http.serving import ShimServer

HELLO = [{"role": "user", "content": "Hello"}]


def error_body(response: httpx.Response) -> dict[str, Any]:
    """An HTTP error's ``error`` object, checked to have OpenAI's four fields."""
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


@dataclass
class RunningShim:
    """The shim serving on ``base_url`` from a background thread."""

    server: ShimServer
    thread: threading.Thread
    api_key: str | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}/v1"

    @property
    def backend(self) -> Any:
        """The app's Backend (pool, response store) for white-box checks."""
        return self.server.server.config.app.state.backend

    def client(self, **options: Any) -> openai.OpenAI:
        options.setdefault("api_key", self.api_key or "unused")
        return openai.OpenAI(base_url=self.base_url, max_retries=0, timeout=60, **options)

    def async_client(self, **options: Any) -> openai.AsyncOpenAI:
        options.setdefault("api_key", self.api_key or "unused")
        return openai.AsyncOpenAI(base_url=self.base_url, max_retries=0, timeout=60, **options)

    def stop(self) -> None:
        self.server.server.should_exit = True
        self.thread.join(timeout=30)


def start_shim(target: str, **options: Any) -> RunningShim:
    """The shim for the gRPC server at ``target``, on a free loopback port."""
    config = ShimConfig(target=target, host="127.0.0.1", port=0, log_level="warning", **options)
    server = ShimServer(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the shim did not start")
        time.sleep(0.01)
    return RunningShim(server, thread, config.api_key)


def greedy_reply(
    target: str, messages: list[dict[str, Any]], max_tokens: int, **options: Any
) -> Any:
    """The server's own answer (text, token ids, Done) to a chat prompt, on a fresh session."""
    with SalienceClient(target, timeout=30) as client, client.open_session() as session:
        prompt_ids = client.tokenize_chat(messages)
        *tokens, done = session.generate(prompt_ids, max_tokens=max_tokens, **options)
    return "".join(t.text for t in tokens), [t.token_id for t in tokens], done, prompt_ids


# ----- a scripted server ---------------------------------------------------------------


SCRIPTED_MODEL = "scripted"
SCRIPTED_EOS = 0


def _abort_status(code: grpc.StatusCode, reason: str, message: str) -> grpc.Status:
    info = error_details_pb2.ErrorInfo(reason=reason, domain="salience.v1")
    detail = any_pb2.Any()
    detail.Pack(info)
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=[detail])
    return rpc_status.to_status(status)


@dataclass
class Script:
    """What the scripted server's next Generate calls answer."""

    text: str = "hello"
    chat_template: str = "{{ messages }}"
    """Returned by GetModelInfo; the shim renders tools itself unless it mentions them."""
    readout: tuple[list[str], list[int]] | None = None
    """(concepts, layers) of a readout the server claims to have; None: readout off."""
    fail_after: int | None = None
    """Fail with UNAVAILABLE after this many tokens (None: finish normally)."""
    fail_with: tuple[grpc.StatusCode, str] | None = None
    """Fail every Generate at once with this status and ErrorInfo reason."""
    first_token_delay_s: float = 0.0
    """Wait this long before answering a decoding call (a queue wait, a long prefill)."""
    token_delay_s: float = 0.0
    """Wait this long after each decoded token but the first (a slow decode)."""
    prompts: list[list[int]] = field(default_factory=list)
    """Every prompt Generate received (session tokens before decoding), for checks."""
    requests: list[pb.GenerateRequest] = field(default_factory=list)
    """Every GenerateRequest received: what the shim asked the server for."""
    finish_reason: int | None = None
    """The Done's reason once the whole text is out (None: FINISH_REASON_STOP)."""
    tokens: list[tuple[int, str]] | None = None
    """(id, text) of each decoded token, in place of one per character of ``text``: a
    character's bytes, say, the text all with the last."""
    single_tokens: dict[str, int] = field(default_factory=dict)
    """Texts Tokenize gives as one token (added tokens, as a reasoning model's
    ``<think>``); every other text is a token per byte."""
    texts_tokenized: list[str] = field(default_factory=list)
    """Every text (not messages) Tokenize was asked for."""
    special_texts: tuple[str, ...] = ()
    """Texts of special tokens in ``text``: a decode that does not keep special tokens
    leaves them out, as the server's detokenizer does."""
    generation_prompt: str = ""
    """What the rendered prompt ends with after ``add_generation_prompt`` (Qwen3's
    ``<think>\n\n</think>\n\n`` with its thinking off), past the rendered JSON's line."""


class ScriptedSalience(salience_pb2_grpc.SalienceServicer):
    """A fake server: byte tokens, and a decode that spells out ``script.text``."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.sessions: dict[str, list[int]] = {}
        self._ids = itertools.count()

    async def OpenSession(self, request: Any, context: Any) -> pb.OpenSessionResponse:
        session_id = f"s{next(self._ids)}"
        self.sessions[session_id] = []
        return pb.OpenSessionResponse(session_id=session_id, max_context=100000, model_id="x")

    async def ForkSession(self, request: Any, context: Any) -> pb.ForkSessionResponse:
        child = f"s{next(self._ids)}"
        self.sessions[child] = list(self.sessions[request.session_id])
        return pb.ForkSessionResponse(session_id=child, length=len(self.sessions[child]))

    async def CloseSession(self, request: Any, context: Any) -> pb.CloseSessionResponse:
        self.sessions.pop(request.session_id, None)
        return pb.CloseSessionResponse()

    async def GetSession(self, request: Any, context: Any) -> pb.GetSessionResponse:
        tokens = self.sessions[request.session_id]
        info = pb.SessionInfo(session_id=request.session_id, length=len(tokens), busy=False)
        return pb.GetSessionResponse(session=info)

    async def GetModelInfo(self, request: Any, context: Any) -> pb.GetModelInfoResponse:
        concepts, layers = self.script.readout or ([], [])
        return pb.GetModelInfoResponse(
            supports_readout=self.script.readout is not None,
            readout_manifest=pb.ReadoutManifest(concepts=concepts, layers=layers),
            model_id=SCRIPTED_MODEL,
            max_context=100000,
            eos_token_ids=[SCRIPTED_EOS],
            vocab_size=256,
            chat_template=self.script.chat_template,
        )

    async def Tokenize(self, request: Any, context: Any) -> pb.TokenizeResponse:
        if request.WhichOneof("input") == "messages":
            rendered = {
                "messages": json.loads(request.messages.messages_json),
                "tools": json.loads(request.tools_json) if request.tools_json else None,
            }
            if request.chat_template_kwargs_json:
                rendered["chat_template_kwargs"] = json.loads(request.chat_template_kwargs_json)
            if request.continue_final_message:
                rendered["continue_final_message"] = True
            if not request.add_generation_prompt:
                rendered["add_generation_prompt"] = False
            text = json.dumps(rendered) + "\n"
            if request.add_generation_prompt:
                text += self.script.generation_prompt
        else:
            text = request.text
            self.script.texts_tokenized.append(text)
            if text in self.script.single_tokens:
                return pb.TokenizeResponse(token_ids=[self.script.single_tokens[text]])
        return pb.TokenizeResponse(token_ids=list(text.encode()))

    async def Detokenize(self, request: Any, context: Any) -> pb.DetokenizeResponse:
        pieces = [bytes([i]) for i in request.token_ids] if request.return_token_bytes else []
        return pb.DetokenizeResponse(
            text=bytes(request.token_ids).decode(errors="replace"), token_bytes=pieces
        )

    async def Generate(self, request: Any, context: Any) -> AsyncIterator[pb.GenerateEvent]:
        self.script.requests.append(request)
        if request.max_tokens and self.script.first_token_delay_s:
            await asyncio.sleep(self.script.first_token_delay_s)
        if self.script.fail_with is not None:
            code, reason = self.script.fail_with
            status = _abort_status(code, reason, f"scripted {reason}")
            await context.abort(status.code, status.details, status.trailing_metadata)
        tokens = self.sessions[request.session_id][: request.offset] + list(request.append_tokens)
        self.sessions[request.session_id] = tokens
        self.script.prompts.append(list(tokens))
        prompt_length = len(tokens)
        text = self.script.text
        for special in self.script.special_texts if not request.keep_special_tokens else ():
            text = text.replace(special, "")
        scripted = self.script.tokens or [(ord(char) % 256, char) for char in text]
        for count, (token_id, text) in enumerate(scripted[: request.max_tokens]):
            if self.script.fail_after is not None and count == self.script.fail_after:
                status = _abort_status(grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN", "stopping")
                await context.abort(status.code, status.details, status.trailing_metadata)
            token = pb.Token(id=token_id, position=len(tokens), text=text)
            tokens.append(token.id)
            yield pb.GenerateEvent(token=token)
            await asyncio.sleep(self.script.token_delay_s)
        completion = len(tokens) - prompt_length
        reason = pb.FINISH_REASON_STOP if request.max_tokens else pb.FINISH_REASON_PREFILL
        if 0 < request.max_tokens < len(scripted):
            reason = pb.FINISH_REASON_LENGTH
        elif request.max_tokens and self.script.finish_reason is not None:
            reason = self.script.finish_reason
        done = pb.Done(
            prompt_tokens=prompt_length,
            completion_tokens=completion,
            total_tokens=len(tokens),
            finish_reason=reason,
        )
        yield pb.GenerateEvent(done=done)


@dataclass
class ScriptedServer:
    """A ScriptedSalience on its own event-loop thread."""

    script: Script
    port: int
    loop: asyncio.AbstractEventLoop
    server: Any

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)


def start_scripted(script: Script) -> ScriptedServer:
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    async def boot() -> tuple[Any, int]:
        server = grpc.aio.server()
        salience_pb2_grpc.add_SalienceServicer_to_server(ScriptedSalience(script), server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(boot(), loop).result(timeout=10)
    return ScriptedServer(script, port, loop, server)


def rendered_chat(prompt: list[int]) -> dict[str, Any]:
    """``{"messages", "tools"}`` that a scripted prompt was rendered from (and the
    template options, when not the defaults)."""
    text = bytes(prompt).decode()
    return dict(json.loads(text[: text.index("\n", text.index('"tools"'))]))


def messages_json(prompt: list[int]) -> list[dict[str, Any]]:
    """The chat messages a scripted prompt was rendered from."""
    return list(rendered_chat(prompt)["messages"])


WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
}
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": WEATHER_PARAMETERS},
}
"""A Chat Completions tool with one required argument."""
TIME = {"type": "function", "function": {"name": "get_time"}}
"""A Chat Completions tool without parameters."""


def forced_weather_outputs(client: Any) -> list[tuple[str, str]]:
    """(type, arguments) of each output item of a Responses call forced to call
    ``get_weather`` (the Responses form of a named ``tool_choice``)."""
    response = client.responses.create(
        model="scripted",
        input="Weather?",
        tools=[{"type": "function", "name": "get_weather", "parameters": WEATHER_PARAMETERS}],
        tool_choice={"type": "function", "name": "get_weather"},
    )
    return [(o.type, o.arguments) for o in response.output]


def last_decoding_request(script: Script) -> pb.GenerateRequest:
    """The last decoding GenerateRequest the scripted server received."""
    return next(r for r in reversed(script.requests) if r.max_tokens > 0)


def request_constraint(request: pb.GenerateRequest) -> tuple[str | None, Any]:
    """(kind, value) of a GenerateRequest's constraint; (None, None) without one."""
    kind = request.constraint.WhichOneof("kind")
    return kind, getattr(request.constraint, kind) if kind else None
