"""``History``: what a session holds as far as its client knows, kept so that a session
lost with its replica can be re-created elsewhere by replaying it (SPEC 2.7).

It is always a prefix of the server's truth: the tokens the client sent or received, and
the images it appended, in order. After a call that ended without its Done the server
may hold more than the history does; such a session can still be replayed up to the
history's length (a later call that rewinds to within it needs no more).
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field

IMAGE_PLACEHOLDER = -1
"""Stands, in ``History.token_ids``, for each placeholder position of an image."""


@dataclass(frozen=True)
class ImageRecord:
    """An image appended to the session, kept to append it again on a replay."""

    position: int
    """The session position of its first placeholder token."""
    num_tokens: int
    """Placeholder tokens it became."""
    data: bytes
    mime_type: str


@dataclass(frozen=True)
class PrefillStep:
    """Append ``token_ids`` at ``offset`` (a prefill-only Generate)."""

    offset: int
    token_ids: list[int]


@dataclass(frozen=True)
class ImageStep:
    """Append ``image`` at ``offset`` (AppendImage)."""

    offset: int
    image: ImageRecord


ReplayStep = PrefillStep | ImageStep


@dataclass
class History:
    """Committed tokens and images of one session, in position order."""

    token_ids: array[int] = field(default_factory=lambda: array("i"))
    """One id per position, IMAGE_PLACEHOLDER at image positions (4 bytes each: long
    sessions, many of them)."""
    images: list[ImageRecord] = field(default_factory=list)

    @property
    def length(self) -> int:
        """Positions known."""
        return len(self.token_ids)

    def copy(self) -> History:
        """An independent copy (a fork starts from its parent's)."""
        return History(array("i", self.token_ids), list(self.images))

    def truncate(self, length: int) -> None:
        """Keeps the first ``length`` positions (an image cut in two is dropped whole,
        with everything after its start)."""
        for image in self.images:
            if image.position < length < image.position + image.num_tokens:
                length = image.position
        del self.token_ids[length:]
        self.images = [image for image in self.images if image.position < length]

    def extend(self, token_ids: Iterable[int]) -> None:
        """Appends text tokens."""
        self.token_ids.extend(token_ids)

    def add_image(self, data: bytes, mime_type: str, num_tokens: int) -> None:
        """Appends an image that became ``num_tokens`` placeholders."""
        self.images.append(ImageRecord(self.length, num_tokens, data, mime_type))
        self.token_ids.extend([IMAGE_PLACEHOLDER] * num_tokens)

    def replay_steps(self, length: int) -> list[ReplayStep]:
        """The calls that rebuild the first ``length`` positions on an empty session:
        one prefill per run of text, one AppendImage per image."""
        if length > self.length:
            raise ValueError(f"the history holds {self.length} positions, not {length}")
        steps: list[ReplayStep] = []
        start = 0
        for image in self.images:
            if image.position >= length:
                break
            if image.position > start:
                steps.append(PrefillStep(start, self.token_ids[start : image.position].tolist()))
            steps.append(ImageStep(image.position, image))
            start = image.position + image.num_tokens
        if start < length:
            steps.append(PrefillStep(start, self.token_ids[start:length].tolist()))
        return steps
