"""The flattened batch one forward pass runs: plain lists, built from scheduled chunks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class SequenceSpan:
    """One session's slice of the flattened batch."""

    query_start: int
    """First row of this sequence in the batch."""
    query_len: int
    """Rows (new tokens) this sequence feeds."""
    context_len: int
    """Tokens attended to after this step: cached ones plus the new ones."""
    block_table: list[int]


@dataclass
class ForwardBatch:
    """Inputs of one forward pass over T new tokens from several sessions."""

    token_ids: list[int] = field(default_factory=list)
    """[T] token ids, sequence after sequence."""
    positions: list[int] = field(default_factory=list)
    """[T] rotary positions (from the session, not the batch index)."""
    rope_positions: list[tuple[int, int, int]] = field(default_factory=list)
    """[T] (t, h, w) positions for multi-dimensional rotary models (Qwen2-VL); empty
    for the others."""
    embeds: list[tuple[int, Any]] = field(default_factory=list)
    """(first row, [n, hidden] tensor): precomputed input embeddings (image
    placeholders) that replace the token embeddings of n rows."""
    slot_mapping: list[int] = field(default_factory=list)
    """[T] KV slot (block_id * block_size + offset) each new token writes."""
    sequences: list[SequenceSpan] = field(default_factory=list)
    logits_rows: list[int] = field(default_factory=list)
    """[K] batch rows whose logits are needed; nothing else reaches the LM head."""
    readout_rows: list[int] = field(default_factory=list)
    """[R] batch rows whose readout layers' hidden states are captured and projected."""
    embed_rows: list[int] = field(default_factory=list)
    """[E] batch rows whose final hidden states (after the final norm) are returned."""

    def add_sequence(
        self,
        token_ids: list[int],
        start: int,
        block_table: list[int],
        block_size: int,
        rope_positions: list[tuple[int, int, int]] | None = None,
    ) -> None:
        """Appends ``token_ids`` fed at positions ``start ..`` of one session."""
        if rope_positions is not None:
            self.rope_positions.extend(rope_positions)
        self.sequences.append(
            SequenceSpan(len(self.token_ids), len(token_ids), start + len(token_ids), block_table)
        )
        for position in range(start, start + len(token_ids)):
            block_id = block_table[position // block_size]
            self.slot_mapping.append(block_id * block_size + position % block_size)
            self.positions.append(position)
        self.token_ids.extend(token_ids)

    @classmethod
    def synthetic(cls, context: int, rows: int, block_size: int, uses_mrope: bool) -> ForwardBatch:
        """One sequence feeding ``rows`` placeholder tokens after ``context`` cached
        ones, in blocks 0 on, with logits at every row: the passes a runner makes before
        it serves (its warm-up, the timing of a verification step)."""
        batch = cls()
        positions = range(context, context + rows)
        rope_positions = [(p, p, p) for p in positions] if uses_mrope else None
        block_table = list(range(-(-(context + rows) // block_size)))
        batch.add_sequence([0] * rows, context, block_table, block_size, rope_positions)
        batch.logits_rows = list(range(rows))
        return batch

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)
