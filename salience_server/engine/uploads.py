"""A step's inputs, gathered on the host and sent to the device in one copy.

Token ids, positions, KV slots, block tables, context lengths and row indices are all
small int64 arrays; so are the sampler's (which rows draw, which are greedy, the tokens
a step scores or verifies), and its parameters (temperatures, top-p) are a few floats.
Sent one by one they cost a host-to-device copy each (a dozen per step, more per
sequence), and each unpinned copy makes the host wait for the device. Instead every
part is appended to one host list, which ``send`` copies once, from pinned memory and
without blocking, and each part is then a view of that one device tensor (a float part
travels as its float64 bits). On CPU the "copy" is just the tensor.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

T = TypeVar("T")


class Upload:
    """One part of a step's inputs: a view of the sent buffer once it is sent."""

    def __init__(self, uploads: Uploads, start: int, length: int) -> None:
        self._uploads = uploads
        self.start = start
        self.length = length

    @property
    def tensor(self) -> torch.Tensor:
        """[length] int64 on the device; only after ``Uploads.send``."""
        return self._uploads.sent[self.start : self.start + self.length]

    @property
    def floats(self) -> torch.Tensor:
        """[length] float32 on the device, of a part added by ``add_floats``."""
        return self.tensor.view(torch.float64).float()


class Uploads:
    """The integer parts of one forward pass's inputs (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._values: list[int] = []
        self._sent: torch.Tensor | None = None

    def add(self, values: Sequence[int]) -> Upload:
        """Appends a part; its tensor can be read once the whole is sent."""
        if self._sent is not None:
            raise RuntimeError("the step's inputs were already sent")
        start = len(self._values)
        self._values.extend(values)
        return Upload(self, start, len(values))

    def add_floats(self, values: Sequence[float]) -> Upload:
        """Appends a part of floats (as their float64 bits); read it as ``floats``."""
        return self.add(struct.unpack(f"<{len(values)}q", struct.pack(f"<{len(values)}d", *values)))

    def send(self) -> None:
        """One host-to-device copy of every part added (pinned, non-blocking on CUDA)."""
        if self.device.type == "cpu":
            self._sent = torch.tensor(self._values, dtype=torch.long)
            return
        pinned = torch.tensor(self._values, dtype=torch.long, pin_memory=True)
        # Non-blocking: the copy is ordered before the step's kernels on the stream, and
        # the step's results come back through a synchronising copy before the pinned
        # buffer could be freed.
        self._sent = pinned.to(self.device, non_blocking=True)

    @property
    def sent(self) -> torch.Tensor:
        if self._sent is None:
            raise RuntimeError("the step's inputs are read before they were sent")
        return self._sent


def planned(make: Callable[[Uploads], T], device: torch.device) -> T:
    """A plan made and sent at once, apart from a step's upload (a retried row, a test)."""
    uploads = Uploads(device)
    plan = make(uploads)
    uploads.send()
    return plan
