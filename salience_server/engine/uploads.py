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
        self._parts: list[list[int] | torch.Tensor] = []
        """The host tensors added (``add_tensor``) and the runs of values between them."""
        self._values: list[int] = []
        """The values added since the last host tensor."""
        self._length = 0
        self._sent: torch.Tensor | None = None

    def add(self, values: Sequence[int]) -> Upload:
        """Appends a part; its tensor can be read once the whole is sent."""
        self._check_open()
        self._values.extend(values)
        return self._appended(len(values))

    def add_floats(self, values: Sequence[float]) -> Upload:
        """Appends a part of floats (as their float64 bits); read it as ``floats``."""
        return self.add(struct.unpack(f"<{len(values)}q", struct.pack(f"<{len(values)}d", *values)))

    def add_tensor(self, values: torch.Tensor) -> Upload:
        """Appends a host tensor of integers as a part (widened to int64), without
        making Python values of it (a grammar's bitmask has thousands of words)."""
        self._check_open()
        self._flush_values()
        self._parts.append(values.reshape(-1))
        return self._appended(values.numel())

    def send(self) -> None:
        """One host-to-device copy of every part added (pinned, non-blocking on CUDA)."""
        self._check_open()
        self._flush_values()
        pinned = self.device.type != "cpu"
        host = torch.empty(self._length, dtype=torch.long, pin_memory=pinned)
        parts = [
            torch.tensor(p, dtype=torch.long) if isinstance(p, list) else p for p in self._parts
        ]
        if parts:
            torch.cat(parts, out=host)
        if not pinned:
            self._sent = host
            return
        # Non-blocking: the copy is ordered before the step's kernels on the stream. The
        # pinned buffer is let go when this returns, which is safe: torch's pinned-memory
        # cache records an event on the copy and reuses the block only once it is done.
        self._sent = host.to(self.device, non_blocking=True)

    def _appended(self, length: int) -> Upload:
        self._length += length
        return Upload(self, self._length - length, length)

    def _flush_values(self) -> None:
        if self._values:
            self._parts.append(self._values)
            self._values = []

    def _check_open(self) -> None:
        if self._sent is not None:
            raise RuntimeError("the step's inputs were already sent")

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
