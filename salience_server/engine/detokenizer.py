"""Incremental detokenization that never splits a UTF-8 character, and stop strings."""

from __future__ import annotations

from typing import Any

from salience_server.engine.token_bytes import (
    incomplete_tail_of,
    is_byte_level,
    pieces_bytes,
    skipped_special_ids,
)

# Tokens of context decoded before the new ones, so that a leading space or a
# byte-fallback piece of the first new token renders as it would in the full text.
_NUM_CONTEXT_TOKENS = 4
CONTEXT_TAIL = 16
"""Context tokens to give a detokenizer: more than it reads (``_NUM_CONTEXT_TOKENS``, and
before them at most three of a character they begin inside), so that callers need not
copy a long session's tokens."""


def _context_window(tokenizer: Any, context_ids: list[int]) -> list[int]:
    """The last ``_NUM_CONTEXT_TOKENS`` tokens of the context, and before them those
    that hold the rest of a character they begin inside (byte pieces of one character,
    which SentencePiece's byte fallback shows all as U+FFFD when cut)."""
    start = max(0, len(context_ids) - _NUM_CONTEXT_TOKENS)
    for _ in range(3):  # a character has at most three bytes after its first
        if start == 0:
            break
        first = pieces_bytes(tokenizer, context_ids[start : start + 1])[0][:1]
        if not first or first[0] & 0xC0 != 0x80:  # not a continuation byte
            break
        start -= 1
    return list(context_ids[start:])


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas, holding back incomplete characters."""

    def __init__(
        self, tokenizer: Any, context_ids: list[int], keep_special_tokens: bool = False
    ) -> None:
        self._tokenizer = tokenizer
        self._skipped = skipped_special_ids(tokenizer) if not keep_special_tokens else frozenset()
        """Ids that add no text: pushed, they release nothing and read nothing, so that
        a character they fall inside comes whole, as the full decode joins it."""
        self._ids = _context_window(tokenizer, context_ids)
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._released = 0
        """Characters of the unread tokens' text already returned: those before a
        character their last token left incomplete (byte-level tokenizers)."""
        self._byte_level = is_byte_level(tokenizer)
        self._context_tail = incomplete_tail_of(tokenizer, self._ids)
        """Bytes at the context's end that begin a character it does not complete, until
        the tokens after them are read."""
        if self._context_tail and not self._byte_level:
            # Byte pieces, one byte each: unread, so that a character they begin comes
            # whole once completed.
            self._read_offset = max(0, len(self._ids) - self._context_tail)

    def push(self, token_id: int) -> str:
        """Adds one token; returns the text it completes (may be empty): everything up
        to a character it leaves incomplete, which waits for the tokens that complete it
        (a U+FFFD that stands for no incomplete bytes, one written or for invalid bytes,
        is text)."""
        self._ids.append(token_id)
        if token_id in self._skipped:
            return ""
        unread = self._unread()
        if not unread:  # nothing yet (a character the context began, still incomplete)
            return ""
        # Bytes that end inside a character show as U+FFFD: only then are they read.
        if unread.endswith("\ufffd") and incomplete_tail_of(
            self._tokenizer, [t for t in self._ids[self._prefix_offset :] if t not in self._skipped]
        ):
            # Byte-level, the text before that U+FFFD is whole; through byte fallback
            # a whole character in a run of byte pieces shows as U+FFFD too, so all waits
            # (whole characters come in other pieces than the byte pieces of a cut one).
            whole = unread[:-1] if self._byte_level else ""
            released, self._released = whole[self._released :], max(self._released, len(whole))
            return released
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._context_tail = 0  # read now, with whatever completed it
        released, self._released = unread[self._released :], 0
        return released

    def flush(self) -> str:
        """The text held back, at the end of the stream: an incomplete character as the
        full decode shows it (U+FFFD), so that the deltas join to the decoded text."""
        released = self._unread()[self._released :]
        self._prefix_offset = self._read_offset = len(self._ids)
        self._released = self._context_tail = 0
        return released

    def _unread(self) -> str:
        """The text of the tokens not yet read, rendered after their context. Where the
        context ends inside a character that these tokens complete, the character comes
        whole; where they do not complete it, its U+FFFD was the context's text."""
        prefix = self._decode(self._read_offset)
        text = self._decode(len(self._ids))
        start = len(prefix)
        if self._context_tail:  # not yet read past
            if self._byte_level:  # the context's text ends in one U+FFFD for its tail
                if text[start - 1 : start] != prefix[start - 1 :]:  # completed
                    start -= 1
            elif text[start : start + self._context_tail] == "\ufffd" * self._context_tail:
                start += self._context_tail  # its byte pieces' U+FFFD were the context's
        return text[start:]

    def _decode(self, end: int) -> str:
        return str(
            self._tokenizer.decode(
                self._ids[self._prefix_offset : end], skip_special_tokens=bool(self._skipped)
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
