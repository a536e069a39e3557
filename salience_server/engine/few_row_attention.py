"""Attention for sequences of few query rows (decodes, verification passes, short
appends): their query heads folded into their key heads' rows
(``attend_folded``), and several such sequences padded into one call per layer
(``FewRowGroup``). ``sdpa_attention`` attends everything else one sequence at a time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from salience_server.engine.uploads import Upload, Uploads

MAX_FOLDED_ROWS = 16
"""A sequence of up to this many query rows (a verification pass, a short append)
attends with its query heads folded (``attend_folded``); longer ones, whose cost is
arithmetic rather than reading keys, as torch's SDPA takes them."""


def attend_folded(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float | None,
) -> torch.Tensor:
    """SDPA of few query rows per sequence: [B, H, q, D] queries over [B, Hkv, S, D] keys
    and values -> [B, H, q, D]. ``mask``: as ``sdpa_mask`` makes it for folded rows:
    [B, 1, H / Hkv * q, S] (a group), [H / Hkv * q, S] or [1, S] (one sequence), or None
    (one sequence's one row).

    The query heads that share a key head (consecutive ones, as transformers groups
    them) become that head's query rows: [B, Hkv, H / Hkv * q, D], so each key head's
    keys are read once for all of them, where ``enable_gqa`` reads them once per query
    head. For 16-bit values on a CPU this
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
    dtype = queries.dtype
    if (
        folded.shape[2] == 1
        and queries.device.type == "cpu"
        and dtype in (torch.bfloat16, torch.float16)
    ):
        folded, keys, values = folded.float(), keys.float(), values.float()
        mask = mask.float() if mask is not None else None  # a window's, -inf stays -inf
    attended = F.scaled_dot_product_attention(folded, keys, values, attn_mask=mask, scale=scaling)
    return attended.reshape(batch, num_heads, num_rows, head_dim).to(dtype)


def sdpa_mask(
    mask: torch.Tensor | None, heads_per_key_head: int, folds: bool, dtype: torch.dtype
) -> torch.Tensor | None:
    """A bool mask ([q, S], or [B, 1, q, S] for a group: True where a row sees a key) as
    SDPA takes it, made once a step for every layer: for rows that fold
    (``attend_folded``), repeated for each query head of a key head (folded row
    g * q + i is query row i); and additive (0 where seen, -inf elsewhere) in ``dtype``,
    since torch's CPU kernel turns a bool mask into that in every call. For 5
    verification rows folded to 15 over 512 keys, SDPA took 0.58x as long in bfloat16
    with the folded additive mask as with the bool one repeated in the call, 0.68x in
    float32, bit-identical."""
    if mask is None:
        return None
    if folds and heads_per_key_head > 1 and mask.shape[-2] > 1:
        mask = mask.repeat(*[1] * (mask.dim() - 2), heads_per_key_head, 1)
    additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return additive.masked_fill_(~mask, -torch.inf)


@dataclass
class FewRowGroup:
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
    first_row: int | None = None
    """Where the sequences' rows are consecutive in the batch, each with ``max_rows``
    (decodes alone, or verification passes of one width), the first of them: the
    queries are then a slice of the batch's and the attended rows go back as one, where
    three indexing operators per layer otherwise pick and place them (about 1 ms of a
    45 ms step for 8 bfloat16 decodes of the default model on a 2-core CPU)."""

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


MAX_GROUP_PADDING = 2
"""A few-row group pads every context to its longest: it holds at most this many times
the blocks its contexts fill (the longest decodes attend alone until it does)."""


def group_members(spans: list[Any], block_size: int, workspace_blocks: int) -> list[Any]:
    """The sequences of up to ``MAX_FOLDED_ROWS`` rows (decodes, verification passes)
    that go into the padded group, in the batch's order:
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
            members = {id(span) for span in decodes[first:]}
            return [span for span in spans if id(span) in members]
        filled -= blocks[first]
    return []


def build_group(decodes: list[Any], block_size: int, uploads: Uploads) -> FewRowGroup:
    max_rows = max(span.query_len for span in decodes)
    max_blocks = max(-(-span.context_len // block_size) for span in decodes)
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
    consecutive = rows == out_rows == list(range(rows[0], rows[0] + len(rows)))
    return FewRowGroup(
        rows=uploads.add(rows),
        kept=uploads.add(kept),
        out_rows=uploads.add(out_rows),
        block_ids=uploads.add(block_ids),
        lengths=uploads.add([span.context_len for span in decodes]),
        query_lens=uploads.add([span.query_len for span in decodes]),
        max_rows=max_rows,
        width=max_blocks * block_size,
        first_row=rows[0] if consecutive else None,
    )


def attend_group(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    group: FewRowGroup,
    mask: torch.Tensor,
    workspace: tuple[torch.Tensor, torch.Tensor],
    scaling: float | None,
) -> torch.Tensor:
    """One SDPA call for the group's sequences: -> [N, H, D], the kept rows (in the
    batch's order from ``group.first_row``, where that is set)."""
    block_ids, num_blocks = group.block_ids.tensor, group.block_ids.length
    num_sequences = group.lengths.length
    num_heads, num_kv_heads, head_dim = query.shape[1], *key_cache.shape[-2:]

    def gather(cache: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
        blocks = torch.index_select(cache, 0, block_ids, out=buffer[:num_blocks])
        shape = (num_sequences, -1, num_kv_heads, head_dim)
        return blocks.view(shape).transpose(1, 2)  # [B, Hkv, S, D]

    keys, values = gather(key_cache, workspace[0]), gather(value_cache, workspace[1])
    first = group.first_row
    if first is None:
        queries = query[0, :, group.rows.tensor]
    else:
        queries = query[0, :, first : first + num_sequences * group.max_rows]
    queries = queries.view(num_heads, num_sequences, -1, head_dim)
    attended = attend_folded(queries.transpose(0, 1), keys, values, mask, scaling)
    attended = attended.transpose(1, 2).reshape(-1, num_heads, head_dim)  # [B * R, H, D]
    return attended if first is not None else attended[group.kept.tensor]
