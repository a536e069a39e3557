"""The shim's stand-ins for images in its token lists: a negative pseudo id per image,
repeated once per placeholder token the server gives it, and the placeholder counts of
the images it has seen lately."""

from __future__ import annotations

import collections
import hashlib
from typing import Any


def image_marker(data: bytes) -> int:
    """A negative pseudo token id standing for an image's placeholders in the shim's
    token lists (never sent to the server)."""
    return -1 - int.from_bytes(hashlib.sha256(data).digest()[:4], "big") % (2**31 - 1)


MAX_KNOWN_IMAGES = 4096
"""Images whose placeholder counts the shim keeps (a screenshot agent sends new ones
without end)."""


class RecentCounts(collections.OrderedDict[int, int]):
    """The ``MAX_KNOWN_IMAGES`` most recently stored or read entries (an image a
    conversation keeps is read at each of its turns: its count must stay, or the next
    turn's prompt would hold one placeholder where its session holds them all)."""

    def __setitem__(self, key: int, value: int) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > MAX_KNOWN_IMAGES:
            self.popitem(last=False)

    def get(self, key: int, default: Any = None) -> Any:
        if key in self:
            self.move_to_end(key)
        return super().get(key, default)
