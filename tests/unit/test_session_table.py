"""The session table with a real block pool, evictor and image store; no model
(``tests.session_support``)."""

from __future__ import annotations

import pytest
import torch

from salience_server.engine.errors import SalienceError
from salience_server.engine.ngram import NgramIndex
from salience_server.engine.session import Residency
from salience_server.engine.session_table import context_limit
from salience_server.engine.vision import EncodedImage
from tests.session_support import BLOCK_BYTES, check_pool, computed, make_table


def test_open_checks_the_id_and_the_number_of_sessions() -> None:
    table = make_table(max_sessions=2)
    first = table.open("a", max_context=10)
    assert first.max_context == 10 and table.get("a") is first
    made = table.open()  # the server's limit, and an id made up
    assert made.max_context == 64 and made.session_id and table.get(made.session_id) is made
    with pytest.raises(SalienceError) as caught:
        table.open("b")
    assert caught.value.reason == "TOO_MANY_SESSIONS"  # two open: the limit
    table.remove(first)
    assert table.open("b", max_context=1000).max_context == 64  # never past the server's
    with pytest.raises(SalienceError) as caught:
        table.open("b")
    assert caught.value.reason == "SESSION_EXISTS"
    with pytest.raises(SalienceError) as caught:
        table.open("has space")
    assert caught.value.reason == "INVALID_SESSION_ID"
    with pytest.raises(SalienceError) as caught:
        table.get("a")
    assert caught.value.reason == "SESSION_NOT_FOUND"


def test_a_fork_of_a_resident_session_shares_its_blocks_and_history() -> None:
    table = make_table()
    parent = computed(table, table.open("parent"), 10)
    parent.num_ever_computed = 12  # it had computed two more before a rewind
    parent.ngram_index = NgramIndex(2, 3)
    parent.ngram_index.propose(parent.token_ids, 1)
    parent.acceptance.hits = 3.0
    parent.last_used = 0.0
    child = table.fork(parent, "child")
    assert child.token_ids == parent.token_ids and child.token_ids is not parent.token_ids
    assert child.block_table == parent.block_table and table.block_manager.num_free == 13
    assert (child.num_computed, child.num_ever_computed) == (10, 12)
    assert child.residency == Residency.RESIDENT and child.max_context == parent.max_context
    assert child.ngram_index is not None and child.ngram_index is not parent.ngram_index
    assert child.ngram_index.num_indexed == 10
    assert child.acceptance == parent.acceptance and child.acceptance is not parent.acceptance
    assert parent.last_used > 0.0  # forking uses the parent
    check_pool(table)


def test_a_fork_of_an_offloaded_session_computes_its_kv_on_first_use() -> None:
    table = make_table()
    parent = computed(table, table.open("parent"), 10)
    table.evictor.evict(parent, [])
    assert parent.residency == Residency.OFFLOADED
    child = table.fork(parent)
    assert child.residency == Residency.DROPPED and child.block_table == []
    assert child.num_computed == 0 and child.num_ever_computed == 10
    check_pool(table)


def test_remove_frees_an_idle_session_now_and_a_busy_one_when_its_call_ends() -> None:
    table = make_table()
    idle = computed(table, table.open("idle"), 8)
    busy = computed(table, table.open("busy"), 8)
    busy.owner = object()
    table.remove(idle)
    table.remove(busy)
    assert idle.is_closed and busy.is_closed and table.sessions == {}
    assert idle.block_table == [] and len(busy.block_table) == 2
    assert table.block_manager.num_free == 14
    table.free(busy)  # as the end of its call does
    assert busy.block_table == [] and table.block_manager.num_free == 16


def test_closing_an_offloaded_session_gives_its_host_memory_back() -> None:
    table = make_table()
    resident = computed(table, table.open("resident"), 8)
    offloaded = computed(table, table.open("offloaded"), 6)
    table.evictor.evict(offloaded, [])
    assert table.evictor.host_bytes_used == 8  # two whole blocks of 4 tokens, a byte each
    table.remove(resident)
    table.remove(offloaded)
    assert table.evictor.host_bytes_used == 0 and offloaded.host_kv_bytes == 0
    assert table.runner.discarded == ["offloaded"]


def test_a_rewound_offloaded_session_keeps_the_host_kv_of_what_it_still_has() -> None:
    table = make_table()
    session = computed(table, table.open("s"), 12)
    table.evictor.evict(session, [])
    assert table.evictor.host_bytes_used == 12
    session.rewind(5)
    table.release_rewound_host_kv(session)
    assert table.runner.trimmed == [("s", 2)]
    assert session.host_kv_bytes == 8 and table.evictor.host_bytes_used == 8
    assert session.residency == Residency.OFFLOADED
    session.rewind(0)
    table.release_rewound_host_kv(session)
    assert table.runner.trimmed[-1] == ("s", 0)
    assert session.residency == Residency.DROPPED and table.evictor.host_bytes_used == 0
    table.release_rewound_host_kv(session)  # not offloaded: nothing to do
    assert len(table.runner.trimmed) == 2


def test_expiry_closes_the_sessions_idle_for_longer_than_the_ttl() -> None:
    table = make_table()
    old, recent, busy = (computed(table, table.open(name), 4) for name in ("o", "r", "b"))
    old.last_used -= 100
    busy.last_used -= 100
    busy.owner = object()
    table.expire(0)  # 0: never
    assert len(table.sessions) == 3
    table.expire(1)  # 100 s idle, against a second (the recent one: milliseconds)
    assert set(table.sessions) == {"r", "b"} and old.is_closed and old.block_table == []
    assert recent.block_table and busy.block_table
    check_pool(table)


def test_info_counts_device_blocks_or_host_bytes() -> None:
    table = make_table()
    session = computed(table, table.open("s", max_context=32), 9)
    info = table.info(session)
    assert (info.length, info.max_context, info.num_blocks) == (9, 32, 3)
    assert info.kv_bytes == 3 * BLOCK_BYTES and info.residency == Residency.RESIDENT
    assert not info.is_busy
    table.evictor.evict(session, [])
    info = table.info(session)
    assert info.num_blocks == 0 and info.kv_bytes == 12  # 3 blocks of 4 tokens on the host


def test_an_image_forked_with_its_session_is_kept_until_both_drop_it() -> None:
    table = make_table(host_bytes=1000)
    parent = table.open("parent")
    image = EncodedImage(torch.zeros(4, 2), (1, 2, 2))  # 32 bytes
    parent.images.append(table.images.add(parent, image))
    parent.token_ids = [0] * 4
    child = table.fork(parent)
    assert [i.start for i in child.images] == [0]
    assert child.images[0].image_key != parent.images[0].image_key
    assert table.evictor.host_bytes_used == 32  # one copy of the embeddings
    table.remove(parent)
    assert table.evictor.host_bytes_used == 32
    table.remove(child)
    assert table.evictor.host_bytes_used == 0


@pytest.mark.parametrize(
    ("asked", "model", "pool", "expected"),
    [
        (0, 100, 1000, (100, "the model's positions")),
        (50, 100, 1000, (50, "--max-context")),
        (100, 100, 1000, (100, "the model's positions")),
        (200, 100, 1000, (100, "the model's positions")),
        (0, 100, 100, (100, "the model's positions")),
        (0, 100, 99, (99, "the KV pool's size: raise --kv-cache-memory for more")),
    ],
)
def test_the_context_limit_is_the_least_of_the_flag_the_model_and_the_pool(
    asked: int, model: int, pool: int, expected: tuple[int, str]
) -> None:
    assert context_limit(asked, model, pool) == expected
