"""The Responses store's bounds: responses, their token ids, and the bytes of their images."""

from __future__ import annotations

import time

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


def test_a_long_chain_of_images_is_bounded_at_no_great_cost() -> None:
    """Each put summed every image of every response again, and each eviction once more:
    a 1,024-turn chain of screenshots, then a large image, took 21 s in one put, the
    shim's event loop stalled meanwhile."""
    store = ResponseStore(max_responses=2048, max_image_bytes=200 << 20)
    images: list[ImageInput] = []
    for turn in range(1024):
        images = [*images, ImageInput(bytes(200 << 10), "image/png")]
        store.put(_stored(f"r{turn}", images))
    start = time.monotonic()
    store.put(_stored("big", [ImageInput(bytes(70 << 20), "image/png")]))
    assert time.monotonic() - start < 1.0
    # The chain's older responses free nothing (its newest holds their images): all go.
    assert (len(store), store.image_bytes()) == (1, 70 << 20)
    assert store.delete("big") and (len(store), store.image_bytes()) == (0, 0)


def test_token_ids_are_bounded() -> None:
    """Each stored response keeps its whole conversation's token ids (twice: as rendered,
    and as its session holds them): bounded by count alone, 1,024 responses of a
    long-context model's conversations took GBs. The oldest go first past the token
    bound; the one just stored is kept whatever it holds; a DELETE gives its back."""
    store = ResponseStore(max_responses=100, max_tokens=250)

    def with_tokens(response_id: str, count: int) -> StoredResponse:
        half = list(range(1000, 1000 + count // 2))
        return StoredResponse(
            {"id": response_id, "status": "completed"}, rendered_ids=half, session_ids=half
        )

    store.put(with_tokens("r1", 100))
    store.put(with_tokens("r2", 100))
    assert (len(store), store.num_tokens()) == (2, 200)
    store.put(with_tokens("r3", 100))  # 300 > 250: r1 goes
    assert store.get("r1") is None and store.num_tokens() == 200
    store.put(with_tokens("r2", 40), replacing=True)  # a stream ending: counted anew
    assert (len(store), store.num_tokens()) == (2, 140)
    store.put(with_tokens("big", 1000))
    assert len(store) == 1 and store.get("big") is not None and store.num_tokens() == 1000
    assert store.delete("big") and store.num_tokens() == 0
