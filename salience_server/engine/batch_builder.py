"""Builds the ForwardBatch of a step from the scheduler's chunks."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from salience_server.engine.batch import ForwardBatch
from salience_server.engine.images import ImageStore
from salience_server.engine.request import Request
from salience_server.engine.scheduler import ScheduledChunk


@dataclass
class EmbedRow:
    """A batch row whose final hidden state an Embed input pools."""

    request: Request
    position: int


@dataclass
class LogitsRow:
    """One logits row of a forward pass: which request, which fed position."""

    request: Request
    fed_position: int
    readout_index: int | None
    """Index into the step's readout rows, when this row's readout is wanted."""


@dataclass
class ReadoutRow:
    """A row read out with no logits (a prefill position in readout ranges only)."""

    request: Request
    fed_position: int
    readout_index: int
    """Index into the step's readout rows."""


@dataclass
class StepRows:
    """What the rows a forward pass returns are for."""

    logits: list[LogitsRow] = field(default_factory=list)
    """One per ``ForwardBatch.logits_rows`` entry."""
    embeds: list[EmbedRow] = field(default_factory=list)
    """One per ``ForwardBatch.embed_rows`` entry."""
    readouts: list[ReadoutRow] = field(default_factory=list)
    """The ``ForwardBatch.readout_rows`` entries that are no logits row."""


def build_batch(
    chunks: list[ScheduledChunk],
    block_size: int,
    images: ImageStore,
    uses_mrope: bool,
    has_readout: bool,
) -> tuple[ForwardBatch, StepRows]:
    """The flattened batch, and what each of its returned rows is for."""
    batch, rows = ForwardBatch(), StepRows()
    for chunk in chunks:
        request, session = chunk.request, chunk.request.session
        if request.first_scheduled_time is None:
            request.first_scheduled_time = time.monotonic()
        first_row = batch.num_tokens
        end = chunk.start + chunk.num_tokens
        own_end = end - len(chunk.draft_token_ids)
        batch.add_sequence(
            session.token_ids[chunk.start : own_end] + chunk.draft_token_ids,
            chunk.start,
            session.block_table,
            block_size,
            session.rope_positions(chunk.start, end) if uses_mrope else None,
        )
        batch.embeds.extend(images.rows(session, chunk.start, end, first_row))
        for position in range(chunk.start, end):
            if request.wants_embedding_at(position):
                batch.embed_rows.append(first_row + position - chunk.start)
                rows.embeds.append(EmbedRow(request, position))
            # A draft's row verifies it and predicts the next (position >= length).
            has_logits = position >= session.length or request.needs_logits_at(position)
            reads_out = has_readout and request.needs_readout_at(position)
            if not (has_logits or reads_out):  # most of a prefill
                continue
            row = first_row + position - chunk.start
            readout_index = len(batch.readout_rows) if reads_out else None
            if readout_index is not None:
                batch.readout_rows.append(row)
            if has_logits:
                batch.logits_rows.append(row)
                rows.logits.append(LogitsRow(request, position, readout_index))
            elif readout_index is not None:
                rows.readouts.append(ReadoutRow(request, position, readout_index))
    return batch, rows
