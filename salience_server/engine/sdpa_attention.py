"""Paged attention with torch SDPA, on any device: each prefill sequence attends over its
own blocks, gathered into a reused workspace (or read as a view of the pool when its
blocks are consecutive); the decodes and other few-row sequences of a batch go into one
padded call (``few_row_attention``).
``paged_attention`` hooks it into transformers; ``flash_attention`` is the CUDA kernel
backend beside it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from salience_server.engine.few_row_attention import (
    MAX_FOLDED_ROWS,
    FewRowGroup,
    attend_folded,
    attend_group,
    build_group,
    group_members,
    sdpa_mask,
)
from salience_server.engine.model_shape import kv_shape
from salience_server.engine.uploads import Upload, Uploads


@dataclass
class SequenceAttention:
    query_start: int
    query_len: int
    context_len: int
    block_ids: Upload
    """[num_blocks] long: the blocks holding this sequence's context."""
    mask: torch.Tensor | None
    """[query_len, context_len] bool causal mask, None for a single query row."""
    first_block: int | None = None
    """When the blocks are consecutive ids (a session that grew in a fresh pool), the
    first one: the context is then a view of the pool, and no gather is needed."""


@dataclass
class SdpaAttentionMetadata:
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    """Per layer (keys, values), each [num_blocks, block_size, num_kv_heads, head_dim]."""
    slots: Upload
    """[T] long: where each new token's key and value go."""
    sequences: list[SequenceAttention]
    """Sequences attended one by one (prefill chunks, lone decodes)."""
    few_row_group: FewRowGroup | None
    workspace: tuple[torch.Tensor, torch.Tensor]
    """Reused (keys, values) buffers, each [max_blocks, block_size, Hkv, D], that one
    sequence's context is gathered into: fresh allocations per gather cost page faults
    that made gathering ~9x slower on CPU."""
    window_masks: dict[
        tuple[int | None, int, torch.dtype], tuple[list[torch.Tensor | None], torch.Tensor | None]
    ] = field(default_factory=dict)
    """Per sliding-window size (None: no window), query heads per key head and dtype,
    the sequences' and the few-row group's masks as SDPA takes them (``sdpa_mask``):
    built by the first layer that needs them, reused by the others."""

    @property
    def slot_mapping(self) -> torch.Tensor:
        return self.slots.tensor

    def attend(
        self,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        scaling: float | None,
        sliding_window: int | None = None,
    ) -> torch.Tensor:
        """query [1, H, T, D] -> [T, H, D]."""
        masks, group_mask = self._masks(sliding_window, query, key_cache)
        group = self.few_row_group
        if group is None and len(self.sequences) == 1:  # one sequence: its rows are all
            seq = self.sequences[0]
            return self._attend_one(query, key_cache, value_cache, seq, masks[0], scaling)[
                0
            ].transpose(0, 1)
        grouped = None
        if group is not None and group_mask is not None:
            grouped = attend_group(
                query, key_cache, value_cache, group, group_mask, self.workspace, scaling
            )
            if group.first_row == 0 and not self.sequences:  # the group is the batch
                return grouped
        output = query.new_empty(query.shape[2], query.shape[1], query.shape[3])  # [T, H, D]
        if group is not None and grouped is not None:
            if group.first_row is None:
                output[group.out_rows.tensor] = grouped
            else:
                output[group.first_row : group.first_row + grouped.shape[0]] = grouped
        for seq, mask in zip(self.sequences, masks, strict=True):
            rows = slice(seq.query_start, seq.query_start + seq.query_len)
            attended = self._attend_one(query, key_cache, value_cache, seq, mask, scaling)
            output[rows] = attended[0].transpose(0, 1)
        return output

    def _attend_one(
        self,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        seq: SequenceAttention,
        mask: torch.Tensor | None,
        scaling: float | None,
    ) -> torch.Tensor:
        """One sequence's rows: -> [1, H, q, D]."""
        rows = slice(seq.query_start, seq.query_start + seq.query_len)
        keys = _gather(key_cache, seq, self.workspace[0])  # [1, Hkv, ctx, D]
        values = _gather(value_cache, seq, self.workspace[1])
        queries = query if seq.query_len == query.shape[2] else query[:, :, rows]
        if _folds(seq, mask):
            return attend_folded(queries, keys, values, mask, scaling)
        grouped = True
        if expands_heads(queries.device, mask is not None, queries.shape[1], keys.shape[1]):
            group = queries.shape[1] // keys.shape[1]
            keys = keys.repeat_interleave(group, dim=1)  # query head h reads key head h // g
            values = values.repeat_interleave(group, dim=1)
            grouped = False
        attended = F.scaled_dot_product_attention(
            queries,
            keys,
            values,
            attn_mask=mask,
            is_causal=mask is None,
            scale=scaling,
            enable_gqa=grouped,
        )
        return attended if attended.dtype == query.dtype else attended.to(query.dtype)

    def _masks(
        self, sliding_window: int | None, query: torch.Tensor, key_cache: torch.Tensor
    ) -> tuple[list[torch.Tensor | None], torch.Tensor | None]:
        """The sequences' and the group's masks as SDPA takes them (``sdpa_mask``)."""
        heads_per_key_head = query.shape[1] // key_cache.shape[-2]
        key = (sliding_window, heads_per_key_head, query.dtype)
        if key not in self.window_masks:
            group = self.few_row_group
            if sliding_window is None:
                masks = [seq.mask for seq in self.sequences]
            else:
                device = self.slot_mapping.device
                masks = [
                    causal_mask(seq.query_len, seq.context_len, device, sliding_window)
                    for seq in self.sequences
                ]
            masks = [
                sdpa_mask(mask, heads_per_key_head, _folds(seq, mask), query.dtype)
                for seq, mask in zip(self.sequences, masks, strict=True)
            ]
            group_mask = None
            if group is not None:
                group_mask = sdpa_mask(
                    group.mask(sliding_window), heads_per_key_head, True, query.dtype
                )
            self.window_masks[key] = (masks, group_mask)
        return self.window_masks[key]


