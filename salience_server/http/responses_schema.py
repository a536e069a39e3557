"""The Responses API's request body (``POST /v1/responses``) and OpenAI's rules for it
that its field types alone do not say."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from salience_server.http.constraints import Sourced, one_constraint, text_format_constraint
from salience_server.http.errors import invalid, unsupported
from salience_server.http.refused_fields import CHAT_ONLY, refuse_unoffered
from salience_server.http.schemas import SamplingFields

LOGPROBS_INCLUDE = "message.output_text.logprobs"
INCLUDABLE = {
    LOGPROBS_INCLUDE,
    "code_interpreter_call.outputs",
    "computer_call_output.output.image_url",
    "file_search_call.results",
    "message.input_image.image_url",
    "reasoning.encrypted_content",
    "web_search_call.action.sources",
    "web_search_call.results",
}
"""The ``include`` values OpenAI knows (all but the logprobs name outputs of tools this
server does not run: asking for them changes nothing)."""
MAX_METADATA_PAIRS, MAX_METADATA_KEY_CHARS, MAX_METADATA_VALUE_CHARS = 16, 64, 512


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
    chat_template_kwargs: dict[str, Any] | None = None
    """Extra variables of the chat template (as in Chat Completions)."""
    include: list[str] | None = None
    """Extra output: ``message.output_text.logprobs`` is the one this server has (the
    others name outputs of tools it does not run)."""
    top_logprobs: int | None = Field(None, ge=0, le=20)
    """Alternatives per token in the output text's logprobs."""

    @property
    def wants_logprobs(self) -> bool:
        """Logprobs of the output text: asked for in ``include``, or by ``top_logprobs``."""
        return LOGPROBS_INCLUDE in (self.include or []) or self.top_logprobs is not None

    def check(self, vocab_size: int) -> None:
        """Refuses combinations the schema alone cannot (400)."""
        self.check_sampling(vocab_size, self.max_output_tokens)
        for index, value in enumerate(self.include or []):
            if value not in INCLUDABLE:
                raise invalid(
                    f"Invalid value: {value!r}. Supported values are: "
                    + ", ".join(repr(v) for v in sorted(INCLUDABLE)),
                    f"include[{index}]",
                    "invalid_value",
                )
        check_metadata(self.metadata)
        if self.input == [] and self.previous_response_id is None:  # nothing to answer
            raise invalid(
                "Invalid 'input': empty array. Give at least one item, or continue a "
                "response (previous_response_id)",
                "input",
                "empty_array",
            )
        if self.background:
            raise unsupported("background responses", "background")
        if self.conversation is not None:
            raise unsupported("conversation objects (use previous_response_id)", "conversation")
        extra = self.model_extra or {}
        if extra.get("prompt") is not None:
            raise unsupported("stored prompts (send the instructions and input)", "prompt")
        for name, instead in CHAT_ONLY.items():
            if extra.get(name) is not None:  # it would do nothing, and say nothing
                raise invalid(
                    f"Unknown parameter: '{name}' is not a Responses API parameter; {instead}",
                    name,
                    "unknown_parameter",
                )
        refuse_unoffered(extra)

    def constraint(self) -> Sourced | None:
        """The structured output asked for (``text.format`` or vLLM's fields)."""
        return one_constraint(
            ("text.format", text_format_constraint(self.text)),
            self.guided(),
        )


def check_metadata(metadata: dict[str, str] | None) -> None:
    """OpenAI's bounds on ``metadata``: 16 pairs, keys of 64 characters, values of 512."""
    pairs = metadata or {}
    if len(pairs) > MAX_METADATA_PAIRS:
        raise invalid(
            f"Invalid 'metadata': too many properties. Expected at most {MAX_METADATA_PAIRS}, "
            f"got {len(pairs)}",
            "metadata",
            "object_above_max_properties",
        )
    for key, value in pairs.items():
        if len(key) > MAX_METADATA_KEY_CHARS:
            raise invalid(
                f"Invalid 'metadata': key {key[:20]!r}... is longer than "
                f"{MAX_METADATA_KEY_CHARS} characters",
                "metadata",
                "string_above_max_length",
            )
        if len(value) > MAX_METADATA_VALUE_CHARS:
            raise invalid(
                f"Invalid 'metadata.{key}': string too long. Expected a string with at most "
                f"{MAX_METADATA_VALUE_CHARS} characters, got {len(value)}",
                f"metadata.{key}",
                "string_above_max_length",
            )
