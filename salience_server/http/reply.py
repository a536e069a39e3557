"""``ReplyParser``: one choice's text, as it streams, into reasoning, answer text and tool
calls; ``ParsedReply``: the same for a whole reply.

The reasoning splitter (reasoning models only) runs first; the answer then goes through
the tool-call parser (when tools are offered).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from salience_server.http.constraints import Constraint
from salience_server.http.reasoning import Reasoning, ReasoningSplitter
from salience_server.http.tool_call import ParsedEvent, TextDelta, ToolCall
from salience_server.http.tool_parser import ToolCallParser
from salience_server.http.tools import ToolMode


@dataclass
class ReasoningDelta:
    """A piece of the reasoning."""

    text: str


ReplyEvent = ReasoningDelta | ParsedEvent


class ReplyParser:
    """Feed the reply's text with ``push``, end with ``finish``."""

    @classmethod
    def for_request(
        cls,
        tools: ToolMode,
        constraint: Constraint | None,
        reasoning: Reasoning,
    ) -> ReplyParser:
        """The parser of one reply to a request: with ``tools`` when they are offered,
        reasoning when the template reasons. A constrained reply has no thinking,
        unless the constraint leaves it free (``thinks_first``); under a
        structured-output constraint, no bare JSON call."""
        splitter = None
        if reasoning.is_reasoning and (constraint is None or reasoning.thinks_first):
            splitter = ReasoningSplitter(reasoning.opens_thinking)
        parser = None
        if tools.is_enabled:
            is_json_output = constraint is not None and not tools.is_forced
            parser = tools.parser(allow_bare=not is_json_output)
        return cls(splitter, parser, is_call_only=tools.is_forced)

    def __init__(
        self,
        splitter: ReasoningSplitter | None = None,
        tools: ToolCallParser | None = None,
        is_call_only: bool = False,
    ) -> None:
        self._splitter = splitter
        self._tools = tools
        self._is_call_only = is_call_only
        """A forced call: the reply is the call, and text outside a parsed call is a call
        cut short (by max_tokens), not content."""

    @property
    def calls(self) -> list[ToolCall]:
        """The tool calls so far."""
        return self._tools.calls if self._tools is not None else []

    @property
    def num_reasoning_tokens(self) -> int:
        """Tokens that were reasoning (when the reply is pushed one token at a time)."""
        return self._splitter.num_reasoning_pushes if self._splitter is not None else 0

    def push(self, text: str) -> list[ReplyEvent]:
        """Events for the next piece of the reply."""
        if self._splitter is None:
            return self._answer(text, False)
        reasoning, answer = self._splitter.push(text)
        return self._reasoning(reasoning) + self._answer(answer, False)

    def finish(self) -> list[ReplyEvent]:
        """Events for what was held back."""
        events: list[ReplyEvent] = []
        if self._splitter is not None:
            reasoning, answer = self._splitter.finish()
            events += self._reasoning(reasoning) + self._answer(answer, False)
        return events + self._answer("", True)

    def _reasoning(self, text: str) -> list[ReplyEvent]:
        return [ReasoningDelta(text)] if text else []

    def _answer(self, text: str, is_final: bool) -> list[ReplyEvent]:
        if self._tools is None:
            return [TextDelta(text)] if text else []
        events: list[ReplyEvent] = []
        events += self._tools.push(text) if text else []
        events += self._tools.finish() if is_final else []
        if self._is_call_only:
            return [event for event in events if not isinstance(event, TextDelta)]
        return events


@dataclass
class ParsedReply:
    """A whole reply: its reasoning, its answer text and its tool calls."""

    reasoning: str = ""
    content: str = ""
    calls: list[ToolCall] = field(default_factory=list)
    num_reasoning_tokens: int = 0

    @classmethod
    def of(cls, parser: ReplyParser, pieces: list[str]) -> ParsedReply:
        """Runs ``parser`` over the reply, given as the text of each token."""
        events = [event for piece in pieces for event in parser.push(piece)]
        events += parser.finish()
        reply = cls(calls=parser.calls, num_reasoning_tokens=parser.num_reasoning_tokens)
        for event in events:
            if isinstance(event, ReasoningDelta):
                reply.reasoning += event.text
            elif isinstance(event, TextDelta):
                reply.content += event.text
        return reply  # the text the stream's deltas give, as it gives them
