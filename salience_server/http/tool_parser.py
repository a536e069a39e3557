"""``ToolCallParser``: tool calls recognised in a model's reply while it streams, in
any of the forms of ``call_forms``.

Text streams as it comes. Only what may still open a call is held back: the opening of
a reply that may be a bare call (``{``, ``[``, a code fence) until it either names a
declared tool and reaches its arguments, or cannot anymore (then it is plain text after
all), and a possible marker (``<tool_call>``, ``[TOOL_CALLS]``, ...). Once a call is open, its arguments stream as
deltas, exactly the JSON text the model writes, until the value closes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

from salience_server.http.call_forms import (
    BETWEEN_CALLS,
    JSON_MARKERS,
    MARKERS,
    MISTRAL_ARGS,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    Opening,
    call_openings,
    could_open,
    spellings,
)
from salience_server.http.json_depth import JsonDepth, value_end
from salience_server.http.tool_call import (
    ArgumentsDelta,
    CallClosed,
    CallOpened,
    ParsedEvent,
    TextDelta,
    ToolCall,
    call_from_json,
    calls_from_json,
    written_call_id,
)

_State = Literal[
    "text",
    "opening",
    "tag",
    "marked",
    "element",
    "call_id",
    "arguments",
    "rest",
    "after",
    "ignore",
]


@dataclass
class ToolCallParser:
    """Feed the reply with ``push``, end with ``finish``; both return parsed events.

    ``names``: the declared tools (a call naming another is text). ``max_calls``: calls
    beyond it are dropped with everything after them (``parallel_tool_calls: false``).
    ``allow_bare``: whether a reply may be a bare JSON call (not under a JSON constraint
    of ``response_format``)."""

    names: set[str]
    max_calls: int | None = None
    allow_bare: bool = True
    prefix: str = ""
    """Text the reply starts with that the model did not write (a forced call's
    opening); its events come with the first push."""
    calls: list[ToolCall] = field(default_factory=list)
    """Every call so far, its arguments as received."""
    _buffer: str = ""
    _state: _State = "text"
    _at_start: bool = True
    """Nothing but whitespace has been released: a bare call may still start."""
    _json: JsonDepth = field(default_factory=JsonDepth)
    _openings: list[Opening] = field(default_factory=list)
    _in_object: bool = True
    """The open call's arguments are inside its JSON object (``Opening.in_object``)."""
    _in_list: bool = False
    """Inside a list of calls (``[...]``, or calls after a marker separated by ``;``):
    its next item is a call object, bare, whether or not a bare call may stand alone."""
    _item_openings: list[Opening] = field(default_factory=list)
    _named: str = ""
    """The function of a call whose id is being read (``call_id`` state)."""

    def __post_init__(self) -> None:
        self._openings = call_openings(self.names, self.allow_bare)
        self._item_openings = [o for o in call_openings(self.names, True) if o.text[0] == "{"]
        self._buffer = self.prefix

    def push(self, text: str) -> list[ParsedEvent]:
        """Events for the next piece of the reply."""
        self._buffer += text
        return self._advance(is_final=False)

    def finish(self) -> list[ParsedEvent]:
        """Events for the end of the reply: what was held back is released, an
        unfinished call is closed."""
        events = self._advance(is_final=True)
        if self._state == "arguments":  # cut inside the arguments
            events += self._arguments(self._buffer)
            self.calls[-1].is_complete = False
            events.append(CallClosed(len(self.calls) - 1))
        elif self._state == "text" and self._buffer:
            events.append(TextDelta(self._buffer))
        self._buffer = ""
        return events

    # ----- the states -----------------------------------------------------------------

    def _advance(self, is_final: bool) -> list[ParsedEvent]:
        events: list[ParsedEvent] = []
        handlers = {
            "text": self._text,
            "opening": self._opening,
            "tag": self._tag,
            "marked": self._marked,
            "element": self._element,
            "call_id": self._call_id,
            "arguments": self._arguments_value,
            "rest": self._rest_of_call,
            "after": self._after_call,
            "ignore": self._ignore,
        }
        while True:
            state, size = self._state, len(self._buffer)
            events += handlers[state](is_final)
            if self._state == state and len(self._buffer) == size:
                return events

    def _text(self, is_final: bool) -> list[ParsedEvent]:
        """Plain text: released up to a possible marker (or a bare call's start)."""
        if self._at_start and self.allow_bare:
            stripped = self._buffer.lstrip()
            if not stripped:
                return []
            self._at_start = False
            if could_open(stripped[0]):
                self._state = "opening"
                return []
        cut = min((i for i in map(self._buffer.find, MARKERS) if i >= 0), default=-1)
        if cut >= 0:
            self._state = "opening"
        elif is_final:
            cut = len(self._buffer)
        else:
            held = max(_partial_suffix(self._buffer, marker) for marker in MARKERS)
            cut = len(self._buffer) - held
        released, self._buffer = self._buffer[:cut], self._buffer[cut:]
        return [TextDelta(released)] if released else []

    def _opening(self, is_final: bool) -> list[ParsedEvent]:
        """The buffer starts where a call may open: wait until it does or cannot."""
        compact = "".join(self._buffer.split())
        for opening in self._openings:
            if compact.startswith(opening.text):
                self._buffer = self._buffer[_index_after(self._buffer, len(opening.text)) :]
                before = opening.text.partition('{"name"')[0]
                self._in_list = before.endswith(("[", *JSON_MARKERS))
                if opening.then_id:
                    self._state, self._named = "call_id", opening.name
                    return []
                return self._open(opening.name, opening.in_object)
        could_match = any(opening.text.startswith(compact) for opening in self._openings)
        if could_match and not is_final:
            return []
        if could_match and compact.startswith(MARKERS):
            named = {
                opening.name
                for opening in self._openings
                if opening.text.startswith(compact)
                and any(f'"name":{spelled},' in compact for spelled in spellings(opening.name))
            }
            if len(named) == 1:  # the reply ended after the call's name: a cut call
                self._buffer = ""
                return self._open(named.pop())
        # Not a call in the streamable form: parsed whole, or text.
        if self._buffer.startswith(TOOL_CALL_OPEN):
            self._state = "tag"
        elif self._buffer.startswith(JSON_MARKERS):
            self._state = "marked"
        else:
            self._state = "text"
            return self._marker_as_text()
        return []

    def _marker_as_text(self) -> list[ParsedEvent]:
        """The marker the buffer starts with (if any) is text: no call follows it."""
        marker = next((m for m in MARKERS if self._buffer.startswith(m)), "")
        self._buffer = self._buffer[len(marker) :]
        return [TextDelta(marker)] if marker else []

    def _marked(self, is_final: bool) -> list[ParsedEvent]:
        """``[TOOL_CALLS]`` or ``<|python_tag|>`` before JSON not in the streamable form
        (keys in another order, say): parsed whole once its value closes; the marker is
        text if no calls follow it."""
        marker = next(m for m in JSON_MARKERS if self._buffer.startswith(m))
        value = self._buffer[len(marker) :].lstrip()
        end = value_end(value)
        if end is None and not is_final:
            return []
        calls = calls_from_json(value[:end], self.names) if end else []
        if not calls:
            self._state = "text"
            return self._marker_as_text()
        self._buffer = value[end:]
        return self._whole_calls(calls)

    def _element(self, is_final: bool) -> list[ParsedEvent]:
        """The next item of a list of calls: streamed where it is in the streamable form,
        else parsed whole once it closes; an item that is no call ends the calls, text."""
        compact = "".join(self._buffer.split())
        for opening in self._item_openings:
            if compact.startswith(opening.text):
                self._buffer = self._buffer[_index_after(self._buffer, len(opening.text)) :]
                return self._open(opening.name)
        if not is_final and any(o.text.startswith(compact) for o in self._item_openings):
            return []
        end = value_end(self._buffer)
        if end is None and not is_final:
            return []
        calls = calls_from_json(self._buffer[:end], self.names) if end else []
        if not calls:
            self._state, self._in_list = "text", False
            return []
        self._buffer = self._buffer[end:]
        return self._whole_calls(calls)

    def _whole_calls(self, calls: list[ToolCall]) -> list[ParsedEvent]:
        """Events of calls parsed whole (not streamed)."""
        events: list[ParsedEvent] = []
        for call in calls:
            events += self._open(call.name)
            if self._state == "ignore":
                return events
            events += [*self._arguments(call.arguments), CallClosed(len(self.calls) - 1)]
        self._state = "after"
        return events

    def _tag(self, is_final: bool) -> list[ParsedEvent]:
        """A ``<tool_call>`` whose content is not in the streamable form (keys in another
        order, say): parsed whole once closed; released as text if it is no call."""
        end = self._buffer.find(TOOL_CALL_CLOSE)
        if end < 0 and not is_final:
            return []
        stop = len(self._buffer) if end < 0 else end + len(TOOL_CALL_CLOSE)
        body = self._buffer[len(TOOL_CALL_OPEN) : stop - (len(TOOL_CALL_CLOSE) if end >= 0 else 0)]
        whole, self._buffer = self._buffer[:stop], self._buffer[stop:]
        call = call_from_json(body.strip(), self.names)
        if call is None:
            self._state = "text"
            return [TextDelta(whole)]
        return self._whole_calls([call])

    def _call_id(self, is_final: bool) -> list[ParsedEvent]:
        """Mistral v11's id of a call, between ``[CALL_ID]`` and ``[ARGS]``: the call
        opens with it once ``[ARGS]`` comes (``written_call_id``), or, where the reply
        ends first, opens cut, with an id of its own."""
        end = self._buffer.find(MISTRAL_ARGS)
        if end < 0 and not is_final:
            return []
        written = self._buffer[:end].strip() if end >= 0 else ""
        self._buffer = self._buffer[end + len(MISTRAL_ARGS) :] if end >= 0 else ""
        return self._open(self._named, False, written)

    def _open(self, name: str, in_object: bool = True, written_id: str = "") -> list[ParsedEvent]:
        if self.max_calls is not None and len(self.calls) >= self.max_calls:
            self._state, self._buffer = "ignore", ""
            return []
        call = ToolCall(name, "", written_call_id(written_id, {c.call_id for c in self.calls}))
        self.calls.append(call)
        self._state, self._json, self._in_object = "arguments", JsonDepth(), in_object
        return [CallOpened(len(self.calls) - 1, call)]

    def _arguments_value(self, is_final: bool) -> list[ParsedEvent]:
        """Inside a call's arguments: streamed as they come, until the value closes."""
        text = self._buffer
        if not self._json.depth:
            text = text.lstrip()
            if not text:
                self._buffer = ""
                return []
            if text[0] not in "{[":
                self._buffer = text
                return self._string_value(text)
        for position, char in enumerate(text):
            self._json.feed(char)
            if self._json.depth == 0:
                self._buffer = text[position + 1 :]
                return self._close(text[: position + 1])
        self._buffer = ""
        return self._arguments(text)

    def _string_value(self, text: str) -> list[ParsedEvent]:
        """Arguments written as a JSON string of JSON text: sent once whole, decoded.
        Anything else that is not an object (null, say) stands for no arguments."""
        if text[0] != '"':
            return self._close("{}")
        scanner = JsonDepth()
        for position, char in enumerate(text):
            scanner.feed(char)
            if position > 0 and not scanner.in_string:
                self._buffer = text[position + 1 :]
                try:
                    decoded = str(json.loads(text[: position + 1]))
                except json.JSONDecodeError:
                    decoded = text[1:position]
                return self._close(decoded)
        return []  # not closed yet: wait for more

    def _close(self, last_piece: str) -> list[ParsedEvent]:
        events = self._arguments(last_piece)
        events.append(CallClosed(len(self.calls) - 1))
        self._state = "rest" if self._in_object else "after"
        self._json = JsonDepth(depth=1)
        return events

    def _arguments(self, text: str) -> list[ParsedEvent]:
        if not text:
            return []
        self.calls[-1].arguments += text
        return [ArgumentsDelta(len(self.calls) - 1, text)]

    def _rest_of_call(self, is_final: bool) -> list[ParsedEvent]:
        """The rest of the call object after its arguments: skipped up to its ``}``."""
        for position, char in enumerate(self._buffer):
            self._json.feed(char)
            if self._json.depth == 0:
                self._buffer = self._buffer[position + 1 :]
                self._state = "after"
                return []
        self._buffer = ""
        return []

    def _after_call(self, is_final: bool) -> list[ParsedEvent]:
        """Between calls: closing tags, fences, list ends and separators are skipped;
        another call opens, or text follows."""
        rest = self._buffer.lstrip()
        for junk in BETWEEN_CALLS:
            if rest.startswith(junk):
                self._buffer = rest[len(junk) :]
                self._in_list = self._in_list and junk != "]"
                return []
        if any(junk.startswith(rest) for junk in BETWEEN_CALLS):  # "" or a part of one
            self._buffer = "" if is_final else rest
            return []
        self._buffer = rest
        if self._in_list and rest[0] == "{":
            self._state = "element"
        else:
            self._in_list = False
            self._state = "opening" if could_open(rest[0]) else "text"
        return []

    def _ignore(self, is_final: bool) -> list[ParsedEvent]:
        self._buffer = ""
        return []


def _index_after(text: str, num_visible: int) -> int:
    """The index in ``text`` just after its first ``num_visible`` non-whitespace chars."""
    seen = 0
    for index, char in enumerate(text):
        if not char.isspace():
            seen += 1
            if seen == num_visible:
                return index + 1
    return len(text)


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:size]):
            return size
    return 0


def parse_reply(text: str, names: set[str], allow_bare: bool = True) -> tuple[str, list[ToolCall]]:
    """(the text outside any call, the calls) of a whole reply; no calls: (text, [])."""
    parser = ToolCallParser(names, allow_bare=allow_bare)
    events = parser.push(text) + parser.finish()
    content = "".join(event.text for event in events if isinstance(event, TextDelta))
    return (content.strip(), parser.calls) if parser.calls else (text, [])
