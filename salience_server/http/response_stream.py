"""``ResponseStream``: a Response's output items and the named, numbered events that
build them, as the reply's text arrives.

The reply is parsed (``ReplyParser``) into reasoning, text and function calls; each run
of one kind is an output item, in order:
- reasoning: ``response.output_item.added``, ``response.content_part.added`` (a
  ``reasoning_text`` part), ``response.reasoning_text.delta``...,
  ``response.reasoning_text.done``, ``response.content_part.done``,
  ``response.output_item.done``;
- text: the same with an ``output_text`` part and ``response.output_text.delta`` /
  ``.done``;
- a function call: ``response.output_item.added``,
  ``response.function_call_arguments.delta``..., ``.done``, ``response.output_item.done``.

The message opens at its first text, so a reply that is only a tool call has no message
item; a reply with nothing at all still gets an (empty) message. A non-streamed
response is built the same way, its events unused.

Logprobs (where asked for) go with the message text their tokens became: each token's
entry rides on the next ``response.output_text.delta`` (text the parser holds back takes
its tokens' entries along), and the ``output_text`` part holds them all. Tokens that
became reasoning or a function call have none.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

from salience_client import Done
from salience_server.http.reply import ReasoningDelta, ReplyEvent, ReplyParser
from salience_server.http.streaming import sse_event
from salience_server.http.tool_call import (
    ArgumentsDelta,
    CallClosed,
    CallOpened,
    TextDelta,
    ToolCall,
)

_Kind = Literal["reasoning", "message", "function_call"]


def output_text_part(text: str, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A message's ``output_text`` content part."""
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def reasoning_text_part(text: str) -> dict[str, Any]:
    """A reasoning item's ``reasoning_text`` content part."""
    return {"type": "reasoning_text", "text": text}


def message_item(
    message_id: str, text: str, status: str, logprobs: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """An assistant message output item (no content parts while in progress)."""
    content = [] if status == "in_progress" else [output_text_part(text, logprobs)]
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": content,
    }


def reasoning_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    """A reasoning output item: the model's thinking as ``reasoning_text`` content."""
    content = [] if status == "in_progress" else [reasoning_text_part(text)]
    return {"id": item_id, "type": "reasoning", "summary": [], "content": content, "status": status}


def function_call_item(call: ToolCall, status: str = "completed") -> dict[str, Any]:
    """A ``function_call`` output item (arguments empty while in progress)."""
    return {
        "id": f"fc_{call.call_id.removeprefix('call_')}",
        "type": "function_call",
        "call_id": call.call_id,
        "name": call.name,
        "arguments": call.arguments if status != "in_progress" else "",
        "status": status,
    }


def status_of(done: Done | None, calls: list[ToolCall]) -> str:
    """``incomplete`` when the reply was cut by max_output_tokens or the context."""
    if done is None or done.finish_reason in ("stop", "stop_string"):
        return "completed"
    return "incomplete"


