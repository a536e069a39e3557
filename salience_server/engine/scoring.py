"""A step's logprobs, ranks and top logprobs, computed on the device from the raw
distribution, and the step's one read of its results on the host (``to_host``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class TokenLogprob:
    logprob: float
    rank: int
    """1 for the most likely token."""
    top_logprobs: list[tuple[int, float]]


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """[K, V] logits of any dtype -> [K, V] float32 logprobs."""
    return torch.log_softmax(logits.float(), dim=-1)


_RANK_ROWS_CPU, _RANK_ROWS_CUDA = 16, 1024
"""Rows ranked at a time: ranking compares each row with all V logprobs, and on CPU
the [rows, V] comparison is fastest while it stays in cache (measured: 16 rows of a
49152 vocabulary rank 5x faster than 256)."""


def score(
    logprobs: torch.Tensor,
    token_ids: torch.Tensor,
    top_ks: list[int],
    argmax_rows: list[int] | None = None,
) -> list[TokenLogprob]:
    """Each row's logprob and rank of its token, and its top ``top_ks[row]``: computed
    for all rows on their device, then copied to the host together. Rows in
    ``argmax_rows`` hold their argmax, so their rank is 1 without comparing."""
    if not top_ks:
        return []
    scores = score_on_device(logprobs, token_ids, top_ks, argmax_rows)
    return scored_rows(top_ks, *to_host(list(scores)))


def score_on_device(
    logprobs: torch.Tensor,
    token_ids: torch.Tensor,
    top_ks: list[int],
    argmax_rows: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """([K] logprobs of the tokens, [K] ranks - 1, [K, k] top values, [K, k] top ids),
    still on the device; ``scored_rows`` reads them once they are on the host."""
    chosen = logprobs.gather(1, token_ids[:, None])  # [K, 1]
    ranks = torch.zeros(len(top_ks), dtype=torch.long, device=logprobs.device)
    known = set(argmax_rows or ())
    step = _RANK_ROWS_CUDA if logprobs.is_cuda else _RANK_ROWS_CPU
    for start in range(0, len(top_ks), step):
        end = min(start + step, len(top_ks))
        if all(row in known for row in range(start, end)):
            continue  # a decode step's greedy rows: rank 1 without comparing
        # Summed as int32 (a vocabulary fits): 0.31 ms for 16 rows of 49,152, not 0.50.
        ranks[start:end] = (logprobs[start:end] > chosen[start:end]).sum(dim=1, dtype=torch.int32)
    top_k = min(max(top_ks), logprobs.shape[1])
    values, indices = _top_k_lowest_ids_first(logprobs, top_k)  # [K, top_k] each
    # Equal values in token-id order, as argmax (greedy's pick) takes the first of a
    # tie: a greedy token tied with another then leads its top list (topk orders ties
    # as it likes; in bf16, whose logits come in steps, ties are common).
    indices, by_id = indices.sort(dim=1)
    values, by_value = values.gather(1, by_id).sort(dim=1, descending=True, stable=True)
    return chosen[:, 0], ranks, values, indices.gather(1, by_value)


def _top_k_lowest_ids_first(logprobs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk``, except that where values tied with the k-th fall on both sides of
    the cut, the lowest ids among them are kept (topk keeps any): the list is the first
    k tokens in order of value, then id, as greedy's argmax orders them."""
    vocab_size = logprobs.shape[1]
    if k == 0 or k == vocab_size:
        return torch.topk(logprobs, k, dim=1)
    if not _reads_host_freely(logprobs.device):
        return _top_k_by_value_then_id(logprobs, k)
    # On the CPU reading a value is free, and one more column of topk shows where a
    # tie crosses the cut; such rows (a few in a thousand scored in bf16) are redone
    # over their whole row (faster here than ``_top_k_by_value_then_id``: 128 ms
    # against 269 for 2,000 tie-heavy rows of 49,152).
    values, indices = torch.topk(logprobs, k + 1, dim=1)
    crossing = (values[:, k] == values[:, k - 1]).nonzero()[:, 0].tolist()
    values, indices = values[:, :k].contiguous(), indices[:, :k].contiguous()
    for row in crossing:
        scores, kth = logprobs[row], values[row, k - 1]
        above = (scores > kth).nonzero()[:, 0]
        tied = (scores == kth).nonzero()[:, 0][: k - above.numel()]  # ids ascending
        indices[row] = torch.cat([above, tied])
        values[row] = scores[indices[row]]
    return values, indices


def _reads_host_freely(device: torch.device) -> bool:
    """Whether reading a value of ``device`` on the host costs nothing (the CPU): on a
    GPU each read waits for the work queued before it."""
    return device.type == "cpu"


_KEY_ROWS = 64
"""Rows keyed at a time by ``_top_k_by_value_then_id``: its temporaries take 24 bytes
per logprob (75 MB for 64 rows of a 49,152 vocabulary), outside the KV budget."""


def _top_k_by_value_then_id(logprobs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first k tokens by value, then id, without reading anything on the host (a
    device's way: each read is a sync): one topk over int64 keys, the float32 value's
    bits made order-preserving in the high half, the id reversed in the low half."""
    vocab_size = logprobs.shape[1]
    reversed_ids = vocab_size - 1 - torch.arange(vocab_size, device=logprobs.device)
    parts = []
    for start in range(0, logprobs.shape[0], _KEY_ROWS):
        # + 0.0: -0.0 becomes 0.0, which it equals (its bits would order it below).
        bits = (logprobs[start : start + _KEY_ROWS] + 0.0).view(torch.int32)
        ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(torch.int64)
        keys = ordered * (1 << 32) + reversed_ids
        parts.append(vocab_size - 1 - (torch.topk(keys, k, dim=1).values & 0xFFFFFFFF))
    indices = (
        torch.cat(parts) if parts else torch.empty(0, k, dtype=torch.long, device=logprobs.device)
    )
    return logprobs.gather(1, indices), indices


def scored_rows(
    top_ks: list[int],
    chosen: list[float],
    ranks: list[int],
    value_rows: list[list[float]],
    index_rows: list[list[int]],
) -> list[TokenLogprob]:
    """The per-row results of ``score_on_device``, as host lists."""
    results = []
    for row, (logprob, rank) in enumerate(zip(chosen, ranks, strict=True)):
        k = top_ks[row]
        tops = list(zip(index_rows[row][:k], value_rows[row][:k], strict=True)) if k else []
        results.append(TokenLogprob(logprob, int(rank) + 1, tops))
    return results


def to_host(tensors: list[torch.Tensor], one_copy: bool | None = None) -> list[Any]:
    """Each tensor as (nested) Python lists, in one device-to-host copy (each copy is a
    sync on CUDA): flattened into one float64 buffer, which holds token ids exactly.
    On the CPU each is simply read (``one_copy`` forces the packed path, for tests)."""
    if one_copy is None:
        one_copy = any(tensor.device.type != "cpu" for tensor in tensors)
    if not one_copy:
        return [tensor.tolist() for tensor in tensors]
    # Where a part is on the host already, it joins the device's buffer (a small copy),
    # rather than failing the step.
    device = next((t.device for t in tensors if t.device.type != "cpu"), tensors[0].device)
    packed = torch.cat([t.reshape(-1).to(device, torch.float64) for t in tensors]).cpu()
    results, start = [], 0
    for tensor in tensors:
        part = packed[start : start + tensor.numel()].reshape(tensor.shape)
        start += tensor.numel()
        if not tensor.dtype.is_floating_point:
            part = part.to(torch.long)
        results.append(part.tolist())
    return results
