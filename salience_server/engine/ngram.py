"""Draft tokens from a session's own history: prompt-lookup (n-gram) speculation.

An agent's replies repeat what its session already holds: file contents, tool output,
identifiers. When the last ``n`` tokens occurred earlier, the tokens that followed them
then are a good guess for what follows now; one forward pass verifies the guess.

Each session keeps its ``NgramIndex`` across calls: for every n-gram (``min_n`` to
``max_n`` tokens) that has a following token, where its occurrences end. It grows with
each committed token and is never rebuilt per step; a rewind only moves its watermark
back (positions past it are indexed again as tokens come, and every hit is checked
against the tokens before it is used). The index is plain Python: no tensors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from salience_server.config import EngineConfig
from salience_server.engine import draft_cost
from salience_server.engine.draft_cost import DraftCost

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from salience_server.engine.model_runner import ModelRunner


@dataclass
class NgramIndex:
    min_n: int
    max_n: int
    ends: dict[tuple[int, ...], list[int]] = field(default_factory=dict)
    """n-gram -> the positions just after its indexed occurrences, ascending."""
    num_indexed: int = 0
    """n-grams ending at positions below this are indexed (each has a next token)."""

    def sync(self, token_ids: list[int]) -> None:
        """Indexes the n-grams that gained a following token since the last call."""
        for end in range(max(self.num_indexed, 1), len(token_ids)):
            for n in range(self.min_n, min(self.max_n, end) + 1):
                ends = self.ends.setdefault(tuple(token_ids[end - n : end]), [])
                while ends and ends[-1] >= end:  # left from before a rewind
                    ends.pop()
                ends.append(end)
        self.num_indexed = max(self.num_indexed, len(token_ids))

    def propose(self, token_ids: list[int], num_tokens: int) -> list[int]:
        """Up to ``num_tokens`` tokens that followed the longest n-gram ending the
        sequence, at the occurrence whose preceding tokens agree longest with the
        sequence's (up to ``CONTEXT_CHECKED``; the earliest among equals, as vLLM's
        proposer takes), among its latest ``CANDIDATES_CHECKED`` occurrences; none when
        no suffix recurs."""
        if num_tokens <= 0:
            return []
        self.sync(token_ids)
        length = len(token_ids)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            suffix = token_ids[length - n :]
            best_end, best_context = -1, -1
            for end in self.ends.get(tuple(suffix), ())[-CANDIDATES_CHECKED:]:
                # Entries from before a rewind may no longer hold this n-gram.
                if end >= length or token_ids[end - n : end] != suffix:
                    continue
                context = shared_context(token_ids, end - n, length - n)
                if context > best_context:
                    best_end, best_context = end, context
            if best_end >= 0:
                return token_ids[best_end : best_end + num_tokens]
        return []

    def rewind(self, length: int) -> None:
        """The sequence was cut to ``length`` tokens."""
        self.num_indexed = min(self.num_indexed, length)

    def copy(self) -> NgramIndex:
        ends = {key: list(value) for key, value in self.ends.items()}
        return NgramIndex(self.min_n, self.max_n, ends, self.num_indexed)


CANDIDATES_CHECKED = 32
"""Occurrences of the matched n-gram compared by their preceding tokens: the latest."""
CONTEXT_CHECKED = 32
"""Preceding tokens compared, at most. Measured on the speculative benchmark's replies
(greedy, at 4 drafts a step, drafting whenever there is a match): the latest occurrence
of the n-gram gave 2.73 tokens a step on the edit and 4.18 on the summary; the earliest
2.93 and 4.47; the longest agreeing context, then the earliest, 2.97 and 5.00."""


def shared_context(token_ids: list[int], first: int, second: int) -> int:
    """How many tokens (up to ``CONTEXT_CHECKED``) before ``first`` equal those before
    ``second``, counting back from each."""
    count = 0
    while (
        count < CONTEXT_CHECKED
        and count < first
        and token_ids[first - 1 - count] == token_ids[second - 1 - count]
    ):
        count += 1
    return count


@dataclass
class Acceptance:
    """A session's running estimate of the chance that a draft token is accepted (each
    draft is accepted only after all before it were): decayed counts of acceptances and
    rejections, with a uniform prior."""

    hits: float = 0.0
    misses: float = 0.0
    steps_since_drafts: int = 0

    def record(self, num_drafted: int, num_accepted: int) -> None:
        self.hits = ACCEPTANCE_DECAY * self.hits + num_accepted
        self.misses = ACCEPTANCE_DECAY * self.misses + (num_accepted < num_drafted)

    @property
    def rate(self) -> float:
        return (self.hits + 1) / (self.hits + self.misses + 2)


ACCEPTANCE_DECAY = 0.8
PROBE_EVERY = 16
"""Decode steps without drafts after which full-length drafts are tried anyway, to
notice when a session starts repeating itself."""


def best_draft_length(rate: float, cost: DraftCost, max_length: int) -> int:
    """The draft length that maximises expected tokens per unit of step cost: d drafts
    emit 1 + p + ... + p^d tokens on average, at ``cost.steps(d)``."""
    best, best_rate = 0, 1.0
    expected, term = 1.0, 1.0
    for length in range(1, max_length + 1):
        term *= rate
        expected += term
        tokens_per_cost = expected / cost.steps(length)
        if tokens_per_cost > best_rate:
            best, best_rate = length, tokens_per_cost
    return best


@dataclass(frozen=True)
class NgramProposer:
    """Proposes drafts from each session's index (made on first use), as many as pay
    off at the session's acceptance rate."""

    num_speculative_tokens: int
    min_n: int
    max_n: int
    cost: DraftCost

    def propose(self, session: SessionLike, limit: int) -> list[int]:
        """At most ``min(limit, num_speculative_tokens)`` draft tokens for ``session``."""
        if session.ngram_index is None:
            session.ngram_index = NgramIndex(self.min_n, self.max_n)
        acceptance = session.acceptance
        length = best_draft_length(acceptance.rate, self.cost, self.num_speculative_tokens)
        if length == 0 and acceptance.steps_since_drafts >= PROBE_EVERY:
            length = self.num_speculative_tokens
        drafts = session.ngram_index.propose(session.token_ids, min(limit, length))
        acceptance.steps_since_drafts = 0 if drafts else acceptance.steps_since_drafts + 1
        return drafts


def draft_proposer(
    config: EngineConfig, runner: ModelRunner, uses_mrope: bool, max_context: int | None = None
) -> NgramProposer | None:
    """The configured proposer (None when speculation is off), with the verification
    cost ``--speculative-cost`` gives, or else the one measured on ``runner`` (within
    ``max_context`` positions: ``draft_cost.measure``)."""
    if config.speculative != "ngram":
        return None
    if config.speculative_cost is not None:
        cost = DraftCost(*config.speculative_cost)
        log.info(
            "speculation: a step verifying d drafts costs 1 + %.2f + %.2f d plain steps "
            "(--speculative-cost)",
            cost.switch,
            cost.row,
        )
    else:
        cost = draft_cost.measure(runner, config.num_speculative_tokens, uses_mrope, max_context)
    return NgramProposer(
        config.num_speculative_tokens, config.prompt_lookup_min, config.prompt_lookup_max, cost
    )


class SessionLike(Protocol):
    """What the proposer reads and keeps on a session (``session.Session``)."""

    token_ids: list[int]
    ngram_index: NgramIndex | None
    acceptance: Acceptance
