"""``ResponseStore``: stored Responses, for ``previous_response_id`` and GET by id.

A stored response remembers the conversation it ended (as Chat Completions messages)
and the exact tokens its session holds, so that a chained request continues that
session: it appends only the new input. A streamed response is stored from its start
(``in_progress``) and replaced as it ends, ``failed`` and ``cancelled`` (its client
went away) included, so that its id, once sent, can be read back. The store is
bounded in responses, in the token ids they keep (each holds its whole conversation's:
a long-context model's responses took ~36 bytes a token, GBs at 1,024 of them), and in
the bytes of the images they keep (a chained request appends them to a session made
again); the least recently used responses are forgotten first, after which their ids
give 404.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from salience_server.http.messages import ImageInput


@dataclass
class StoredResponse:
    """One finished response and what a chained request needs to continue it."""

    response: dict[str, Any]
    """The Response object, as it was returned (or as far as its stream came)."""
    conversation: list[dict[str, Any]] = field(default_factory=list)
    """Every message so far as Chat Completions messages, this response's reply last
    (the instructions are not among them: they apply to one request only)."""
    rendered_ids: list[int] = field(default_factory=list)
    """The chat template's rendering of the conversation this response answered (up to
    the assistant turn's opening): what a chained rendering must start with."""
    session_ids: list[int] = field(default_factory=list)
    """Exactly what the session holds after this response: its prompt and every decoded
    token (the end-of-turn token included when the model produced it); empty after a
    forced tool call, whose session lacks the call's closing: a chained request is
    rendered afresh."""
    images: list[ImageInput] = field(default_factory=list)
    """Every image of the conversation, in order."""

    @property
    def num_tokens(self) -> int:
        """The token ids it keeps."""
        return len(self.rendered_ids) + len(self.session_ids)

    @property
    def can_continue(self) -> bool:
        """A finished response (completed, or cut by ``max_output_tokens``) can be
        continued; one still streaming, failed or cancelled is kept only to be read."""
        return self.response["status"] in CONTINUABLE


CONTINUABLE = ("completed", "incomplete")


class ResponseStore:
    """Response id to StoredResponse, least recently used forgotten beyond ``max_responses``,
    ``max_tokens`` token ids or ``max_image_bytes`` of images (an image a chain shares
    counted once); the one just stored is kept whatever it takes."""

    def __init__(
        self, max_responses: int, max_image_bytes: int = 256 << 20, max_tokens: int = 4 << 20
    ) -> None:
        self.max_responses = max_responses
        self.max_image_bytes = max_image_bytes
        self.max_tokens = max_tokens
        self._responses: OrderedDict[str, StoredResponse] = OrderedDict()
        self._num_tokens = 0
        self._images: dict[int, list[int]] = {}
        """id of an image's bytes -> [their length, the responses keeping them]."""
        self._image_bytes = 0

    def __len__(self) -> int:
        return len(self._responses)

    def put(self, stored: StoredResponse, replacing: bool = False) -> None:
        """Keeps ``stored`` under its response id, forgetting the oldest beyond the bound.
        ``replacing``: only in place of the one stored under that id (a streamed
        response as it ends), which a DELETE meanwhile, or the bound, has forgotten."""
        response_id = stored.response["id"]
        if replacing and response_id not in self._responses:
            return
        self.delete(response_id)
        self._responses[response_id] = stored
        self._count_in(stored, 1)
        while len(self._responses) > self.max_responses:
            self._forget_oldest()
        while len(self._responses) > 1 and (
            self._image_bytes > self.max_image_bytes or self._num_tokens > self.max_tokens
        ):
            self._forget_oldest()

    def num_tokens(self) -> int:
        """The token ids kept."""
        return self._num_tokens

    def image_bytes(self) -> int:
        """The bytes of the images kept, each image once."""
        return self._image_bytes

    def get(self, response_id: str) -> StoredResponse | None:
        """The stored response, or None if unknown or forgotten."""
        stored = self._responses.get(response_id)
        if stored is not None:
            self._responses.move_to_end(response_id)
        return stored

    def delete(self, response_id: str) -> bool:
        """Forgets a response; False if it was not there."""
        stored = self._responses.pop(response_id, None)
        if stored is None:
            return False
        self._count_in(stored, -1)
        return True

    def _forget_oldest(self) -> None:
        _, stored = self._responses.popitem(last=False)
        self._count_in(stored, -1)

    def _count_in(self, stored: StoredResponse, change: int) -> None:
        """Counts ``stored``'s tokens and images in (``change`` 1) or out (-1)."""
        self._num_tokens += change * stored.num_tokens
        self._count_images(stored, change)

    def _count_images(self, stored: StoredResponse, change: int) -> None:
        """Counts ``stored``'s images in (``change`` 1) or out (-1), each image once."""
        for key, data in {id(image.data): image.data for image in stored.images}.items():
            if change > 0:
                entry = self._images.setdefault(key, [len(data), 0])
                self._image_bytes += entry[0] if entry[1] == 0 else 0
                entry[1] += 1
            elif (kept := self._images.get(key)) is not None:
                kept[1] -= 1
                if kept[1] == 0:
                    self._image_bytes -= kept[0]
                    del self._images[key]
