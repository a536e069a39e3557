"""The engine's intake of a call, against a real session table and no model
(``tests.session_support``): what ``check`` refuses (and that it changes nothing), and
the state ``accept`` leaves: the session's tokens, blocks, images and host KV, what KV
the call must compute again, and the events owed at once. Resumed streams' stop
strings, grammars and seeds: test_intake_resume."""

from __future__ import annotations

import time

import pytest
import torch

from salience_server.engine.errors import Code, SalienceError
from salience_server.engine.intake import Intake
from salience_server.engine.request import Event, GenerateParams, Request, TokenEvent
from salience_server.engine.session import Residency, Session
from salience_server.engine.session_table import SessionTable
from salience_server.engine.validation import Limits
from salience_server.engine.vision import EncodedImage
from tests.session_support import check_pool, computed, make_table

VOCAB = 300
IMAGE_PAD = 290
"""The image pad token of the intakes made here (a valid id, which text may not hold)."""


def make_intake(table: SessionTable, image_token_id: int | None = IMAGE_PAD) -> Intake:
    """An intake without constraints or a tokenizer (calls with neither)."""
    return Intake(None, table, table.runner, None, VOCAB, {1}, False, Limits(), image_token_id)  # type: ignore[arg-type]


def image_of(num_tokens: int, width: int = 2) -> EncodedImage:
    """Embeddings of ``num_tokens`` rows of float32: ``num_tokens * width * 4`` bytes."""
    return EncodedImage(torch.zeros(num_tokens, width), (1, 1, num_tokens))


def refusal(
    intake: Intake, params: GenerateParams, session: Session, image: EncodedImage | None = None
) -> SalienceError:
    """The error ``check`` raises, once it is seen to change nothing."""
    before = (list(session.token_ids), list(session.images), session.num_computed)
    used = intake.evictor.host_bytes_used
    with pytest.raises(SalienceError) as caught:
        intake.check(params, session, image)
    assert (list(session.token_ids), list(session.images), session.num_computed) == before
    assert intake.evictor.host_bytes_used == used
    return caught.value


def admitted(
    intake: Intake, params: GenerateParams, session: Session, image: EncodedImage | None = None
) -> tuple[list[Event], Request]:
    """Checks and accepts a call as the engine does: (the events sent at once, the request)."""
    events: list[Event] = []
    intake.check(params, session, image)
    return events, intake.accept(params, session, events.append, image)


def test_a_call_at_the_wrong_offset_is_refused_as_a_mismatch_and_changes_nothing() -> None:
    table = make_table()
    session = computed(table, table.open("s"), 6)
    error = refusal(make_intake(table), GenerateParams("s", [1], offset=7), session)
    assert (error.code, error.reason) == (Code.ABORTED, "OFFSET_MISMATCH")
    assert error.metadata == {"session_length": "6"}


def test_text_holding_the_image_pad_token_is_refused_naming_where() -> None:
    """Only AppendImage puts the pad token in a session: its positions take an image's
    embeddings, which text has none of."""
    table = make_table()
    session = computed(table, table.open("s"), 3)
    params = GenerateParams("s", [5, 6, IMAGE_PAD, IMAGE_PAD], offset=3)
    error = refusal(make_intake(table), params, session)
    assert (error.code, error.reason) == (Code.INVALID_ARGUMENT, "INVALID_TOKEN")
    assert f"image pad token {IMAGE_PAD} at 2:" in error.message


def test_the_pad_token_is_plain_text_for_a_model_without_images() -> None:
    table = make_table()
    session = computed(table, table.open("s"), 3)
    _, request = admitted(
        make_intake(table, image_token_id=None), GenerateParams("s", [IMAGE_PAD], offset=3), session
    )
    assert session.token_ids[-1] == IMAGE_PAD and session.images == []


def test_an_image_larger_than_the_whole_host_budget_is_an_invalid_argument() -> None:
    """No retry can take it, so it is not RESOURCE_EXHAUSTED; one of exactly the budget
    fits."""
    table = make_table(host_bytes=32)
    session = table.open("s")
    intake = make_intake(table)
    error = refusal(intake, GenerateParams("s", [IMAGE_PAD] * 5), session, image_of(5))
    assert (error.code, error.reason) == (Code.INVALID_ARGUMENT, "IMAGE_TOO_LARGE")
    assert "(40 bytes) exceed the whole host memory budget (32 bytes)" in error.message
    intake.check(GenerateParams("s", [IMAGE_PAD] * 4), session, image_of(4))  # 32 bytes


