"""Request bodies of the three OpenAI endpoints, validated by pydantic.

Unknown fields are accepted and ignored (SDKs send fields this server has no use for);
fields whose non-default values this server cannot honour are refused in ``check_*``.
Responses are built as plain dicts where they are made, to keep their shape visible.
"""

from __future__ import annotations

import json
from typing import Any, Literal, TypeVar

import pydantic
from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field

from salience_server.http.errors import invalid, unsupported
from salience_server.http.generation import DecodeOptions

_Model = TypeVar("_Model", bound=BaseModel)

_MIN_TOP_P = 1e-6
"""What an explicit ``top_p: 0`` becomes: only the most likely token (the server reads 0
as "unset", which is 1)."""


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class SamplingFields(_Body):
    """Sampling fields shared by every endpoint; None means the default."""

    model: str
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    """-1 or 0: no top-k (vLLM's extension)."""
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    seed: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def decode_options(
        self,
        max_tokens: int,
        stop: str | list[str] | None = None,
        logprob_top_k: int = 0,
        score_prompt: bool = False,
    ) -> DecodeOptions:
        """The server-side decoding options these fields ask for (OpenAI's default
        temperature is 1)."""
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        return DecodeOptions(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=_MIN_TOP_P if self.top_p == 0 else self.top_p or 0.0,
            top_k=max(self.top_k or 0, 0),
            min_p=self.min_p or 0.0,
            repetition_penalty=self.repetition_penalty or 0.0,
            seed=self.seed,
            stop_strings=tuple(s for s in stops if s),
            logprob_top_k=logprob_top_k,
            score_prompt=score_prompt,
        )

    def check_sampling(self) -> None:
        """Refuses what the server cannot do rather than silently ignoring it."""
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                raise unsupported(f"a non-zero {name} (use repetition_penalty)", name)
        if self.logit_bias:
            raise unsupported("logit_bias", "logit_bias")


class StreamOptions(_Body):
    """``stream_options``: ``include_usage`` adds a last chunk with the usage."""

    include_usage: bool = False


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[dict[str, Any]] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=64)
    stop: str | list[str] | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None

    def check(self) -> None:
        """Refuses combinations the schema alone cannot (400)."""
        self.check_sampling()
        if self.top_logprobs and not self.logprobs:
            raise invalid("top_logprobs requires logprobs to be true", "top_logprobs")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise unsupported("response_format other than text", "response_format")
        if self.stream_options is not None and not self.stream:
            raise invalid("stream_options is only allowed when stream is true", "stream_options")


class CompletionRequest(SamplingFields):
    """POST /v1/completions (the legacy text completion API)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int = Field(16, ge=0)
    """0: score the prompt only (with ``echo`` and ``logprobs``)."""
    n: int = Field(1, ge=1, le=64)
    stop: str | list[str] | None = None
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    best_of: int | None = None
    suffix: str | None = None

    def check(self) -> None:
        """Refuses combinations the schema alone cannot (400)."""
        self.check_sampling()
        if self.suffix:
            raise unsupported("suffix", "suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise unsupported("best_of other than n", "best_of")
        if self.stream_options is not None and not self.stream:
            raise invalid("stream_options is only allowed when stream is true", "stream_options")
        if isinstance(self.prompt, list) and not self.prompt:
            raise invalid("prompt must not be empty", "prompt")


class ResponsesRequest(SamplingFields):
    """POST /v1/responses."""

    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    text: dict[str, Any] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    background: bool | None = None
    conversation: str | dict[str, Any] | None = None

    def check(self) -> None:
        """Refuses combinations the schema alone cannot (400)."""
        self.check_sampling()
        text_format = (self.text or {}).get("format") or {}
        if text_format.get("type", "text") != "text":
            raise unsupported("text.format other than text", "text.format")
        if self.background:
            raise unsupported("background responses", "background")
        if self.conversation is not None:
            raise unsupported("conversation objects (use previous_response_id)", "conversation")


async def parse_body(request: Request, model: type[_Model]) -> _Model:
    """Reads and validates a JSON body; any problem is a 400 invalid_request_error."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise invalid(f"The request body is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise invalid("The request body must be a JSON object")
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise invalid(f"{param}: {first['msg']}" if param else first["msg"], param) from None
