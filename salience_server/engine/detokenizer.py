"""Incremental detokenization that never splits a UTF-8 character, and stop strings."""

from __future__ import annotations

import functools
from typing import Any

from salience_server.engine.token_bytes import ends_inside_character, pieces_bytes

# Tokens of context decoded before the new ones, so that a leading space or a
# byte-fallback piece of the first new token renders as it would in the full text.
_NUM_CONTEXT_TOKENS = 4


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas, holding back incomplete characters."""

    def __init__(
        self, tokenizer: Any, context_ids: list[int], keep_special_tokens: bool = False
    ) -> None:
        self._tokenizer = tokenizer
        self._skips_special = not keep_special_tokens
        self._ids = list(context_ids[-_NUM_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._released = 0
        """Characters of the unread tokens' text already returned: those before a
        character their last token left incomplete."""

    def push(self, token_id: int) -> str:
        """Adds one token; returns the text it completes (may be empty): everything up
        to a character it leaves incomplete, which waits for the next tokens (a U+FFFD
        that stands for no incomplete bytes, one written or for invalid bytes, is text)."""
        self._ids.append(token_id)
        unread = self._unread()
        if not unread:  # nothing yet (a character the context began, still incomplete)
            return ""
        if unread.endswith("\ufffd") and self._ends_inside_character():
            released, self._released = (
                unread[self._released : -1],
                max(self._released, len(unread) - 1),
            )
            return released
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        released, self._released = unread[self._released :], 0
        return released

    def flush(self) -> str:
        """The text held back, at the end of the stream: an incomplete character as the
        full decode shows it (U+FFFD), so that the deltas join to the decoded text."""
        released = self._unread()[self._released :]
        self._prefix_offset = self._read_offset = len(self._ids)
        self._released = 0
        return released

    def _unread(self) -> str:
        """The text of the tokens not yet read, rendered after their context. Where the
        context ends inside a character that these tokens complete, the character comes
        whole; where they do not complete it, its U+FFFD was the context's."""
        prefix = self._decode(self._read_offset)
        text = self._decode(len(self._ids))
        if (
            self._prefix_offset == 0
            and prefix.endswith("\ufffd")
            and self._is_context_cut
            and text[len(prefix) - 1 : len(prefix)] != "\ufffd"
        ):
            prefix = prefix[:-1]
        return text[len(prefix) :]

    def _ends_inside_character(self) -> bool:
        """Whether the tokens so far end inside a UTF-8 character."""
        tail = self._ids[self._prefix_offset :]
        return ends_inside_character(b"".join(pieces_bytes(self._tokenizer, tail)))

    @functools.cached_property
    def _is_context_cut(self) -> bool:
        """The context ends inside a character (an earlier call stopped there, or a stream
        broke there): its text's last U+FFFD stands for the bytes the next tokens
        complete, and is not taken as read, so that the character comes whole. (Read
        from the bytes only when the text ends in U+FFFD, which may also be written.)"""
        context = self._ids[: self._read_offset]  # asked while nothing else was read
        return ends_inside_character(b"".join(pieces_bytes(self._tokenizer, context)))

    def _decode(self, end: int) -> str:
        return str(
            self._tokenizer.decode(
                self._ids[self._prefix_offset : end], skip_special_tokens=self._skips_special
            )
        )


class StopStringMatcher:
    """Finds stop strings in streamed text and holds back text that may start one."""

    def __init__(self, stop_strings: list[str], include_match: bool = False) -> None:
        self._stop_strings = [s for s in stop_strings if s]
        self._include_match = include_match
        """Release the matched stop string too (the text then ends just after it)."""
        self.matched = ""
        """The stop string that matched, once one has."""
        self._pending = ""  # text received but not yet released

    def push(self, delta: str, may_match: bool = True) -> tuple[str, bool]:
        """Returns (text safe to release, whether a stop string matched). With
        ``may_match`` false (before min_tokens), nothing matches and nothing is held.
        The cost per call is bounded by the stop strings' lengths: the pending text is
        never longer than the longest stop string plus ``delta``."""
        self._pending += delta
        if not self._stop_strings or not may_match:
            released, self._pending = self._pending, ""
            return released, False
        found = [(i, len(s)) for s in self._stop_strings if (i := self._pending.find(s)) >= 0]
        if found:
            # The earliest match; of those starting there, the shortest completed first.
            cut, length = min(found)
            self.matched = self._pending[cut : cut + length]
            end = cut + length if self._include_match else cut
            released, self._pending = self._pending[:end], ""
            return released, True
        keep = self._longest_partial_match()
        released = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(self._pending) - keep :]
        return released, False

    def flush(self) -> str:
        """Releases whatever was held back (the call ended without a match)."""
        released, self._pending = self._pending, ""
        return released

    def _longest_partial_match(self) -> int:
        """Length of the longest suffix of the pending text that begins a stop string."""
        best = 0
        for stop in self._stop_strings:
            for size in range(min(len(stop) - 1, len(self._pending)), best, -1):
                if self._pending.endswith(stop[:size]):
                    best = size
                    break
        return best
