"""Paged attention with torch SDPA, on any device: each prefill sequence attends over its
own blocks, gathered into a reused workspace (or read as a view of the pool when its
blocks are consecutive); every single-token decode of a batch goes into one padded call.
``paged_attention`` hooks it into transformers; ``flash_attention`` is the CUDA kernel
backend beside it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

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
class DecodeGroup:
    """Sequences feeding few tokens each (decodes, verification passes), attended in
    one call per layer, padded to the most rows and the longest context among them."""

    rows: Upload
    """[B * max_rows] long: each sequence's rows in the batch, its last repeated where
    it has fewer than ``max_rows``."""
    kept: Upload
    """[N] long: the real rows among those (flat indices into ``rows``)."""
    out_rows: Upload
    """[N] long: the batch rows the kept ones are."""
    block_ids: Upload
    """[B * max_blocks] long: each sequence's blocks, padded with block 0."""
    lengths: Upload
    """[B] long: each sequence's context length."""
    query_lens: Upload
    """[B] long: each sequence's rows."""
    max_rows: int
    width: int
    """max_blocks * block_size: the padded context each row attends over."""

    def mask(self, sliding_window: int | None) -> torch.Tensor:
        """[B, 1, max_rows, width] bool: the keys each row sees: its context up to its own
        position (and inside the window). A repeated row sees what the last one does."""
        device = self.lengths.tensor.device
        keys = torch.arange(self.width, device=device)[None, None, :]
        lengths = self.lengths.tensor[:, None]
        query_lens = self.query_lens.tensor[:, None]
        rows = torch.arange(self.max_rows, device=device)[None, :]
        positions = (lengths - query_lens + torch.minimum(rows, query_lens - 1))[:, :, None]
        inside = keys <= positions
        if sliding_window is not None:
            inside &= keys > positions - sliding_window
        return inside[:, None]


@dataclass
class SdpaAttentionMetadata:
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    """Per layer (keys, values), each [num_blocks, block_size, num_kv_heads, head_dim]."""
    slots: Upload
    """[T] long: where each new token's key and value go."""
    sequences: list[SequenceAttention]
    """Sequences attended one by one (prefill chunks, lone decodes)."""
    decode_group: DecodeGroup | None
    workspace: tuple[torch.Tensor, torch.Tensor]
    """Reused (keys, values) buffers, each [max_blocks, block_size, Hkv, D], that one
    sequence's context is gathered into: fresh allocations per gather cost page faults
    that made gathering ~9x slower on CPU."""
    window_masks: dict[int | None, tuple[list[torch.Tensor | None], torch.Tensor | None]] = field(
        default_factory=dict
    )
    """Per sliding-window size (None: no window), the sequences' and the decode group's
    masks: built by the first layer that needs them, reused by the others."""

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
        masks, group_mask = self._masks(sliding_window)
        group = self.decode_group
        if group is None and len(self.sequences) == 1:  # one sequence: its rows are all
            seq = self.sequences[0]
            return self._attend_one(query, key_cache, value_cache, seq, masks[0], scaling)[
                0
            ].transpose(0, 1)
        output = query.new_empty(query.shape[2], query.shape[1], query.shape[3])  # [T, H, D]
        if group is not None and group_mask is not None:
            output[group.out_rows.tensor] = _attend_decodes(
                query,
                key_cache,
                value_cache,
                group,
                group_mask,
                self.workspace,
                scaling,
            )
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
        if seq.query_len == 1 or (mask is not None and seq.query_len <= MAX_FOLDED_ROWS):
            return _folded_attention(queries, keys, values, mask, scaling)
        attended = F.scaled_dot_product_attention(
            queries,
            keys,
            values,
            attn_mask=mask,
            is_causal=mask is None,
            scale=scaling,
            enable_gqa=True,
        )
        return attended if attended.dtype == query.dtype else attended.to(query.dtype)

    def _masks(
        self, sliding_window: int | None
    ) -> tuple[list[torch.Tensor | None], torch.Tensor | None]:
        group = self.decode_group
        if sliding_window not in self.window_masks:
            if sliding_window is None:
                masks = [seq.mask for seq in self.sequences]
            else:
                device = self.slot_mapping.device
                masks = [
                    causal_mask(seq.query_len, seq.context_len, device, sliding_window)
                    for seq in self.sequences
                ]
            group_mask = group.mask(sliding_window) if group is not None else None
            self.window_masks[sliding_window] = (masks, group_mask)
        return self.window_masks[sliding_window]


