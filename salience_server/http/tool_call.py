"""``ToolCall``: one call a model made, read from JSON, and its id; and the events a
reply's parse gives as it streams (text, a call opened, a piece of its arguments, a call
closed)."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from salience_server.text_checks import load_json

_WRITTEN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""An id a model writes that the shim hands on as it is: what OpenAI's own ids and
function names are made of, and no longer than a function's name may be."""


def new_call_id() -> str:
    """A fresh ``call_...`` id."""
    return f"call_{uuid.uuid4().hex[:24]}"


def written_call_id(written: str, taken: Collection[str]) -> str:
    """The id a model wrote for its call (Mistral v11's after ``[CALL_ID]``), kept so
    that the conversation sent back shows the model its own id; a fresh one where it is
    not of ``_WRITTEN_ID``'s shape or an earlier call of the reply has it (two calls
    with one id could not be told apart by their results)."""
    if _WRITTEN_ID.fullmatch(written) and written not in taken:
        return written
    return new_call_id()


@dataclass
class ToolCall:
    """One call the model made."""

    name: str
    arguments: str
    """The arguments as JSON text (what OpenAI's API carries)."""
    call_id: str = field(default_factory=new_call_id)
    is_complete: bool = True
    """False for a call the reply ended inside (its arguments unfinished)."""

    def chat_dict(self) -> dict[str, Any]:
        """The Chat Completions ``tool_calls`` entry."""
        return {
            "id": self.call_id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass
class TextDelta:
    """Reply text that is not part of any call."""

    text: str


@dataclass
class CallOpened:
    """A call begins: its name is known, its arguments follow as deltas."""

    index: int
    call: ToolCall


@dataclass
class ArgumentsDelta:
    """A piece of call ``index``'s arguments (JSON text)."""

    index: int
    text: str


@dataclass
class CallClosed:
    """Call ``index`` is complete (or the reply ended inside it)."""

    index: int


ParsedEvent = TextDelta | CallOpened | ArgumentsDelta | CallClosed


def calls_from_json(text: str, names: set[str]) -> list[ToolCall]:
    """The calls of JSON text of a call object or a list of them, each naming a declared
    tool; none where anything else is in it."""
    try:
        value: Any = load_json(text)
    except ValueError:
        return []
    calls = [call_of(item, names) for item in (value if isinstance(value, list) else [value])]
    return [call for call in calls if call is not None] if all(calls) else []


def call_from_json(text: str, names: set[str]) -> ToolCall | None:
    """A ToolCall from JSON text of an object naming a declared tool, else None."""
    try:
        return call_of(load_json(text), names)
    except ValueError:
        return None


def call_of(value: Any, names: set[str]) -> ToolCall | None:
    """A ToolCall from a JSON object naming a declared tool, else None."""
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return ToolCall(value["name"], arguments)
