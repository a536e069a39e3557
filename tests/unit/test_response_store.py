"""The Responses store's bounds: responses, and the bytes of the images they keep."""

from __future__ import annotations

from salience_server.http.messages import ImageInput
from salience_server.http.response_store import ResponseStore, StoredResponse


def _stored(response_id: str, images: list[ImageInput]) -> StoredResponse:
    return StoredResponse({"id": response_id, "status": "completed"}, images=images)


def test_images_are_bounded_in_bytes_each_counted_once() -> None:
    """Stored by default with every image of their conversation, responses were bounded
    by count alone: 1,024 of 20 MiB images is 20 GiB of the shim's memory. The oldest go
    first past the byte bound; an image a chain of responses shares counts once."""
    store = ResponseStore(max_responses=100, max_image_bytes=2500)
    photo = ImageInput(b"x" * 1000, "image/png")
    store.put(_stored("r1", [photo]))
    store.put(_stored("r2", [photo, ImageInput(b"y" * 1000, "image/png")]))  # its chain
    assert (len(store), store.image_bytes()) == (2, 2000)  # the photo once
    store.put(_stored("r3", [ImageInput(b"z" * 1000, "image/png")]))
    # Past 2,500: r1 goes first (freeing nothing: r2 holds its photo too), then r2.
    assert (len(store), store.image_bytes()) == (1, 1000) and store.get("r3") is not None
    store.put(_stored("r4", [ImageInput(b"w" * 5000, "image/png")]))
    assert len(store) == 1 and store.get("r4") is not None  # over the bound alone: kept
