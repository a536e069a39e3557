"""The KV block pool: fixed-size blocks, reference-counted so sessions can share them.

Plain Python, no tensors: the model runner owns the memory, this owns who uses which
block. A block table is a session's list of block ids; token ``p`` lives in block
``table[p // block_size]`` at slot ``p % block_size``.
"""

from __future__ import annotations

from collections import deque


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0:
            raise ValueError("the KV pool needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free_ids: deque[int] = deque(range(num_blocks))
        self._ref_counts = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free_ids)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    def num_new_blocks(self, table: list[int], num_tokens: int, write_start: int) -> int:
        """Fresh blocks to grow ``table`` to ``num_tokens`` plus copies of shared blocks
        that positions ``write_start ..`` would write into (copy-on-write)."""
        num_grow = max(0, self.blocks_for(num_tokens) - len(table))
        first = write_start // self.block_size
        last = min(len(table), self.blocks_for(num_tokens))
        num_copy = sum(1 for block_id in table[first:last] if self._ref_counts[block_id] > 1)
        return num_grow + num_copy

    def can_append(self, table: list[int], num_tokens: int, write_start: int) -> bool:
        """Whether ``append`` would find enough free blocks."""
        return self.num_new_blocks(table, num_tokens, write_start) <= len(self._free_ids)

    def append(self, table: list[int], num_tokens: int, write_start: int) -> list[tuple[int, int]]:
        """Makes ``table`` hold ``num_tokens`` tokens, with every block that positions
        ``write_start .. num_tokens - 1`` touch owned by this table alone.

        Returns the ``(source, destination)`` block copies the runner must make before
        writing. Raises MemoryError (changing nothing) when the pool is short.
        """
        if not self.can_append(table, num_tokens, write_start):
            raise MemoryError("KV block pool exhausted")
        copies = []
        first = write_start // self.block_size
        for index in range(first, min(len(table), self.blocks_for(num_tokens))):
            block_id = table[index]
            if self._ref_counts[block_id] > 1:
                new_id = self._take()
                self._ref_counts[block_id] -= 1
                table[index] = new_id
                copies.append((block_id, new_id))
        while len(table) < self.blocks_for(num_tokens):
            table.append(self._take())
        return copies

    def share(self, table: list[int]) -> list[int]:
        """A new table sharing every block of ``table`` (for ForkSession)."""
        for block_id in table:
            self._ref_counts[block_id] += 1
        return list(table)

    def truncate(self, table: list[int], num_tokens: int) -> None:
        """Releases the blocks past the first ``num_tokens`` tokens."""
        keep = self.blocks_for(num_tokens)
        for block_id in table[keep:]:
            self._release(block_id)
        del table[keep:]

    def free(self, table: list[int]) -> None:
        """Releases every block of ``table`` and empties it."""
        self.truncate(table, 0)

    def num_freed_by(self, tables: list[list[int]]) -> int:
        """Blocks that freeing every one of ``tables`` would give back: those no other
        table shares."""
        counts: dict[int, int] = {}
        for table in tables:
            for block_id in table:
                counts[block_id] = counts.get(block_id, 0) + 1
        return sum(1 for block_id, count in counts.items() if count == self._ref_counts[block_id])

    def num_owned(self, table: list[int]) -> int:
        """Blocks of ``table`` no other table shares."""
        return sum(1 for block_id in table if self._ref_counts[block_id] == 1)

    def check_invariants(self, tables: list[list[int]]) -> None:
        """Asserts that reference counts match the live tables and nothing leaked."""
        counts = [0] * self.num_blocks
        for table in tables:
            for block_id in table:
                counts[block_id] += 1
        assert counts == self._ref_counts, "reference counts disagree with the live tables"
        free = set(self._free_ids)
        assert len(free) == len(self._free_ids), "a block is free twice"
        used = {i for i, count in enumerate(counts) if count > 0}
        assert not (free & used), "a used block is on the free list"
        assert len(free) + len(used) == self.num_blocks, "a block leaked"

    def _take(self) -> int:
        block_id = self._free_ids.popleft()
        self._ref_counts[block_id] = 1
        return block_id

    def _release(self, block_id: int) -> None:
        self._ref_counts[block_id] -= 1
        if self._ref_counts[block_id] == 0:
            self._free_ids.append(block_id)