def _folds(seq: SequenceAttention, mask: torch.Tensor | None) -> bool:
    """Whether a sequence's rows attend folded (``attend_folded``): a decode, or a few
    rows that need a mask (rows that need none are a whole new sequence: SDPA's own
    causal mask, unfolded)."""
    return seq.query_len == 1 or (mask is not None and seq.query_len <= MAX_FOLDED_ROWS)


class SdpaBackend:
    """torch SDPA over each sequence's gathered blocks; decodes padded into one call.
    It computes in the queries' dtype: float32 for a 16-bit model on a CPU without
    16-bit units (``cpu_matmul.compute_in_float32``), whose pool is float32 too
    (``model_runner.kv_dtype``). Decodes fold the query heads that share a key head
    into that head's query rows (``few_row_attention.attend_folded``)."""

    name = "torch SDPA"

    def __init__(
        self,
        block_size: int,
        workspace_blocks: int,
        device: torch.device,
    ) -> None:
        self.block_size = block_size
        self.workspace_blocks = workspace_blocks
        self.device = device
        self._workspace: tuple[torch.Tensor, torch.Tensor] | None = None

    has_workspace = True

    def chunk_bytes(self, rows: int, context: int, model_config: Any, dtype: torch.dtype) -> int:
        """A chunk over cached context needs a mask, kept for the pass (bool, then
        additive in the queries' dtype), and on CUDA, with grouped heads, its keys and
        values once per query head (``expands_heads``) for each layer's call."""
        text_config = model_config.get_text_config()
        num_heads = text_config.num_attention_heads
        _, num_kv_heads, head_dim = kv_shape(model_config)
        keys = rows + context
        masks = rows * keys * (1 + dtype.itemsize)
        expanded = 0
        if expands_heads(self.device, True, num_heads, num_kv_heads):
            expanded = 2 * num_heads * keys * head_dim * dtype.itemsize
        return masks + expanded

    def resize_workspace(self, blocks: int) -> None:
        """The workspace holds ``blocks`` blocks from now on (0: none yet); it is
        allocated again at the next batch."""
        self.workspace_blocks = blocks
        self._workspace = None

    def build_metadata(
        self,
        spans: Sequence[Any],
        slot_mapping: list[int],
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        uploads: Uploads,
    ) -> SdpaAttentionMetadata:
        return build_metadata(
            list(spans),
            slot_mapping,
            kv_caches,
            self._workspace_for(kv_caches),
            self.block_size,
            uploads,
        )

    def _workspace_for(
        self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Allocated once, shaped like the pool's blocks."""
        if self._workspace is None:
            keys = kv_caches[0][0]
            shape = (self.workspace_blocks, *keys.shape[1:])
            self._workspace = (
                torch.empty(shape, dtype=keys.dtype, device=keys.device),
                torch.empty(shape, dtype=keys.dtype, device=keys.device),
            )
        return self._workspace


def build_metadata(
    spans: list[Any],
    slot_mapping: list[int],
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
    workspace: tuple[torch.Tensor, torch.Tensor],
    block_size: int,
    uploads: Uploads,
) -> SdpaAttentionMetadata:
    """The SDPA inputs of one batch of SequenceSpans: single-token sequences go
    into one padded few-row group where they can (``few_row_attention.group_members``)."""
    device = workspace[0].device
    grouped = group_members(spans, block_size, workspace[0].shape[0])
    group = None
    if grouped:
        group = build_group(grouped, block_size, uploads)
        in_group = {id(span) for span in grouped}
        spans = [span for span in spans if id(span) not in in_group]
    sequences = [
        _sequence(span, span.block_table[: -(-span.context_len // block_size)], device, uploads)
        for span in spans
    ]
    return SdpaAttentionMetadata(
        kv_caches=kv_caches,
        slots=uploads.add(slot_mapping),
        sequences=sequences,
        few_row_group=group,
        workspace=workspace,
    )


def _sequence(
    span: Any, table: list[int], device: torch.device, uploads: Uploads
) -> SequenceAttention:
    consecutive = table == list(range(table[0], table[0] + len(table))) if table else False
    return SequenceAttention(
        query_start=span.query_start,
        query_len=span.query_len,
        context_len=span.context_len,
        block_ids=uploads.add(table),
        mask=causal_mask(span.query_len, span.context_len, device),
        first_block=table[0] if consecutive else None,
    )


def _gather(cache: torch.Tensor, seq: SequenceAttention, workspace: torch.Tensor) -> torch.Tensor:
    """[num_blocks, block_size, Hkv, D] -> this sequence's [1, Hkv, context_len, D]: a
    view of the pool when its blocks are consecutive, else of ``workspace`` after they
    are gathered there (one strided view either way: every layer of every step pays
    each operator's dispatch)."""
    if seq.first_block is not None:
        source, first_block = cache, seq.first_block
    else:
        num_blocks = seq.block_ids.length
        torch.index_select(cache, 0, seq.block_ids.tensor, out=workspace[:num_blocks])
        source, first_block = workspace, 0
    _, block_size, num_kv_heads, head_dim = source.shape
    token_stride = num_kv_heads * head_dim
    return source.as_strided(
        (1, num_kv_heads, seq.context_len, head_dim),
        (0, head_dim, token_stride, 1),
        source.storage_offset() + first_block * block_size * token_stride,
    )


def expands_heads(device: torch.device, masked: bool, num_heads: int, num_kv_heads: int) -> bool:
    """Whether a masked sequence's keys and values go to SDPA once per query head rather
    than grouped (``enable_gqa``). On CUDA, SDPA takes grouped heads only in its flash
    and math kernels, and flash takes no mask: a masked call with grouped heads runs
    the math kernel, which builds the [H, q, S] scores and their softmax in float32
    (gigabytes for a long chunk over a long context, outside the KV budget). Expanded
    keys and values (H x S x D more) let the memory-efficient kernel take the mask. On
    a CPU grouped heads take the fast kernel."""
    return device.type != "cpu" and masked and num_heads != num_kv_heads


def causal_mask(
    query_len: int, context_len: int, device: torch.device, sliding_window: int | None = None
) -> torch.Tensor | None:
    """Query row i (at position p = context_len - query_len + i) sees keys 0 .. p, or
    p - sliding_window + 1 .. p. None when no mask is needed (one query row, no window
    to apply) or SDPA's own ``is_causal`` applies (the sequence is all new, so its
    causal mask is the square one)."""
    windowed = sliding_window is not None and context_len > sliding_window
    if not windowed and (query_len == 1 or query_len == context_len):
        return None
    query_positions = torch.arange(context_len - query_len, context_len, device=device)[:, None]
    key_positions = torch.arange(context_len, device=device)[None, :]
    mask = query_positions >= key_positions
    if windowed:
        assert sliding_window is not None
        mask &= key_positions > query_positions - sliding_window
    return mask
