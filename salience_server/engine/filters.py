"""Sampling filters and the draw, for many rows at once.

Order (as in vLLM): temperature, then min-p, then top-k, then top-p, each on the
distribution the previous one left (renormalised):
- min-p keeps the tokens whose probability is at least ``min_p`` times the top one's;
- top-k keeps the ``k`` most likely tokens (and any tied with the k-th);
- top-p keeps the smallest set of most likely tokens whose mass reaches ``p`` (the
  token that crosses ``p`` is kept).
The draw inverts each row's cumulative distribution at one uniform number: token ``i``
is picked when the number falls in its ``[cdf_{i-1}, cdf_i)``, with probability ``p_i``.
The running sums are in float64, so that even a token of probability 1e-12 keeps its
share, and a token of probability 0 is never picked; they run over the masses of blocks
of 256 tokens, then inside the one block that holds the target. One random number per
row, not one per token: an exponential race (``argmax(p / q)``, ``q ~ Exp(1)``) spent
18 ms drawing the noise for 16 rows of a 49,152-token vocabulary on this project's CPU,
against 0.6 ms for this.
Unlike ``torch.multinomial`` (22 ms) it never asserts on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from salience_server.engine.request import SamplingParams
from salience_server.engine.uploads import Upload, Uploads


class InvalidDistribution(ValueError):
    """A row left no token to draw (NaN logits, or every token filtered out)."""


@dataclass
class FilterPlan:
    """The filters of a step's sampled rows, planned on the host before the forward
    pass: the per-row values are parts of the step's upload, so filtering copies
    nothing to the device."""

    temperature: Upload | None
    """[D] floats, when a row's temperature is not 1."""
    min_p: Upload | None
    top_k: Upload | None
    """[D] each row's k - 1 (the vocabulary's size - 1 without top-k)."""
    max_k: int
    top_p: Upload | None
    """[D] floats, when a row has top-p (then the rows are sorted)."""


def plan_filters(params: list[SamplingParams], vocab_size: int, uploads: Uploads) -> FilterPlan:
    temperature = min_p = top_k = top_p = None
    if any(p.temperature != 1.0 for p in params):
        temperature = uploads.add_floats([p.temperature for p in params])
    if any(p.min_p > 0 for p in params):
        min_p = uploads.add_floats([p.min_p for p in params])
    top_ks = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
    if any(p.top_p < 1.0 for p in params):
        top_p = uploads.add_floats([p.top_p for p in params])
    if top_p is not None or any(k < vocab_size for k in top_ks):
        top_k = uploads.add([k - 1 for k in top_ks])
    return FilterPlan(temperature, min_p, top_k, max(top_ks, default=0), top_p)


def filter_logits(logits: torch.Tensor, plan: FilterPlan) -> torch.Tensor:
    """[D, V] float32 logits -> the tempered and filtered logits (removed: -inf); the
    input itself when no row changes it."""
    if plan.temperature is not None:
        logits = logits / plan.temperature.floats[:, None]
    if plan.min_p is not None:
        probs = torch.softmax(logits, dim=-1)
        threshold = plan.min_p.floats[:, None] * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, -torch.inf)
    if plan.top_k is None:
        return logits
    index = plan.top_k.tensor[:, None]
    if plan.top_p is None:  # top-k alone: no full sort needed
        kth = torch.topk(logits, plan.max_k, dim=-1).values  # [D, max k]
        return logits.masked_fill(logits < kth.gather(1, index), -torch.inf)
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [D, V] each
    sorted_logits = sorted_logits.masked_fill(
        sorted_logits < sorted_logits.gather(1, index), -torch.inf
    )
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    top_p = plan.top_p.floats[:, None]
    # Rows without top-p keep every token, whatever the rounding of their mass.
    sorted_logits = sorted_logits.masked_fill((mass_before >= top_p) & (top_p < 1.0), -torch.inf)
    return torch.full_like(logits, -torch.inf).scatter(1, order, sorted_logits)


def draw(
    logits: torch.Tensor, generators: list[torch.Generator | None]
) -> tuple[torch.Tensor, torch.Tensor]:
    """[D, V] filtered logits -> ([D] token ids drawn from their softmax, [D] bool: the
    row had a token to draw). Rows with a generator draw their noise from it (seeded,
    reproducible), in row order; the others share one draw. A row with nothing left to
    draw (NaN logits, or every token filtered out) gets token 0 and False, which the
    caller reads on the host with the tokens: no sync here."""
    probs = torch.softmax(logits, dim=-1)
    num_rows, vocab_size = probs.shape
    # Two levels, so that the sequential sum runs over block masses and one block per
    # row rather than the whole vocabulary: the block holding the target, then the
    # token inside it. Padding tokens have no mass, so they are never picked. Block
    # masses are float32 sums (pairwise: relative error ~1e-7, that of the softmax).
    padding = -vocab_size % DRAW_BLOCK  # none for most vocabularies: no copy then
    blocks = (F.pad(probs, (0, padding)) if padding else probs).view(num_rows, -1, DRAW_BLOCK)
    block_cdf = blocks.sum(dim=-1).double().cumsum(dim=-1)  # [D, blocks]
    # A row of NaN, or with every token filtered out, has NaN mass (softmax of -inf).
    valid = block_cdf[:, -1] > 0
    block_cdf = torch.where(valid[:, None], block_cdf, 1.0)  # any token, then 0 below
    uniforms = torch.empty(num_rows, 1, dtype=torch.float64, device=probs.device)
    if any(generator is None for generator in generators):
        uniforms.uniform_()  # the seeded rows' are drawn again below
    for row, generator in enumerate(generators):
        if generator is not None:
            uniforms[row].uniform_(generator=generator)
    targets = uniforms * block_cdf[:, -1:]
    block = _invert(block_cdf, targets)  # [D, 1]
    before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp(min=0)), 0.0)
    inside = blocks.gather(1, block[:, :, None].expand(-1, -1, DRAW_BLOCK))[:, 0]
    token_cdf = before + inside.cumsum(dim=-1, dtype=torch.float64)  # [D, DRAW_BLOCK]
    token_ids = (block * DRAW_BLOCK + _invert(token_cdf, targets))[:, 0]
    return torch.where(valid, token_ids.clamp(max=vocab_size - 1), 0), valid


DRAW_BLOCK = 256


def _invert(cdf: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[D, N] ascending cumulative masses, [D, 1] targets -> [D, 1] the first index whose
    mass passes its target: an entry with mass of its own. A target that rounding put
    at or past the last mass gets the last entry with mass."""
    picks = torch.searchsorted(cdf, targets, right=True)
    last = torch.searchsorted(cdf, cdf[:, -1:].contiguous(), right=False)
    return torch.minimum(picks, last)
