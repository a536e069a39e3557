"""A session's bookkeeping: rotary positions around images (Qwen2-VL's rule), rewinds,
and what counts as recomputed. Plain Python; no model."""

from __future__ import annotations

from salience_server.engine.ngram import NgramIndex
from salience_server.engine.session import ImageSpan, Session


def _with_image() -> Session:
    """Text at 0 .. 4, an image of 1 x 2 x 3 placeholders at 5 .. 10, text from 11."""
    session = Session("s", max_context=64, token_ids=list(range(14)))
    session.images.append(ImageSpan(5, 6, rope_start=5, grid=(1, 2, 3), image_key="k"))
    return session


def test_an_images_tokens_take_its_grid_and_the_text_after_goes_on_past_it() -> None:
    """Qwen2-VL's positions: (t, h, w) offsets on the grid, in row-major order, from
    the image's start; text after it goes on at ``rope_start + max(h, w)``."""
    session = _with_image()
    grid = [(5 + t, 5 + h, 5 + w) for t in range(1) for h in range(2) for w in range(3)]
    text_after = [(p, p, p) for p in (8, 9, 10)]  # 5 + max(2, 3), then on
    assert session.rope_positions(3, 14) == [(3, 3, 3), (4, 4, 4), *grid, *text_after]
    assert [session.rope_position(i) for i in (4, 11, 13)] == [4, 8, 10]
    assert session.images[0].rope_advance == 3
    assert ImageSpan(0, 6, 0, grid=(1, 3, 2), image_key="tall").rope_advance == 3
    assert session.next_rope_position() == 11
    assert Session("empty", max_context=8).next_rope_position() == 0


def test_image_positions_and_the_offsets_that_cut_an_image() -> None:
    session = _with_image()
    assert [session.is_image_position(i) for i in (4, 5, 10, 11)] == [False, True, True, False]
    assert [session.image_cut_by(offset) for offset in (5, 11)] == [None, None]
    assert session.image_cut_by(6) is session.images[0]
    assert session.image_cut_by(10) is session.images[0]


def test_a_rewind_forgets_the_tokens_images_and_kv_from_its_offset() -> None:
    session = _with_image()
    session.num_computed, session.num_ever_computed = 12, 14
    session.ngram_index = NgramIndex(2, 3)
    session.ngram_index.sync(session.token_ids)
    assert session.rewind(11) == [] and len(session.images) == 1
    assert (session.length, session.num_computed, session.num_ever_computed) == (11, 11, 11)
    image = session.images[0]
    assert session.rewind(5) == [image] and session.images == []
    assert session.token_ids == [0, 1, 2, 3, 4] and session.ngram_index.num_indexed == 5
    assert (session.num_computed, session.num_ever_computed) == (5, 5)


def test_marking_kv_computed_counts_what_had_been_computed_before() -> None:
    session = Session("s", max_context=64, token_ids=list(range(20)))
    assert session.mark_computed(0, 8) == 0
    assert session.mark_computed(8, 10) == 0
    assert (session.num_computed, session.num_ever_computed) == (10, 10)
    session.num_computed = 0  # evicted
    assert session.mark_computed(0, 6) == 6
    assert session.mark_computed(6, 14) == 4  # 6 .. 9 again, 10 .. 13 new
    assert (session.num_computed, session.num_ever_computed) == (14, 14)
    session.num_computed = 12  # rescoring from 12: every position had KV
    assert session.mark_computed(12, 14) == 2 and session.num_ever_computed == 14
    assert not session.is_closed and not session.is_busy
