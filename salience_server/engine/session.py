"""A session: committed tokens, the KV blocks that hold their keys and values."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field


class Residency(enum.Enum):
    RESIDENT = "resident"
    OFFLOADED = "offloaded"
    DROPPED = "dropped"


@dataclass(eq=False)
class Session:
    """A growing token sequence whose KV stays in the block pool between calls.

    Tokens are committed as soon as a request is accepted; their KV is computed
    lazily: ``num_computed`` tokens (a prefix) have their keys and values in
    ``block_table``, the rest are fed to the model by the next request.
    """

    session_id: str
    max_context: int
    token_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0
    """Tokens (a prefix of token_ids) whose KV is in block_table."""
    num_ever_computed: int = 0
    """Tokens (a prefix) whose KV was computed at some point: feeding them again after
    an eviction is a recomputation."""
    num_busy: int = 0
    """1 while a Generate call owns the session."""
    is_closed: bool = False
    residency: Residency = Residency.RESIDENT
    host_kv_bytes: int = 0
    """Bytes of this session's KV held in host memory while offloaded."""
    last_used: float = field(default_factory=time.monotonic)

    @property
    def length(self) -> int:
        return len(self.token_ids)

    @property
    def is_busy(self) -> bool:
        return self.num_busy > 0

    def rewind(self, offset: int) -> None:
        """Forgets every token from ``offset`` on (the caller frees their blocks)."""
        del self.token_ids[offset:]
        self.num_computed = min(self.num_computed, offset)
        self.num_ever_computed = min(self.num_ever_computed, offset)

    def mark_computed(self, start: int, end: int) -> int:
        """Records that positions start .. end - 1 now have KV; returns how many of
        them had it before (recomputed)."""
        recomputed = max(0, min(end, self.num_ever_computed) - start)
        self.num_computed = end
        self.num_ever_computed = max(self.num_ever_computed, end)
        return recomputed

    def touch(self) -> None:
        self.last_used = time.monotonic()

    def idle_seconds(self) -> float:
        return 0.0 if self.is_busy else time.monotonic() - self.last_used
