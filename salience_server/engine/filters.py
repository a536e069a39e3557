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

import torch
import torch.nn.functional as F

from salience_server.engine.request import SamplingParams


class InvalidDistribution(ValueError):
    """A row left no token to draw (NaN logits, or every token filtered out)."""


def filter_logits(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """[D, V] float32 logits -> the tempered and filtered logits (removed: -inf); the
    input itself when no row changes it."""
    device = logits.device
    if any(p.temperature != 1.0 for p in params):
        temperature = torch.tensor([p.temperature for p in params], device=device)
        logits = logits / temperature[:, None]
    if any(p.min_p > 0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], device=device)[:, None]
        probs = torch.softmax(logits, dim=-1)
        threshold = min_p * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, -torch.inf)
    vocab_size = logits.shape[1]
    top_ks = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
    top_ps = [p.top_p for p in params]
    if all(k == vocab_size for k in top_ks) and all(p >= 1.0 for p in top_ps):
        return logits
    if all(p >= 1.0 for p in top_ps):  # top-k alone: no full sort needed
        kth = torch.topk(logits, max(top_ks), dim=-1).values  # [D, max k]
        index = torch.tensor(top_ks, device=device)[:, None] - 1
        return logits.masked_fill(logits < kth.gather(1, index), -torch.inf)
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [D, V] each
    index = torch.tensor(top_ks, device=device)[:, None] - 1
    sorted_logits = sorted_logits.masked_fill(
        sorted_logits < sorted_logits.gather(1, index), -torch.inf
    )
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    top_p = torch.tensor(top_ps, device=device)[:, None]
    # Rows without top-p keep every token, whatever the rounding of their mass.
    sorted_logits = sorted_logits.masked_fill((mass_before >= top_p) & (top_p < 1.0), -torch.inf)
    return torch.full_like(logits, -torch.inf).scatter(1, order, sorted_logits)


def draw(logits: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """[D, V] filtered logits -> [D] token ids drawn from their softmax. Rows with a
    generator draw their noise from it (seeded, reproducible); the others share one
    draw. Raises InvalidDistribution when a row has nothing left to draw."""
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
    if not bool(valid.all()):
        bad = [row for row, ok in enumerate(valid.tolist()) if not ok]
        raise InvalidDistribution(f"rows {bad} have no token left to draw")
    uniforms = torch.empty(num_rows, 1, dtype=torch.float64, device=probs.device)
    unseeded = [row for row, generator in enumerate(generators) if generator is None]
    if len(unseeded) == len(generators):
        uniforms.uniform_()
    elif unseeded:
        uniforms[unseeded] = torch.rand_like(uniforms[unseeded])
    for row, generator in enumerate(generators):
        if generator is not None:
            uniforms[row].uniform_(generator=generator)
    targets = uniforms * block_cdf[:, -1:]
    block = _invert(block_cdf, targets)  # [D, 1]
    before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp(min=0)), 0.0)
    inside = blocks.gather(1, block[:, :, None].expand(-1, -1, DRAW_BLOCK))[:, 0]
    token_cdf = before + inside.cumsum(dim=-1, dtype=torch.float64)  # [D, DRAW_BLOCK]
    return (block * DRAW_BLOCK + _invert(token_cdf, targets))[:, 0]


DRAW_BLOCK = 256


def _invert(cdf: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[D, N] ascending cumulative masses, [D, 1] targets -> [D, 1] the first index whose
    mass passes its target: an entry with mass of its own. A target that rounding put
    at or past the last mass gets the last entry with mass."""
    picks = torch.searchsorted(cdf, targets, right=True)
    last = torch.searchsorted(cdf, cdf[:, -1:].contiguous(), right=False)
    return torch.minimum(picks, last)
