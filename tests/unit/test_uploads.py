"""A step's inputs as one buffer: each part reads back what was added, in order,
whether values, floats or host tensors, and nothing can be added once it is sent."""

from __future__ import annotations

import pytest
import torch

from salience_server.engine.uploads import Uploads


def test_each_part_reads_back_what_was_added() -> None:
    uploads = Uploads(torch.device("cpu"))
    first = uploads.add([3, -1, 2**40])
    floats = uploads.add_floats([0.5, -1e-7, 3.0e38])
    words = uploads.add_tensor(torch.tensor([[-(2**31), 7], [2**31 - 1, 0]], dtype=torch.int32))
    empty = uploads.add([])
    last = uploads.add([9])
    uploads.send()
    assert first.tensor.tolist() == [3, -1, 2**40]
    assert floats.floats.tolist() == torch.tensor([0.5, -1e-7, 3.0e38]).tolist()
    assert words.tensor.tolist() == [-(2**31), 7, 2**31 - 1, 0]
    assert empty.tensor.tolist() == [] and last.tensor.tolist() == [9]
    assert uploads.sent.dtype == torch.long and uploads.sent.numel() == 3 + 3 + 4 + 1
    with pytest.raises(RuntimeError, match="already sent"):
        uploads.add([1])


def test_a_part_read_before_the_send_is_refused() -> None:
    uploads = Uploads(torch.device("cpu"))
    part = uploads.add([1])
    with pytest.raises(RuntimeError, match="before they were sent"):
        _ = part.tensor
