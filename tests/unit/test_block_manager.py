"""The block pool: allocation, sharing, copy-on-write, freeing; no leak ever."""

from __future__ import annotations

import pytest

from salience_server.engine.block_manager import BlockManager


@pytest.fixture
def pool():
    manager = BlockManager(num_blocks=8, block_size=4)
    tables: list[list[int]] = []
    yield manager, tables
    manager.check_invariants(tables)


def test_append_grows_by_whole_blocks(pool) -> None:
    manager, tables = pool
    table: list[int] = []
    tables.append(table)
    assert manager.append(table, 5, 0) == []
    assert len(table) == 2 and manager.num_free == 6
    manager.append(table, 8, 5)
    assert len(table) == 2
    manager.append(table, 9, 8)
    assert len(table) == 3 and manager.num_free == 5


def test_append_refuses_without_changing_anything(pool) -> None:
    manager, tables = pool
    table: list[int] = []
    tables.append(table)
    assert not manager.can_append(table, 33, 0)
    with pytest.raises(MemoryError):
        manager.append(table, 33, 0)
    assert table == [] and manager.num_free == 8


def test_shared_blocks_are_counted_once_and_copied_on_write(pool) -> None:
    manager, tables = pool
    parent: list[int] = []
    manager.append(parent, 6, 0)  # blocks: one full, one half full
    child = manager.share(parent)
    tables.extend([parent, child])
    assert manager.num_free == 6  # shared, not duplicated
    # A write into the first block alone copies it alone, however long the table.
    assert manager.num_new_blocks(child, 4, 0) == 1
    copies = manager.append(child, 7, 6)  # writes into the half-full shared block
    assert copies == [(parent[1], child[1])]
    assert child[0] == parent[0] and child[1] != parent[1]
    assert manager.num_free == 5
    assert manager.append(parent, 7, 6) == []  # parent now owns its block alone


def test_truncate_and_free_release_blocks(pool) -> None:
    manager, tables = pool
    table: list[int] = []
    manager.append(table, 16, 0)
    other = manager.share(table)
    manager.truncate(table, 5)
    assert len(table) == 2 and manager.num_free == 4  # other still holds all four
    manager.free(other)
    assert manager.num_free == 6
    tables.append(table)


def test_invariant_check_catches_a_leak() -> None:
    manager = BlockManager(num_blocks=4, block_size=2)
    table: list[int] = []
    manager.append(table, 3, 0)
    with pytest.raises(AssertionError):
        manager.check_invariants([])  # the table was forgotten without free()


def test_owned_and_freed_blocks_agree_with_the_tables(pool) -> None:
    """``num_owned`` and ``num_freed_by`` against a count over the live tables."""
    manager, tables = pool
    parent: list[int] = []
    manager.append(parent, 12, 0)  # 3 blocks
    child = manager.share(parent)
    manager.append(child, 13, 9)  # copies the last block, adds a fourth
    other: list[int] = []
    manager.append(other, 4, 0)
    tables.extend([parent, child, other])

    def users(block_id: int) -> int:
        return sum(table.count(block_id) for table in tables)

    for table in tables:
        assert manager.num_owned(table) == sum(1 for b in table if users(b) == 1)
    assert [manager.num_owned(t) for t in tables] == [1, 2, 1]
    for chosen in ([parent], [child], [parent, child], [parent, other], []):
        blocks = {b for table in chosen for b in table}
        freed = sum(1 for b in blocks if users(b) == sum(t.count(b) for t in chosen))
        assert manager.num_freed_by(chosen) == freed
    assert manager.num_freed_by([parent, child]) == 5


def test_a_pool_needs_a_block() -> None:
    with pytest.raises(ValueError):
        BlockManager(num_blocks=0, block_size=4)
