"""A batch of sequences over a scattered KV pool, attended by a backend and by dense
attention (the oracle): shared by the attention backends' tests."""

from __future__ import annotations

import random
from typing import Any

import torch
import torch.nn.functional as F

from salience_server.engine import paged_attention
from salience_server.engine.batch import ForwardBatch
from salience_server.engine.uploads import Uploads

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 4, 2, 16


class Layer(torch.nn.Module):
    layer_idx = 0


def attend_batch(
    backend: Any,
    block_size: int,
    shapes: list[tuple[int, int]],
    seed: int = 0,
    extra: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    heads: tuple[int, int] = (NUM_HEADS, NUM_KV_HEADS),
    device: torch.device | None = None,
    is_scattered: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences of (cached tokens, new tokens) in one batch, their blocks scattered
    through the pool: -> (backend output [T, H, D], dense oracle [T, H, D]). The pool
    and the inputs are in ``dtype``; the oracle computes in float32 from those values.
    ``heads``: (query heads, key heads). ``device``: where the pool and the inputs go
    (the backend's; the oracle is computed on the CPU). Without ``is_scattered`` each
    sequence's blocks are consecutive ids (the backend then reads a view of the pool).
    The output comes back on the CPU."""
    num_heads, num_kv_heads = heads
    generator = torch.Generator().manual_seed(seed)
    blocks_needed = [-(-(cached + new) // block_size) for cached, new in shapes]
    num_blocks = sum(blocks_needed) + 3
    pool_ids = list(range(num_blocks))
    if is_scattered:
        random.Random(seed).shuffle(pool_ids)
    pool_shape = (num_blocks, block_size, num_kv_heads, HEAD_DIM)
    key_cache = torch.randn(pool_shape).to(dtype)  # stale data
    value_cache = torch.randn(pool_shape).to(dtype)
    batch = ForwardBatch()
    new_queries, new_keys, new_values, oracle = [], [], [], []
    for (cached, new), count in zip(shapes, blocks_needed, strict=True):
        table, pool_ids = pool_ids[:count], pool_ids[count:]
        keys = torch.randn(cached + new, num_kv_heads, HEAD_DIM, generator=generator).to(dtype)
        values = torch.randn(cached + new, num_kv_heads, HEAD_DIM, generator=generator).to(dtype)
        queries = torch.randn(new, num_heads, HEAD_DIM, generator=generator).to(dtype)
        for position in range(cached):  # the context an earlier step left in the pool
            slot = divmod(position, block_size)
            key_cache[table[slot[0]], slot[1]] = keys[position]
            value_cache[table[slot[0]], slot[1]] = values[position]
        batch.add_sequence([0] * new, cached, table, block_size)
        new_queries.append(queries)
        new_keys.append(keys[cached:])
        new_values.append(values[cached:])
        mask = torch.arange(cached, cached + new)[:, None] >= torch.arange(cached + new)[None, :]
        dense = F.scaled_dot_product_attention(
            queries.float().transpose(0, 1),
            keys.float().transpose(0, 1),
            values.float().transpose(0, 1),
            attn_mask=mask,
            enable_gqa=True,
        )  # [H, new, D]
        oracle.append(dense.transpose(0, 1))
    device = device or torch.device("cpu")
    kv_caches = [(key_cache.to(device), value_cache.to(device))]
    uploads = Uploads(device)
    metadata = backend.build_metadata(batch.sequences, batch.slot_mapping, kv_caches, uploads)
    uploads.send()
    output, _ = paged_attention.paged_attention_forward(
        Layer(),
        torch.cat(new_queries).to(device).transpose(0, 1).unsqueeze(0),  # [1, H, T, D]
        torch.cat(new_keys).to(device).transpose(0, 1).unsqueeze(0),  # [1, Hkv, T, D]
        torch.cat(new_values).to(device).transpose(0, 1).unsqueeze(0),
        None,
        scaling=HEAD_DIM**-0.5,
        salience_batch=metadata,
        **(extra or {}),
    )
    return output[0].cpu(), torch.cat(oracle)


# (cached, new): an all-new prefill, chunks over cached context (one crossing a block
# boundary), decodes of different lengths, a decode of a one-token context.
MIXED_BATCH = [(0, 7), (13, 5), (29, 1), (0, 1), (40, 1), (3, 9), (77, 2)]
