"""Turns logits into tokens and log-probabilities.

Logprobs, ranks and top-k always come from the raw distribution (before temperature,
top-k, top-p, min-p and repetition penalty); sampling uses the processed one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from salience_server.engine.request import SamplingParams


@dataclass
class TokenLogprob:
    logprob: float
    rank: int
    """1 for the most likely token."""
    top_logprobs: list[tuple[int, float]]


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """[K, V] logits of any dtype -> [K, V] float32 logprobs."""
    return torch.log_softmax(logits.float(), dim=-1)


@dataclass
class Draw:
    """A row whose next token is sampled (a decode), rather than given (a scored row)."""

    params: SamplingParams
    generator: torch.Generator | None
    seen_token_ids: list[int]
    """The session's tokens, for the repetition penalty."""


_RANK_ROWS_CPU, _RANK_ROWS_CUDA = 16, 1024
"""Rows ranked at a time: ranking compares each row with all V logprobs, and on CPU
the [rows, V] comparison is fastest while it stays in cache (measured: 16 rows of a
49152 vocabulary rank 5x faster than 256)."""


def pick_tokens(logprobs: torch.Tensor, picks: list[int | Draw]) -> tuple[torch.Tensor, list[int]]:
    """[K, V] raw logprobs -> ([K] long token ids on their device, the rows whose token
    is their argmax): the given id for a scored row, a draw for a decoded one. Plain
    greedy rows share one argmax; rows that sample draw one by one (each has its own
    generator). Nothing is copied to the host."""
    token_ids = torch.tensor(
        [pick if isinstance(pick, int) else 0 for pick in picks],
        dtype=torch.long,
        device=logprobs.device,
    )
    plain_greedy = [
        row
        for row, pick in enumerate(picks)
        if isinstance(pick, Draw) and pick.params.is_greedy and not _penalizes(pick)
    ]
    if plain_greedy:
        rows = torch.tensor(plain_greedy, dtype=torch.long, device=logprobs.device)
        if 2 * len(plain_greedy) >= len(picks):  # mostly decodes: scan all, copy nothing
            token_ids[rows] = torch.argmax(logprobs, dim=-1)[rows]
        else:  # mostly scored rows: copy out the few greedy ones
            token_ids[rows] = torch.argmax(logprobs[rows], dim=-1)
    chosen = set(plain_greedy)
    for row, pick in enumerate(picks):
        if isinstance(pick, Draw) and row not in chosen:
            token_ids[row] = _draw(logprobs[row], pick)
    return token_ids, plain_greedy


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
    chosen = logprobs.gather(1, token_ids[:, None])  # [K, 1]
    ranks = torch.zeros(len(top_ks), dtype=torch.long, device=logprobs.device)
    known = set(argmax_rows or ())
    step = _RANK_ROWS_CUDA if logprobs.is_cuda else _RANK_ROWS_CPU
    for start in range(0, len(top_ks), step):
        end = min(start + step, len(top_ks))
        if all(row in known for row in range(start, end)):
            continue  # a decode step's greedy rows: rank 1 without comparing
        ranks[start:end] = (logprobs[start:end] > chosen[start:end]).sum(dim=1)
    top_k = min(max(top_ks), logprobs.shape[1])
    value_rows: list[list[float]] = []
    index_rows: list[list[int]] = []
    if top_k > 0:
        values, indices = torch.topk(logprobs, top_k, dim=1)
        value_rows, index_rows = values.tolist(), indices.tolist()
    results = []
    for row, (logprob, rank) in enumerate(zip(chosen[:, 0].tolist(), ranks.tolist(), strict=True)):
        k = top_ks[row]
        tops = list(zip(index_rows[row][:k], value_rows[row][:k], strict=True)) if k else []
        results.append(TokenLogprob(logprob, rank + 1, tops))
    return results


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.seed is None or params.is_greedy:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed)
    return generator


def _penalizes(draw: Draw) -> bool:
    return draw.params.repetition_penalty not in (0.0, 1.0) and bool(draw.seen_token_ids)


def _draw(logprobs: torch.Tensor, draw: Draw) -> torch.Tensor:
    """One token (a 0-dim tensor) from a [V] row of raw logprobs."""
    params = draw.params
    logits = logprobs
    if _penalizes(draw):
        logits = _penalize_repeats(logits, draw.seen_token_ids, params.repetition_penalty)
    if params.is_greedy:
        return torch.argmax(logits)
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_k > 0 and params.top_k < probs.shape[-1]:
        threshold = torch.topk(probs, params.top_k).values[-1]
        probs = torch.where(probs >= threshold, probs, 0.0)
    if params.min_p > 0.0:
        probs = torch.where(probs >= params.min_p * probs.max(), probs, 0.0)
    if params.top_p < 1.0:
        probs = _top_p(probs, params.top_p)
    return torch.multinomial(probs, 1, generator=draw.generator)[0]


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keeps the smallest set of most likely tokens whose mass reaches top_p."""
    sorted_probs, order = torch.sort(probs, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_probs = torch.where(mass_before < top_p * sorted_probs.sum(), sorted_probs, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs)


def _penalize_repeats(logits: torch.Tensor, token_ids: list[int], penalty: float) -> torch.Tensor:
    """CTRL's penalty: seen tokens' logits are divided by it (multiplied when negative)."""
    index = torch.tensor(sorted(set(token_ids)), device=logits.device)
    seen = logits[index]
    logits = logits.clone()
    logits[index] = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits
