"""``ToolFormat``: how a model family writes a tool call, read from its chat template."""

from __future__ import annotations

from dataclasses import dataclass

from salience_server.http.call_forms import TOOL_CALL_CLOSE, TOOL_CALL_OPEN


@dataclass(frozen=True)
class ToolFormat:
    """How a model family writes a tool call."""

    name: str
    call_open: str
    """Text before a call's JSON object."""
    call_close: str
    """Text after it (a stop string when only one call is allowed)."""
    arguments_key: str


HERMES = ToolFormat("hermes", f"{TOOL_CALL_OPEN}\n", f"\n{TOOL_CALL_CLOSE}", "arguments")
LLAMA3_JSON = ToolFormat("llama3_json", "", "", "parameters")


def tool_format(chat_template: str) -> ToolFormat:
    """The family's format, read from its chat template: Llama 3's mentions the
    ``"parameters"`` of a call (or its ``<|python_tag|>``); Hermes otherwise."""
    if TOOL_CALL_OPEN not in chat_template and (
        '"parameters"' in chat_template or "<|python_tag|>" in chat_template
    ):
        return LLAMA3_JSON
    return HERMES