class SdpaBackend:
    """torch SDPA over each sequence's gathered blocks; decodes padded into one call.
    It computes in the queries' dtype: float32 for a 16-bit model on a CPU without
    16-bit units (``cpu_matmul.compute_in_float32``), whose pool is float32 too
    (``model_runner.kv_dtype``). Decodes fold the query heads that share a key head
    into that head's query rows (``_folded_attention``)."""

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


def _attend_decodes(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    group: DecodeGroup,
    mask: torch.Tensor,
    workspace: tuple[torch.Tensor, torch.Tensor],
    scaling: float | None,
) -> torch.Tensor:
    """One SDPA call for the group's sequences: -> [N, H, D], the kept rows."""
    block_ids, num_blocks = group.block_ids.tensor, group.block_ids.length
    num_sequences = group.lengths.length
    num_heads, num_kv_heads, head_dim = query.shape[1], *key_cache.shape[-2:]

    def gather(cache: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
        blocks = torch.index_select(cache, 0, block_ids, out=buffer[:num_blocks])
        shape = (num_sequences, -1, num_kv_heads, head_dim)
        return blocks.view(shape).transpose(1, 2)  # [B, Hkv, S, D]

    keys, values = gather(key_cache, workspace[0]), gather(value_cache, workspace[1])
    queries = query[0, :, group.rows.tensor].view(num_heads, num_sequences, -1, head_dim)
    attended = _folded_attention(queries.transpose(0, 1), keys, values, mask, scaling)
    attended = attended.transpose(1, 2).reshape(-1, num_heads, head_dim)  # [B * R, H, D]
    return attended[group.kept.tensor]


MAX_FOLDED_ROWS = 16
"""A sequence of up to this many query rows (a verification pass, a short append)
attends with its query heads folded (``_folded_attention``); longer ones, whose cost is
arithmetic rather than reading keys, as torch's SDPA takes them."""


def _folded_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float | None,
) -> torch.Tensor:
    """SDPA of few query rows per sequence: [B, H, q, D] queries over [B, Hkv, S, D] keys
    and values -> [B, H, q, D]. ``mask``: [B, 1, q, S] (a group), [q, S] (one
    sequence), or None (one sequence's one row).

    The query heads that share a key head (consecutive ones, as transformers groups
    them) become that head's query rows: [B, Hkv, H / Hkv * q, D], so each key head's
    keys are read once for all of them, where ``enable_gqa`` reads them once per query
    head; the mask repeats for each folded head. For 16-bit values on a CPU this
    replaced upcasting decodes to float32 (torch's 16-bit CPU kernel is slow on a
    single query row, not on three). Measured in the engine on an EPYC with AVX-512
    BF16, the default model in bfloat16 (three query heads a key head), attention's
    share of a decode step: 4.8 against 5.8 ms for 8 sessions after a 103-token
    prompt, 104 against 322 ms for 8 sessions over 2,000 tokens; one session over 2,000
    tokens took 13-16 against 11-13 ms (its 3 key heads, perhaps, split unevenly over 2
    threads). float32 took the same time either way. Five verification rows over 1,000
    to 2,000 keys took 0.75-0.78x as long in bfloat16, 0.85-0.89x in float32, with
    bit-identical outputs (at 16 rows and over 300 keys, about the same). Where a
    fold leaves a single query row (a key head per query head), a 16-bit query is
    upcast: the 16-bit kernel took 2-4x as long on one row as float32 did, upcast
    included. The result is rounded once to the queries' dtype."""
    batch, num_heads, num_rows, head_dim = queries.shape
    num_kv_heads = keys.shape[1]
    group = num_heads // num_kv_heads
    folded = queries.reshape(batch, num_kv_heads, group * num_rows, head_dim)
    if num_rows > 1 and mask is not None and group > 1:
        # Folded row g * q + i is query row i: [q, S] -> [g * q, S], [B, 1, q, S] too.
        mask = mask.repeat(*[1] * (mask.dim() - 2), group, 1)
    dtype = queries.dtype
    if (
        folded.shape[2] == 1
        and queries.device.type == "cpu"
        and dtype in (torch.bfloat16, torch.float16)
    ):
        folded, keys, values = folded.float(), keys.float(), values.float()
    attended = F.scaled_dot_product_attention(folded, keys, values, attn_mask=mask, scale=scaling)
    return attended.reshape(batch, num_heads, num_rows, head_dim).to(dtype)