class ResponseStream:
    """Builds a response's output items from its reply, numbering the events."""

    def __init__(self, parser: ReplyParser, message_id: str) -> None:
        self._parser = parser
        self._message_id = message_id
        self.items: list[dict[str, Any]] = []
        """The output items so far, each in its latest form."""
        self._open: _Kind | None = None
        self._item_text = ""
        self._item_logprobs: list[dict[str, Any]] = []
        self._pending_logprobs: list[dict[str, Any]] = []
        """Entries of tokens whose text the parser has not let out yet."""
        self.sequence_number = 0
        self.text = ""
        """Every message text of the reply."""
        self.reasoning = ""
        """Every reasoning text of the reply (its thinking)."""
        self.status = "in_progress"

    @property
    def calls(self) -> list[ToolCall]:
        """The function calls so far."""
        return self._parser.calls

    @property
    def num_reasoning_tokens(self) -> int:
        """Decoded tokens that were reasoning."""
        return self._parser.num_reasoning_tokens

    def event(self, kind: str, **fields: Any) -> str:
        """One server-sent event of type ``kind``, with the next sequence number."""
        payload = {"type": kind, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        return sse_event(kind, payload)

    def push(self, text: str, logprob: dict[str, Any] | None = None) -> list[str]:
        """Events for a piece of the model's text (one token's, with its ``logprob``
        entry where logprobs are asked for)."""
        if logprob is not None:
            self._pending_logprobs.append(logprob)
        return [sse for event in self._parser.push(text) for sse in self._on(event)]

    def finish(self, done: Done | None) -> list[str]:
        """Events that close the output (the open item takes the response's status)."""
        events = [sse for event in self._parser.finish() for sse in self._on(event)]
        if self._pending_logprobs and (self._open == "message" or not self.items):
            events += self._text_delta("message", "")  # the last tokens printed nothing
        self.status = status_of(done, self.calls)
        if not self.items:
            events += self._open_item("message")
        return events + self._close_item(self.status)

    def fail(self) -> list[str]:
        """Events that close the item open when the reply failed midway, as incomplete
        (it was left without its ``output_item.done``, and out of ``response.failed``'s
        output); ``items`` then holds what was streamed."""
        self.status = "failed"
        if self._open == "function_call":  # its arguments may be cut anywhere
            self._open = None
            self.items[-1] = function_call_item(self.calls[-1], "incomplete")
            return [
                self.event(
                    "response.output_item.done", output_index=self._index, item=self.items[-1]
                )
            ]
        return self._close_item("incomplete")

    def _on(self, event: ReplyEvent) -> list[str]:
        if isinstance(event, ReasoningDelta):
            return self._text_delta("reasoning", event.text)
        if isinstance(event, TextDelta):
            return self._text_delta("message", event.text)
        if isinstance(event, CallOpened):
            self._pending_logprobs.clear()
            events = self._close_item("completed")
            self.items.append(function_call_item(event.call, "in_progress"))
            self._open = "function_call"
            added = self.event(
                "response.output_item.added", output_index=self._index, item=self.items[-1]
            )
            return [*events, added]
        if isinstance(event, ArgumentsDelta):
            return [
                self.event(
                    "response.function_call_arguments.delta", **self._where(), delta=event.text
                )
            ]
        assert isinstance(event, CallClosed)
        return self._close_item(
            "completed" if self.calls[event.index].is_complete else "incomplete"
        )

    @property
    def _index(self) -> int:
        return len(self.items) - 1

    def _where(self) -> dict[str, Any]:
        return {"item_id": self.items[-1]["id"], "output_index": self._index}

    def _text_delta(self, kind: _Kind, delta: str) -> list[str]:
        events = [] if self._open == kind else self._close_item("completed")
        events += self._open_item(kind)
        self._item_text += delta
        logprobs, self._pending_logprobs = self._pending_logprobs, []
        if kind == "message":
            self.text += delta
            self._item_logprobs += logprobs
        else:
            self.reasoning += delta
        name = (
            "response.output_text.delta" if kind == "message" else "response.reasoning_text.delta"
        )
        extra: dict[str, Any] = {"logprobs": logprobs} if kind == "message" else {}
        events.append(self.event(name, **self._where(), content_index=0, delta=delta, **extra))
        return events

    def _open_item(self, kind: _Kind) -> list[str]:
        if self._open == kind:
            return []
        self._open, self._item_text, self._item_logprobs = kind, "", []
        if kind == "message":
            item_id = self._message_id if not self.text else f"msg_{uuid.uuid4().hex}"
            item, part = message_item(item_id, "", "in_progress"), output_text_part("")
        else:
            item = reasoning_item(f"rs_{uuid.uuid4().hex}", "", "in_progress")
            part = reasoning_text_part("")
        self.items.append(item)
        return [
            self.event("response.output_item.added", output_index=self._index, item=item),
            self.event("response.content_part.added", **self._where(), content_index=0, part=part),
        ]

    def _close_item(self, status: str) -> list[str]:
        kind, self._open = self._open, None
        if kind is None:
            return []
        where = self._where()
        if kind == "function_call":
            call = self.calls[-1]
            self.items[-1] = function_call_item(call, status)
            return [
                self.event(
                    "response.function_call_arguments.done",
                    **where,
                    name=call.name,
                    arguments=call.arguments,
                ),
                self.event(
                    "response.output_item.done", output_index=self._index, item=self.items[-1]
                ),
            ]
        text, logprobs = self._item_text, self._item_logprobs
        extra: dict[str, Any]
        if kind == "message":
            self.items[-1] = message_item(where["item_id"], text, status, logprobs)
            done, part, extra = (
                "response.output_text.done",
                output_text_part(text, logprobs),
                {"logprobs": logprobs},
            )
        else:
            self.items[-1] = reasoning_item(where["item_id"], text, status)
            done, part, extra = "response.reasoning_text.done", reasoning_text_part(text), {}
        return [
            self.event(done, **where, content_index=0, text=text, **extra),
            self.event("response.content_part.done", **where, content_index=0, part=part),
            self.event("response.output_item.done", output_index=self._index, item=self.items[-1]),
        ]
