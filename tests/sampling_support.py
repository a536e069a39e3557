"""What the sampler's tests share: random logits, one-row draws and their errors, and
the filters' definitions on the full distribution (to test the step's batched forms
against). The step's functions take plans made before the forward pass; these plan and
send at once."""

from __future__ import annotations

import torch

from salience_server.engine import penalties, sampler
from salience_server.engine.request import SamplingParams
from salience_server.engine.uploads import planned

VOCAB = 300
CPU = torch.device("cpu")


def random_logits(count: int, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, vocab, generator=generator) * 3


def draw_of(params: SamplingParams, shaping: penalties.Shaping | None = None) -> sampler.Draw:
    return sampler.Draw(params, sampler.make_generator(params, torch.device("cpu")), shaping)


def row_errors(picked: sampler.Picks) -> dict[int, Exception]:
    return picked.failed_rows(picked.valid.tolist())


def draw_rows(logits: torch.Tensor, draws: list[sampler.Draw]) -> torch.Tensor:
    vocab = logits.shape[1]
    plan = planned(lambda u: sampler.plan_draws(draws, vocab, u), CPU)
    return sampler.draw_rows(logits, plan)[0]


def kept_by_definition(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution after temperature, min-p, top-k and top-p, one at a time, by
    their definitions (a Python loop over the tokens sorted by probability)."""
    probs = torch.softmax(logits / params.temperature, dim=-1).tolist()
    kept = set(range(len(probs)))

    def renormalised() -> list[float]:
        total = sum(probs[i] for i in kept)
        return [probs[i] / total if i in kept else 0.0 for i in range(len(probs))]

    if params.min_p > 0:
        top = max(probs)
        kept = {i for i in kept if probs[i] >= params.min_p * top}
    if params.top_k > 0:
        ranked = sorted(kept, key=lambda i: -probs[i])
        kept = set(ranked[: params.top_k])
    if params.top_p < 1:
        current = renormalised()
        ranked = sorted(kept, key=lambda i: -current[i])
        mass, chosen = 0.0, set()
        for i in ranked:
            chosen.add(i)
            mass += current[i]
            if mass >= params.top_p:
                break
        kept = chosen
    return torch.tensor(renormalised())


CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}
"""The chi-square distribution's 99.9th percentile by degrees of freedom."""
