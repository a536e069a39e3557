"""``ToolCall``: one call a model made; and the events a reply's parse gives as it
streams (text, a call opened, a piece of its arguments, a call closed)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any


def new_call_id() -> str:
    """A fresh ``call_...`` id."""
    return f"call_{uuid.uuid4().hex[:24]}"


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