def test_with_no_host_budget_an_image_is_refused_saying_the_flag_is_zero() -> None:
    table = make_table(host_bytes=0)
    error = refusal(
        make_intake(table), GenerateParams("s", [IMAGE_PAD]), table.open("s"), image_of(1)
    )
    assert error.reason == "IMAGE_TOO_LARGE" and "--host-kv-memory is 0" in error.message


def test_an_image_that_does_not_fit_beside_the_other_images_is_resource_exhausted() -> None:
    table = make_table(host_bytes=48)
    intake = make_intake(table)
    first = table.open("first")
    admitted(intake, GenerateParams("first", [IMAGE_PAD] * 4), first, image_of(4))  # 32 bytes
    error = refusal(intake, GenerateParams("s", [IMAGE_PAD] * 4), table.open("s"), image_of(4))
    assert (error.code, error.reason) == (Code.RESOURCE_EXHAUSTED, "HOST_MEMORY_FULL")


def test_an_appended_call_commits_its_tokens_and_owns_the_session() -> None:
    """The tokens are the session's at once; the KV already computed stays (it is
    the call's cached tokens); nothing is owed at once."""
    table = make_table()
    intake = make_intake(table)
    session = computed(table, table.open("s"), 8)
    session.last_used -= 100
    now = time.monotonic()
    events, request = admitted(intake, GenerateParams("s", [7, 8], offset=8), session)
    assert session.token_ids == list(range(8)) + [7, 8] and session.owner is request
    assert (session.num_computed, session.num_ever_computed, request.num_cached) == (8, 8, 8)
    assert session.last_used >= now and events == []  # used now (for eviction's order)
    session.owner = None
    _, later = admitted(intake, GenerateParams("s", [9], offset=10), session)
    assert later.request_id > request.request_id


def test_a_decode_on_a_computed_session_feeds_its_last_token_again() -> None:
    """Distributions are not kept between calls: the last token's is computed again
    (its KV rewritten: not counted as a recomputation)."""
    table = make_table()
    session = computed(table, table.open("s"), 8)
    _, request = admitted(make_intake(table), GenerateParams("s", offset=8, max_tokens=3), session)
    assert (session.num_computed, session.num_ever_computed, request.num_cached) == (7, 7, 7)


def test_a_prefill_only_call_keeps_the_kv_it_finds() -> None:
    table = make_table()
    session = computed(table, table.open("s"), 8)
    _, request = admitted(make_intake(table), GenerateParams("s", offset=8), session)
    assert (session.num_computed, request.num_cached) == (8, 8)


def test_a_logprobs_range_over_committed_tokens_feeds_them_again_from_before_it() -> None:
    """Position 3 is scored from the distribution at 2: the KV from 2 on is fed again."""
    table = make_table()
    session = computed(table, table.open("s"), 8)
    params = GenerateParams("s", [7, 8], offset=8, logprobs_ranges=[(3, 10)])
    events, request = admitted(make_intake(table), params, session)
    assert (session.num_computed, session.num_ever_computed, request.num_cached) == (2, 2, 2)
    assert events == [] and request.next_event_position == 3


def test_a_truncating_call_rewinds_the_tokens_blocks_and_images_after_its_offset() -> None:
    table = make_table(host_bytes=1000)
    intake = make_intake(table)
    session = computed(table, table.open("s"), 8)
    admitted(intake, GenerateParams("s", [IMAGE_PAD] * 4, offset=8), session, image_of(4))
    session.owner = None
    session.num_computed = session.num_ever_computed = 12
    table.block_manager.append(session.block_table, 12, 8)
    assert table.evictor.host_bytes_used == 32 and table.block_manager.num_free == 13
    _, request = admitted(intake, GenerateParams("s", [3, 4], offset=5, truncating=True), session)
    assert session.token_ids == [0, 1, 2, 3, 4, 3, 4] and session.images == []
    assert table.evictor.host_bytes_used == 0  # the image's embeddings are given back
    assert len(session.block_table) == 2 and table.block_manager.num_free == 14
    assert (session.num_computed, session.num_ever_computed, request.num_cached) == (5, 5, 5)
    check_pool(table)


