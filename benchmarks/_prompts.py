"""Deterministic prompt text cut to token counts with the model's own tokenizer.

Every piece handed out is a fresh stretch of one pseudo-English corpus, so no two
prompts share a prefix by accident (a peer with a prefix cache would otherwise be
measured on a workload easier than the one named).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks._sizes import Sizes

WORDS = (
    "the agent reads a file and writes a patch for the failing test while the build "
    "reports two warnings about unused imports and one error in the parser module so "
    "it opens the log again searches for the stack trace and asks the tool to run the "
    "suite with more output before it edits the function that returns a wrong value "
    "when the input list is empty the reviewer wants a smaller change with a comment "
    "that explains why the cache must be cleared after every request to the server "
    "which keeps sessions of tokens in memory blocks on the device between calls"
).split()


class Texts:
    """Hands out text of about ``n`` tokens, each piece new; counts chat prompts."""

    def __init__(self, tokenizer: Any, seed: int = 0) -> None:
        self.tokenizer = tokenizer
        self._random = random.Random(seed)
        self._corpus_ids: list[int] = []
        self._cursor = 0

    def take(self, num_tokens: int) -> str:
        """The next ``num_tokens`` tokens of the corpus, as text."""
        while len(self._corpus_ids) < self._cursor + num_tokens:
            self._grow()
        ids = self._corpus_ids[self._cursor : self._cursor + num_tokens]
        self._cursor += num_tokens
        return str(self.tokenizer.decode(ids)).strip()

    def _grow(self) -> None:
        sentences = []
        for _ in range(200):
            words = self._random.choices(WORDS, k=self._random.randint(8, 20))
            sentences.append(" ".join(words).capitalize() + ".")
        self._corpus_ids += self.tokenizer.encode(
            " " + " ".join(sentences), add_special_tokens=False
        )

    def count(self, text: str) -> int:
        """Tokens of plain text."""
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def chat_ids(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """The prompt ids of ``messages`` through the chat template, ready for a reply."""
        text = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        return list(self.tokenizer.encode(text, add_special_tokens=False))


@dataclass(frozen=True)
class Plan:
    """Every prompt of every workload, built once so that each server gets the same."""

    sizes: Sizes
    system: str
    """agent: the system prompt all conversations share."""
    users: list[list[str]]
    """agent: [conversation][turn] user messages."""
    throughput_prompts: dict[int, list[str]]
    """throughput: concurrency level -> that many prompts, fresh for each level."""
    document: str
    continuations: list[str]
    """scoring: each starts with a space, to be appended to the document."""
    prefix: str
    """prefix reuse: the shared system prompt."""
    questions: list[str]


def make_plan(texts: Texts, sizes: Sizes) -> Plan:
    """Cuts every prompt from the corpus in a fixed order."""
    s = sizes
    system = "You are a coding agent. " + texts.take(s.system_tokens)
    users = [
        [texts.take(s.user_tokens) for _ in range(s.num_turns)] for _ in range(s.num_conversations)
    ]
    throughput = {
        level: [texts.take(s.throughput_prompt_tokens) for _ in range(level)]
        for level in s.throughput_levels
    }
    document = texts.take(s.document_tokens)
    continuations = [" " + texts.take(s.continuation_tokens) for _ in range(s.num_continuations)]
    prefix = texts.take(s.prefix_tokens)
    questions = [
        f"Question {i + 1}: " + texts.take(s.prefix_question_tokens)
        for i in range(s.num_prefix_requests)
    ]
    return Plan(s, system, users, throughput, document, continuations, prefix, questions)
