"""Image embeddings kept for the placeholder tokens of every session's images.

The KV of an image's placeholders is computed from its vision embeddings; they are
kept while the image is in a session, so the KV can be recomputed after an eviction
or a rewind that stops just after the image.
"""

from __future__ import annotations

import uuid
from typing import Any

from salience_server.engine.session import ImageSpan, Session
from salience_server.engine.vision import EncodedImage


class ImageStore:
    def __init__(self) -> None:
        self._embeds: dict[str, Any] = {}  # image key -> [num_tokens, hidden] tensor

    def add(self, session: Session, image: EncodedImage) -> ImageSpan:
        """Registers an image appended at the end of ``session``."""
        key = uuid.uuid4().hex
        self._embeds[key] = image.embeds
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
        self._embeds[key] = self._embeds[span.image_key]
        return ImageSpan(span.start, span.num_tokens, span.rope_start, span.grid, key)

    def drop(self, spans: list[ImageSpan]) -> None:
        for span in spans:
            self._embeds.pop(span.image_key, None)

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

    def __len__(self) -> int:
        return len(self._embeds)