def test_a_rewound_offloaded_session_keeps_only_the_host_kv_of_what_remains() -> None:
    table = make_table()
    session = computed(table, table.open("s"), 12)
    table.evictor.evict(session, [])
    make_intake(table).accept(
        GenerateParams("s", [1], offset=5, truncating=True), session, lambda event: None, None
    )
    assert table.runner.trimmed == [("s", 2)]
    assert session.host_kv_bytes == 8 and table.evictor.host_bytes_used == 8


def test_an_image_is_appended_at_the_sessions_end_dropping_offloaded_kv_for_room() -> None:
    """Images come before offloaded KV: an idle session's host KV is given up (and the
    runner told to free it), that session to recompute its KV."""
    table = make_table(host_bytes=40)
    intake = make_intake(table)
    idle = computed(table, table.open("idle"), 12)
    table.evictor.evict(idle, [])
    session = computed(table, table.open("s"), 3)
    admitted(intake, GenerateParams("s", [IMAGE_PAD] * 4, offset=3), session, image_of(4))
    assert [(span.start, span.num_tokens) for span in session.images] == [(3, 4)]
    assert session.token_ids == [0, 1, 2] + [IMAGE_PAD] * 4
    assert idle.residency == Residency.DROPPED and table.runner.discarded == ["idle"]
    assert table.evictor.host_bytes_used == 32


def test_a_range_from_position_0_sends_its_event_at_once() -> None:
    """Position 0 has no distribution to compute (logprob 0, no top-k, empty readout):
    its event goes out as the call is accepted, once."""
    table = make_table()
    session = table.open("s")
    params = GenerateParams("s", [7, 8, 9], logprobs_ranges=[(0, 3)])
    events, request = admitted(make_intake(table), params, session)
    assert events == [TokenEvent(position=0, token_id=7, is_prefill=True)]
    assert request.next_event_position == 1


def test_a_one_token_sessions_position_0_event_is_sent_too() -> None:
    table = make_table()
    params = GenerateParams("s", [7], logprobs_ranges=[(0, 1)])
    events, _ = admitted(make_intake(table), params, table.open("s"))
    assert events == [TokenEvent(position=0, token_id=7, is_prefill=True)]


def test_a_range_over_earlier_calls_tokens_from_0_sends_position_0_too() -> None:
    table = make_table()
    session = computed(table, table.open("s"), 4)
    session.token_ids[0] = 42
    params = GenerateParams("s", [5], offset=4, logprobs_ranges=[(0, 2)])
    events, _ = admitted(make_intake(table), params, session)
    assert events == [TokenEvent(position=0, token_id=42, is_prefill=True)]


def test_no_event_is_sent_at_once_for_a_range_after_0_or_an_empty_session() -> None:
    table = make_table()
    intake = make_intake(table)
    session = table.open("s")
    events, request = admitted(intake, GenerateParams("s", logprobs_ranges=[(0, 5)]), session)
    assert events == [] and request.next_event_position == 0  # nothing in the session
    session.owner = None
    params = GenerateParams("s", [7, 8, 9], logprobs_ranges=[(1, 3)])
    events, request = admitted(intake, params, session)
    assert events == [] and request.next_event_position == 0  # the offset: nothing sent


def test_an_image_replacing_one_its_rewind_drops_fits_where_only_one_does() -> None:
    """The rewind gives the old image's host memory back before the new one is held:
    counting both would refuse every such call, retries included."""
    table = make_table(host_bytes=32)
    intake = make_intake(table)
    session = table.open("s")
    admitted(intake, GenerateParams("s", [IMAGE_PAD] * 4), session, image_of(4))
    session.owner = None
    params = GenerateParams("s", [IMAGE_PAD] * 4, offset=0, truncating=True)
    admitted(intake, params, session, image_of(4))
    assert len(session.images) == 1 and table.evictor.host_bytes_used == 32


def test_an_image_a_fork_still_shares_frees_nothing_when_rewound() -> None:
    table = make_table(host_bytes=32)
    intake = make_intake(table)
    session = table.open("s")
    admitted(intake, GenerateParams("s", [IMAGE_PAD] * 4), session, image_of(4))
    session.owner = None
    table.fork(session, "fork")
    params = GenerateParams("s", [IMAGE_PAD] * 4, offset=0, truncating=True)
    error = refusal(intake, params, session, image_of(4))
    assert (error.code, error.reason) == (Code.RESOURCE_EXHAUSTED, "HOST_MEMORY_FULL")
