"""``ReasoningSplitter``: a reasoning model's ``<think>…</think>`` apart from its answer.

Qwen3-style templates (the chat template mentions ``<think>`` and ``</think>``): the
reply may open with ``<think>``, and whatever comes before ``</think>`` is reasoning
(``reasoning_content`` in Chat Completions, a reasoning item in Responses). When the
rendered prompt itself ends inside an open ``<think>`` (DeepSeek-R1 style, or
Qwen3 thinking models), the reply starts in the reasoning. A reply that does not open
with ``<think>`` is all answer (Qwen3 with ``enable_thinking: false``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


@dataclass(frozen=True)
class Reasoning:
    """How a reply to a prompt reasons (``Backend.reasoning``)."""

    is_reasoning: bool = False
    """The model thinks first (a reasoning template, no forced tool call): its thinking
    is ``reasoning_content`` or a reasoning item."""
    opens_thinking: bool = False
    """The prompt ends inside an open ``<think>``: the reply starts in the thinking."""
    tags: tuple[int | None, int] | None = None
    """Under a structured-output constraint, the thinking tags' tokens it leaves the
    thinking free with (``DecodeOptions.thinking``: the opening one, None when the
    prompt opened it, and the closing one); None: no thinking under a constraint."""

    @property
    def thinks_first(self) -> bool:
        """A constrained reply may think before its constrained answer."""
        return self.tags is not None


def template_reasons(chat_template: str) -> bool:
    """Whether a chat template is a reasoning model's (it writes thinking tags)."""
    return THINK_OPEN in chat_template and THINK_CLOSE in chat_template


def opens_thinking(prompt_text: str) -> bool:
    """Whether a rendered prompt ends inside an open ``<think>``."""
    return prompt_text.rfind(THINK_OPEN) > prompt_text.rfind(THINK_CLOSE)


def closes_thinking(prompt_text: str) -> bool:
    """Whether a rendered prompt ends with a closed thinking (``</think>``, then only
    whitespace): the reply is the answer (Qwen3 with ``enable_thinking: false``)."""
    return prompt_text.rstrip().endswith(THINK_CLOSE)


class ReasoningSplitter:
    """Feed the reply with ``push``; each call returns (reasoning, answer) text released
    now. Tags are held back until they are whole; the whitespace that opens the
    reasoning and the answer after it is dropped."""

    def __init__(self, is_thinking: bool = False) -> None:
        self._state: Literal["start", "reasoning", "answer"] = (
            "reasoning" if is_thinking else "start"
        )
        self._buffer = ""
        self._strip_leading = True
        self.num_reasoning_pushes = 0
        """Pushes that were (partly) reasoning: the reasoning tokens, pushed one by one."""

    def push(self, text: str) -> tuple[str, str]:
        """(reasoning, answer) released for this piece of the reply."""
        was_reasoning = self._state == "reasoning"
        self._buffer += text
        reasoning, answer = self._advance(is_final=False)
        if was_reasoning or reasoning or self._state == "reasoning":
            self.num_reasoning_pushes += 1
        return reasoning, answer

    def finish(self) -> tuple[str, str]:
        """What was held back, at the end of the reply (an unclosed think is reasoning)."""
        return self._advance(is_final=True)

    def _advance(self, is_final: bool) -> tuple[str, str]:
        reasoning = answer = ""
        if self._state == "start":
            stripped = self._buffer.lstrip()
            if stripped.startswith(THINK_OPEN):
                self._buffer = stripped[len(THINK_OPEN) :]
                self._state = "reasoning"
            elif not is_final and THINK_OPEN.startswith(stripped):  # "" or "<thi"
                return "", ""
            else:
                self._state, self._strip_leading = "answer", False
        if self._state == "reasoning":
            if self._strip_leading:
                self._buffer = self._buffer.lstrip()
                self._strip_leading = not self._buffer
            end = self._buffer.find(THINK_CLOSE)
            if end >= 0:
                reasoning = self._buffer[:end]
                self._buffer = self._buffer[end + len(THINK_CLOSE) :]
                self._state, self._strip_leading = "answer", True
            else:
                cut = len(self._buffer) if is_final else _safe_length(self._buffer)
                reasoning, self._buffer = self._buffer[:cut], self._buffer[cut:]
        if self._state == "answer":
            if self._strip_leading:
                self._buffer = self._buffer.lstrip()
                self._strip_leading = not self._buffer
            answer, self._buffer = self._buffer, ""
        return reasoning, answer


def _safe_length(text: str) -> int:
    """How much of ``text`` can be released without splitting a ``</think>``."""
    for size in range(min(len(THINK_CLOSE) - 1, len(text)), 0, -1):
        if text.endswith(THINK_CLOSE[:size]):
            return len(text) - size
    return len(text)