def build_metadata(
    spans: list[Any],
    slot_mapping: list[int],
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
    workspace: tuple[torch.Tensor, torch.Tensor],
    block_size: int,
    uploads: Uploads,
) -> SdpaAttentionMetadata:
    """The SDPA inputs of one batch of SequenceSpans: single-token sequences go
    into one padded decode group where they can (``_grouped_decodes``)."""
    device = workspace[0].device
    grouped = _grouped_decodes(spans, block_size, workspace[0].shape[0])
    group = None
    if grouped:
        max_blocks = -(-grouped[0].context_len // block_size)
        group = _decode_group(grouped, max_blocks, block_size, uploads)
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
        decode_group=group,
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


MAX_GROUP_PADDING = 2
"""A decode group pads every context to its longest: it holds at most this many times
the blocks its contexts fill (the longest decodes attend alone until it does)."""


def _grouped_decodes(spans: list[Any], block_size: int, workspace_blocks: int) -> list[Any]:
    """The sequences of up to ``MAX_FOLDED_ROWS`` rows (decodes, verification passes)
    that go into the padded group, longest context first:
    all of them, less the longest while the padded group would exceed
    ``workspace_blocks`` or ``MAX_GROUP_PADDING`` times the blocks the contexts fill;
    empty when fewer than two remain. One padded call per layer took 0.55x the step of
    calls one sequence at a time for 8 sessions over 2,000 tokens (bfloat16 on an EPYC
    with AVX-512 BF16; 0.56x in float32); a call for one sequence has only its few key
    heads to spread over the CPU's threads."""
    decodes = sorted(
        (span for span in spans if span.query_len <= MAX_FOLDED_ROWS),
        key=lambda span: span.context_len,
        reverse=True,
    )
    blocks = [-(-span.context_len // block_size) for span in decodes]
    filled = sum(blocks)
    for first in range(len(decodes) - 1):
        padded = blocks[first] * (len(decodes) - first)
        if padded <= workspace_blocks and padded <= MAX_GROUP_PADDING * filled:
            return decodes[first:]
        filled -= blocks[first]
    return []


def _decode_group(
    decodes: list[Any], max_blocks: int, block_size: int, uploads: Uploads
) -> DecodeGroup:
    max_rows = max(span.query_len for span in decodes)
    block_ids: list[int] = []
    rows: list[int] = []
    kept: list[int] = []
    out_rows: list[int] = []
    for index, span in enumerate(decodes):
        table = span.block_table[: -(-span.context_len // block_size)]
        block_ids += table + [0] * (max_blocks - len(table))
        start, count = span.query_start, span.query_len
        rows += [start + min(row, count - 1) for row in range(max_rows)]
        kept += range(index * max_rows, index * max_rows + count)
        out_rows += range(start, start + count)
    return DecodeGroup(
        rows=uploads.add(rows),
        kept=uploads.add(kept),
        out_rows=uploads.add(out_rows),
        block_ids=uploads.add(block_ids),
        lengths=uploads.add([span.context_len for span in decodes]),
        query_lens=uploads.add([span.query_len for span in decodes]),
        max_rows=max_rows,
        width=max_blocks * block_size,
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
