"""A session: committed tokens, the KV blocks that hold their keys and values."""

from __future__ import annotations

import enum
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from salience_server.engine.ngram import Acceptance, NgramIndex

if TYPE_CHECKING:
    from salience_server.engine.request import Request


@dataclass(frozen=True)
class ImageSpan:
    """An image's placeholder tokens in a session, and where its rotary grid sits.

    With multi-dimensional rotary positions (Qwen2-VL), the image's tokens take grid
    positions (t, h, w) offset by ``rope_start``, and the text after it continues at
    ``rope_start + rope_advance``, not at the next index.
    """

    start: int
    """Session index of the first placeholder token."""
    num_tokens: int
    rope_start: int
    grid: tuple[int, int, int]
    """Merged (t, h, w) grid of placeholder tokens: t * h * w == num_tokens."""
    image_key: str
    """The key of the image's embeddings in the engine's image store."""

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def rope_advance(self) -> int:
        return max(self.grid[1], self.grid[2])

    def rope_position(self, index: int) -> tuple[int, int, int]:
        """(t, h, w) rotary position of session index ``index`` inside the image."""
        _, height, width = self.grid
        offset = index - self.start
        t, rest = divmod(offset, height * width)
        h, w = divmod(rest, width)
        return (self.rope_start + t, self.rope_start + h, self.rope_start + w)


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
    owner: Request | None = None
    """The request of the call that owns the session (Generate, AppendImage), while
    one does: one at a time."""
    free_waiters: list[Future[None]] = field(default_factory=list)
    """Calls waiting for the session to be free (``Engine.end_of_cancelled_call``),
    told when its owner ends."""
    is_closed: bool = False
    num_preparing: int = 0
    """Calls on the session being prepared off the engine (an image decoded and encoded,
    a constraint compiled, a turn waited for) before they own it: never idle meanwhile."""
    residency: Residency = Residency.RESIDENT
    host_kv_bytes: int = 0
    """Bytes of this session's KV held in host memory while offloaded."""
    last_used: float = field(default_factory=time.monotonic)
    """When a call last worked on the session or its client last read one of its
    events (``Engine.delivered``): a client still reading a finished call's stream keeps
    it alive, one that stopped reading does not."""
    images: list[ImageSpan] = field(default_factory=list)
    """Image placeholder spans, in session order."""
    ngram_index: NgramIndex | None = None
    """Speculative decoding's index of this session's n-grams, kept across calls."""
    acceptance: Acceptance = field(default_factory=Acceptance)
    """How often this session's drafts were accepted (it sets the draft length)."""

    @property
    def length(self) -> int:
        return len(self.token_ids)

    @property
    def is_busy(self) -> bool:
        return self.owner is not None

    def free_of_owner(self) -> None:
        """Its call ended: the session is free, and the calls waiting for that are told."""
        self.owner = None
        waiters, self.free_waiters = self.free_waiters, []
        for waiter in waiters:
            try:
                waiter.set_result(None)
            except InvalidStateError:
                pass  # the waiting call stopped waiting

    def rewind(self, offset: int) -> list[ImageSpan]:
        """Forgets every token from ``offset`` on (the caller frees their blocks and
        the returned images' embeddings). ``offset`` must not cut an image."""
        dropped = [image for image in self.images if image.start >= offset]
        self.images = [image for image in self.images if image.start < offset]
        del self.token_ids[offset:]
        if self.ngram_index is not None:
            self.ngram_index.rewind(offset)
        self.num_computed = min(self.num_computed, offset)
        self.num_ever_computed = min(self.num_ever_computed, offset)
        return dropped

    def is_image_position(self, index: int) -> bool:
        """Whether ``index`` holds an image placeholder (it has no logprob)."""
        return any(image.start <= index < image.end for image in self.images)

    def image_cut_by(self, offset: int) -> ImageSpan | None:
        """The image that a rewind to ``offset`` would cut in two, if any."""
        return next((i for i in self.images if i.start < offset < i.end), None)

    def next_rope_position(self) -> int:
        """The rotary position the next appended token takes."""
        return self.rope_position(self.length) if self.length else 0

    def rope_position(self, index: int) -> int:
        """Rotary position of text at ``index`` (the index, shifted by the images before)."""
        shift = sum(i.rope_advance - i.num_tokens for i in self.images if i.end <= index)
        return index + shift

    def rope_positions(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """(t, h, w) rotary positions of indices start .. end - 1 (text: all three equal)."""
        positions = []
        for index in range(start, end):
            image = next((i for i in self.images if i.start <= index < i.end), None)
            if image is not None:
                positions.append(image.rope_position(index))
            else:
                position = self.rope_position(index)
                positions.append((position, position, position))
        return positions

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
        """0 while a call owns the session or one is being prepared for it, else the
        time since ``last_used``."""
        if self.is_busy or self.num_preparing:
            return 0.0
        return time.monotonic() - self.last_used
