"""``ResponseStream``: the named, numbered events of one streamed Response.

For a reply that is text: ``response.output_item.added``, ``response.content_part.added``,
``response.output_text.delta``..., ``response.output_text.done``,
``response.content_part.done``, ``response.output_item.done``. Each function call the
reply makes is one more output item, with ``response.function_call_arguments.delta`` and
``.done`` between its ``added`` and ``done``. The message opens at its first text, so a
reply that is only a tool call has no message item.
"""

from __future__ import annotations

from typing import Any

from salience_client import Done
from salience_server.http.streaming import sse_event
from salience_server.http.tools import ToolCall, ToolCallFilter, ToolMode


def output_text_part(text: str) -> dict[str, Any]:
    """A message's ``output_text`` content part."""
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message_item(message_id: str, text: str, status: str) -> dict[str, Any]:
    """An assistant message output item (no content parts while in progress)."""
    content = [] if status == "in_progress" else [output_text_part(text)]
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": content,
    }


def function_call_item(call: ToolCall, status: str = "completed") -> dict[str, Any]:
    """A ``function_call`` output item (arguments empty while in progress)."""
    return {
        "id": f"fc_{call.call_id.removeprefix('call_')}",
        "type": "function_call",
        "call_id": call.call_id,
        "name": call.name,
        "arguments": call.arguments if status == "completed" else "",
        "status": status,
    }


def status_of(done: Done | None, calls: list[ToolCall]) -> str:
    """``incomplete`` when the reply was cut by max_output_tokens or the context."""
    if calls or done is None or done.finish_reason in ("stop", "stop_string"):
        return "completed"
    return "incomplete"


class ResponseStream:
    """Emits a streamed response's events as its text arrives, numbering them."""

    def __init__(self, message_id: str, tools: ToolMode, prefix_text: str) -> None:
        self._message_id = message_id
        self._filter = ToolCallFilter(tools.names, prefix_text) if tools.is_enabled else None
        self._is_message_open = False
        self.sequence_number = 0
        self.text = ""
        """The message's text so far."""
        self.calls: list[ToolCall] = []
        self.status = "in_progress"

    def event(self, kind: str, **fields: Any) -> str:
        """One server-sent event of type ``kind``, with the next sequence number."""
        payload = {"type": kind, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        return sse_event(kind, payload)

    def push(self, delta: str) -> list[str]:
        """Events for a piece of the model's text."""
        if self._filter is not None:
            delta = self._filter.push(delta)
        return self._text_delta(delta)

    def finish(self, done: Done | None) -> list[str]:
        """Events that close the output: the message, then one item per function call."""
        events = []
        if self._filter is not None:
            rest, self.calls = self._filter.finish()
            events += self._text_delta(rest)
        self.status = status_of(done, self.calls)
        if self._is_message_open or not self.calls:
            events += self._close_message()
        first_index = 1 if self._is_message_open else 0
        for offset, call in enumerate(self.calls):
            events += self._function_call(first_index + offset, call)
        return events

    def _text_delta(self, delta: str) -> list[str]:
        if not delta:
            return []
        events = self._open_message()
        self.text += delta
        events.append(
            self.event(
                "response.output_text.delta",
                item_id=self._message_id,
                output_index=0,
                content_index=0,
                delta=delta,
                logprobs=[],
            )
        )
        return events

    def _open_message(self) -> list[str]:
        if self._is_message_open:
            return []
        self._is_message_open = True
        return [
            self.event(
                "response.output_item.added",
                output_index=0,
                item=message_item(self._message_id, "", "in_progress"),
            ),
            self.event(
                "response.content_part.added",
                item_id=self._message_id,
                output_index=0,
                content_index=0,
                part=output_text_part(""),
            ),
        ]

    def _close_message(self) -> list[str]:
        events = self._open_message()
        where = {"item_id": self._message_id, "output_index": 0, "content_index": 0}
        events += [
            self.event("response.output_text.done", **where, text=self.text, logprobs=[]),
            self.event("response.content_part.done", **where, part=output_text_part(self.text)),
            self.event(
                "response.output_item.done",
                output_index=0,
                item=message_item(self._message_id, self.text, self.status),
            ),
        ]
        return events

    def _function_call(self, output_index: int, call: ToolCall) -> list[str]:
        item_id = function_call_item(call)["id"]
        return [
            self.event(
                "response.output_item.added",
                output_index=output_index,
                item=function_call_item(call, "in_progress"),
            ),
            self.event(
                "response.function_call_arguments.delta",
                item_id=item_id,
                output_index=output_index,
                delta=call.arguments,
            ),
            self.event(
                "response.function_call_arguments.done",
                item_id=item_id,
                output_index=output_index,
                name=call.name,
                arguments=call.arguments,
            ),
            self.event(
                "response.output_item.done",
                output_index=output_index,
                item=function_call_item(call),
            ),
        ]
