"""Attention over the paged KV pool, hooked into transformers' attention registry.

transformers models call ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`` in
every attention layer with the projected, rotated queries, keys and values, and pass
the model's extra keyword arguments down. We register ``salience_paged`` and pass a
``PagedAttentionMetadata`` as ``salience_batch``: the function writes the new keys and
values into the pool through the slot mapping, then attends each sequence over its
own blocks. Llama, Qwen2 and Qwen3 models work unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

ATTENTION_NAME = "salience_paged"


@dataclass
class SequenceAttention:
    query_start: int
    query_len: int
    context_len: int
    block_ids: torch.Tensor
    """[num_blocks] long: the blocks holding this sequence's context."""
    mask: torch.Tensor | None
    """[query_len, context_len] bool causal mask, None for a single query row."""


@dataclass
class PagedAttentionMetadata:
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    """Per layer (keys, values), each [num_blocks, block_size, num_kv_heads, head_dim]."""
    slot_mapping: torch.Tensor
    """[T] long: where each new token's key and value go."""
    sequences: list[SequenceAttention]
    workspace: tuple[torch.Tensor, torch.Tensor]
    """Reused (keys, values) buffers, each [max_blocks, block_size, Hkv, D], that one
    sequence's context is gathered into: fresh allocations per gather cost page faults
    that made gathering ~9x slower on CPU."""


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    salience_batch: PagedAttentionMetadata | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query [1, H, T, D], key/value [1, Hkv, T, D] -> output [1, T, H, D]."""
    if salience_batch is None:
        raise RuntimeError("salience_paged attention needs salience_batch")
    key_cache, value_cache = salience_batch.kv_caches[int(module.layer_idx)]  # type: ignore[arg-type]
    num_kv_heads, head_dim = key_cache.shape[-2:]
    # Write the new tokens' keys and values first: each sequence attends to itself too.
    key_cache.view(-1, num_kv_heads, head_dim)[salience_batch.slot_mapping] = key[0].transpose(0, 1)
    value_cache.view(-1, num_kv_heads, head_dim)[salience_batch.slot_mapping] = value[0].transpose(
        0, 1
    )
    output = query.new_empty(query.shape[2], query.shape[1], query.shape[3])  # [T, H, D]
    for seq in salience_batch.sequences:
        rows = slice(seq.query_start, seq.query_start + seq.query_len)
        keys = _gather(key_cache, seq, salience_batch.workspace[0])  # [1, Hkv, ctx, D]
        values = _gather(value_cache, seq, salience_batch.workspace[1])
        attended = F.scaled_dot_product_attention(
            query[:, :, rows], keys, values, attn_mask=seq.mask, scale=scaling, enable_gqa=True
        )  # [1, H, q, D]
        output[rows] = attended[0].transpose(0, 1)
    return output.unsqueeze(0), None


def _gather(cache: torch.Tensor, seq: SequenceAttention, workspace: torch.Tensor) -> torch.Tensor:
    """[num_blocks, block_size, Hkv, D] -> this sequence's [1, Hkv, context_len, D]."""
    blocks = torch.index_select(cache, 0, seq.block_ids, out=workspace[: len(seq.block_ids)])
    return blocks.flatten(0, 1)[: seq.context_len].transpose(0, 1).unsqueeze(0)


def causal_mask(query_len: int, context_len: int, device: torch.device) -> torch.Tensor | None:
    """Query row i (at position context_len - query_len + i) sees keys 0 .. that position."""
    if query_len == 1:
        return None
    query_positions = torch.arange(context_len - query_len, context_len, device=device)
    return query_positions[:, None] >= torch.arange(context_len, device=device)[None, :]


def _no_mask(*args: Any, **kwargs: Any) -> None:
    """The model's own mask is unused: paged attention builds per-sequence masks."""
    return None


def register() -> None:
    AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)
