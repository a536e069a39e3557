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


def score(logprobs: torch.Tensor, token_id: int, top_k: int) -> TokenLogprob:
    """The logprob and rank of ``token_id`` in one [V] row, and the row's top ``top_k``."""
    chosen = logprobs[token_id]
    rank = int((logprobs > chosen).sum().item()) + 1
    tops: list[tuple[int, float]] = []
    if top_k > 0:
        values, indices = torch.topk(logprobs, min(top_k, logprobs.shape[-1]))
        tops = list(zip(indices.tolist(), values.tolist(), strict=True))
    return TokenLogprob(float(chosen.item()), rank, tops)


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.seed is None or params.is_greedy:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed)
    return generator


def sample(
    logprobs: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    seen_token_ids: list[int],
) -> int:
    """Draws one token from a [V] row of raw logprobs."""
    logits = logprobs
    if params.repetition_penalty not in (0.0, 1.0) and seen_token_ids:
        logits = _penalize_repeats(logits, seen_token_ids, params.repetition_penalty)
    if params.is_greedy:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_k > 0 and params.top_k < probs.shape[-1]:
        threshold = torch.topk(probs, params.top_k).values[-1]
        probs = torch.where(probs >= threshold, probs, 0.0)
    if params.min_p > 0.0:
        probs = torch.where(probs >= params.min_p * probs.max(), probs, 0.0)
    if params.top_p < 1.0:
        probs = _top_p(probs, params.top_p)
    return int(torch.multinomial(probs, 1, generator=generator).item())


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
