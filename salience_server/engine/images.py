"""Image embeddings kept for the placeholder tokens of every session's images.

The KV of an image's placeholders is computed from its vision embeddings; they are
kept while the image is in a session, so the KV can be recomputed after an eviction
or a rewind that stops just after the image. They live in host memory, counted
against the host budget (``Evictor.hold_image``) once however many forks share them,
and reach the device only when their placeholders are fed.
"""

from __future__ import annotations

import uuid
from typing import Any

from salience_server.engine.evictor import Evictor
from salience_server.engine.session import ImageSpan, Session
from salience_server.engine.vision import EncodedImage


def embeds_bytes(image: EncodedImage) -> int:
    return image.embeds.numel() * image.embeds.element_size()


class ImageStore:
    def __init__(self, evictor: Evictor) -> None:
        self.evictor = evictor
        self._embeds: dict[str, Any] = {}  # image key -> [num_tokens, hidden] host tensor
        self._owners: dict[str, str] = {}  # image key -> key of the first copy
        self._num_users: dict[str, int] = {}  # first copy's key -> keys sharing it

    def add(self, session: Session, image: EncodedImage) -> ImageSpan:
        """Registers an image appended at the end of ``session`` (the caller checked
        ``Evictor.can_hold_image``)."""
        key = uuid.uuid4().hex
        self.evictor.hold_image(embeds_bytes(image))
        self._embeds[key] = image.embeds.to("cpu")
        self._owners[key] = key
        self._num_users[key] = 1
        return ImageSpan(
            start=session.length,
            num_tokens=int(image.embeds.shape[0]),
            rope_start=session.next_rope_position(),
            grid=image.grid,
            image_key=key,
        )

    def copy(self, session: Session, span: ImageSpan) -> ImageSpan:
        """The same image in another session (a fork), under its own key."""
        key = uuid.uuid4().hex
        owner = self._owners[span.image_key]
        self._embeds[key] = self._embeds[span.image_key]
        self._owners[key] = owner
        self._num_users[owner] += 1
        return ImageSpan(span.start, span.num_tokens, span.rope_start, span.grid, key)

    def drop(self, spans: list[ImageSpan]) -> None:
        """Forgets these images; the last copy gives its host memory back."""
        for span in spans:
            embeds = self._embeds.pop(span.image_key, None)
            if embeds is None:
                continue
            owner = self._owners.pop(span.image_key)
            self._num_users[owner] -= 1
            if self._num_users[owner] == 0:
                del self._num_users[owner]
                self.evictor.release_image(embeds.numel() * embeds.element_size())

    def bytes_freed_by_dropping(self, spans: list[ImageSpan]) -> int:
        """The host memory ``drop(spans)`` would give back: the embeddings of which
        ``spans`` hold every copy left (a fork may share the others)."""
        dropping: dict[str, int] = {}
        freed = 0
        for span in spans:
            embeds = self._embeds.get(span.image_key)
            if embeds is None:
                continue
            owner = self._owners[span.image_key]
            dropping[owner] = dropping.get(owner, 0) + 1
            if dropping[owner] == self._num_users[owner]:
                freed += embeds.numel() * embeds.element_size()
        return freed

    def rows(self, session: Session, start: int, end: int, first_row: int) -> list[tuple[int, Any]]:
        """(batch row, embeddings) for the image tokens among positions start .. end - 1
        of ``session``, fed from batch row ``first_row``."""
        rows = []
        for span in session.images:
            low, high = max(start, span.start), min(end, span.end)
            if low < high:
                embeds = self._embeds[span.image_key][low - span.start : high - span.start]
                rows.append((first_row + low - start, embeds))
        return rows

    def num_bytes(self) -> int:
        """Host memory the kept embeddings take, each shared tensor once."""
        unique = {id(t): t.numel() * t.element_size() for t in self._embeds.values()}
        return sum(unique.values())

    def __len__(self) -> int:
        return len(self._embeds)
