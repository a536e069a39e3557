"""A plain-torch stand-in for ``flash_attn.flash_attn_varlen_func``, for machines
without CUDA. It follows flash-attn 2's documented contract, checks the inputs the
real kernel checks, and computes attention with an explicit softmax, so tests of
the glue around the kernel (cu_seqlens, block tables, packing, causal alignment)
run on CPU. It is slow and for tests only."""

from __future__ import annotations

import math

import torch


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [total_q, H, D]; k, v [total_k, Hkv, D], or [num_blocks, page_size, Hkv, D]
    with ``block_table`` [B, max_blocks]. Causal masks are aligned to the bottom right;
    ``window_size`` (left, right) limits query row i to keys i + k - q - left ..
    i + k - q + right (-1: unlimited)."""
    assert q.dim() == 3 and q.stride(-1) == 1, "q must be [total_q, H, D], last dim contiguous"
    assert cu_seqlens_q.dtype == torch.int32 and cu_seqlens_k.dtype == torch.int32
    assert cu_seqlens_q.shape == cu_seqlens_k.shape
    num_heads, head_dim = q.shape[1:]
    if block_table is not None:
        assert block_table.dtype == torch.int32 and block_table.dim() == 2
        assert k.dim() == 4 and k.shape[1] % 256 == 0, "paged KV needs pages of 256k tokens"
        assert block_table.shape[0] == cu_seqlens_q.shape[0] - 1
    else:
        assert k.dim() == 3 and k.shape[0] == int(cu_seqlens_k[-1])
    num_kv_heads = k.shape[-2]
    assert num_heads % num_kv_heads == 0 and k.shape[-1] == head_dim
    assert int(cu_seqlens_q[-1]) == q.shape[0]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    out = torch.zeros_like(q)
    query_lens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
    key_lens = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist()
    assert max(query_lens) <= max_seqlen_q and max(key_lens) <= max_seqlen_k
    for i, (query_len, key_len) in enumerate(zip(query_lens, key_lens, strict=True)):
        q_start = int(cu_seqlens_q[i])
        queries = q[q_start : q_start + query_len]  # [q, H, D]
        if block_table is not None:
            pages = -(-key_len // k.shape[1])
            keys = k[block_table[i, :pages].long()].flatten(0, 1)[:key_len]
            values = v[block_table[i, :pages].long()].flatten(0, 1)[:key_len]
        else:
            k_start = int(cu_seqlens_k[i])
            keys, values = k[k_start : k_start + key_len], v[k_start : k_start + key_len]
        group = num_heads // num_kv_heads
        keys = keys.repeat_interleave(group, dim=1)  # [k, H, D]
        values = values.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", queries.float(), keys.float()) * scale
        rows = torch.arange(query_len)[:, None] + key_len - query_len  # aligned bottom right
        keys_at = torch.arange(key_len)[None, :]
        left, right = window_size
        if causal:
            right = 0
        if right >= 0:
            scores = scores.masked_fill(keys_at > rows + right, float("-inf"))
        if left >= 0:
            scores = scores.masked_fill(keys_at < rows - left, float("-inf"))
        weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # an all-masked row gives 0
        out[q_start : q_start + query_len] = torch.einsum(
            "hqk,khd->qhd", weights, values.float()
        ).to(q.dtype)
    return out
