"""The shapes of the peer workloads: the issue's full sizes, and a quick form that runs
in well under two minutes (for CI's smoke test and for trying a change)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Sizes:
    """Every count of every workload; token counts are approximate (text is cut to them
    with the model's tokenizer, then rendered through each server's own template)."""

    num_conversations: int = 8
    """agent: conversations running at once."""
    num_turns: int = 12
    """agent: turns of each conversation."""
    system_tokens: int = 300
    """agent: the system prompt every conversation opens with."""
    user_tokens: int = 70
    """agent: each user turn."""
    turn_decode_tokens: int = 32
    """agent: greedy tokens streamed back each turn."""
    throughput_levels: tuple[int, ...] = (1, 2, 4, 8, 16)
    """throughput: how many independent requests run at once, one run per level; the
    headline figure is the last (largest) level."""
    throughput_prompt_tokens: int = 200
    throughput_decode_tokens: int = 128
    document_tokens: int = 500
    """scoring: the shared document every continuation follows."""
    num_continuations: int = 100
    continuation_tokens: int = 30
    scoring_concurrency: int = 16
    """scoring: requests in flight at once (the client's batch)."""
    scoring_time_limit_s: float = 600.0
    """scoring: requests not answered by then are cancelled, and the rate is over those
    scored (a server that computes whole-vocabulary logprobs for every prompt position,
    one request at a time, would take hours)."""
    prefix_tokens: int = 1000
    """prefix reuse: the system prompt the sequential requests share."""
    num_prefix_requests: int = 16
    prefix_question_tokens: int = 24
    prefix_decode_tokens: int = 16

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


FULL = Sizes()
QUICK = Sizes(
    num_conversations=2,
    num_turns=3,
    system_tokens=60,
    user_tokens=20,
    turn_decode_tokens=8,
    throughput_levels=(1, 4),
    throughput_prompt_tokens=40,
    throughput_decode_tokens=16,
    document_tokens=100,
    num_continuations=8,
    continuation_tokens=10,
    scoring_concurrency=4,
    scoring_time_limit_s=60.0,
    prefix_tokens=200,
    num_prefix_requests=4,
    prefix_question_tokens=12,
    prefix_decode_tokens=4,
)
