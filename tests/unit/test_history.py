"""``History``: the tokens and images a session holds, and the calls that replay them."""

from __future__ import annotations

import pytest

from salience_client.history import IMAGE_PLACEHOLDER, History, ImageStep, PrefillStep


def _history() -> History:
    """[1, 2] <image of 3> [3] <image of 2> [4, 5]"""
    history = History()
    history.extend([1, 2])
    history.add_image(b"a", "image/png", 3)
    history.extend([3])
    history.add_image(b"b", "image/jpeg", 2)
    history.extend([4, 5])
    return history


def test_replay_steps_alternate_text_and_images_in_order() -> None:
    history = _history()
    assert history.length == 10
    assert history.token_ids[2:5].tolist() == [IMAGE_PLACEHOLDER] * 3
    steps = history.replay_steps(10)
    assert [type(step) for step in steps] == [
        PrefillStep,
        ImageStep,
        PrefillStep,
        ImageStep,
        PrefillStep,
    ]
    assert [step.offset for step in steps] == [0, 2, 5, 6, 8]
    assert steps[0] == PrefillStep(0, [1, 2]) and steps[-1] == PrefillStep(8, [4, 5])
    image = steps[3]
    assert isinstance(image, ImageStep) and image.image.data == b"b"
    # A shorter replay stops where asked, mid-text included.
    assert history.replay_steps(6) == steps[:3]
    assert history.replay_steps(9) == [*steps[:4], PrefillStep(8, [4])]
    assert history.replay_steps(0) == []
    with pytest.raises(ValueError):
        history.replay_steps(11)


def test_truncate_keeps_whole_images_only() -> None:
    history = _history()
    history.truncate(6)
    assert history.length == 6 and [image.data for image in history.images] == [b"a"]
    history.truncate(3)  # inside the first image: it goes whole
    assert history.token_ids.tolist() == [1, 2] and history.images == []


def test_a_copy_is_independent() -> None:
    history = _history()
    copy = history.copy()
    copy.truncate(2)
    copy.extend([9])
    assert history.length == 10 and len(history.images) == 2
    assert copy.token_ids.tolist() == [1, 2, 9]
