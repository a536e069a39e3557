"""What shapes a decode row's logits before the draw: penalties, bias and min_tokens.

All of them act on the raw logits (SPEC 2.1), as transformers and vLLM do, and shape
sampling only: the logprobs a stream reports stay the raw distribution.
- ``repetition_penalty`` (transformers' and CTRL's): the logit of a token already in
  the session is divided by it when positive, multiplied when negative.
- ``frequency_penalty`` and ``presence_penalty`` (OpenAI's): subtracted, times each
  token's count among the tokens decoded in this call, and once for each such token.
- ``logit_bias``: added.
- ``min_tokens``: the stop tokens cannot be drawn until that many tokens are decoded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from salience_server.engine.request import SamplingParams


class PenaltyState:
    """One request's token counts on the device, grown with the session instead of
    rebuilt every step: which tokens the session holds, and how often each was decoded
    in this call."""

    def __init__(self) -> None:
        self.seen: torch.Tensor | None = None
        """[V] bool: the token is in the session."""
        self.counts: torch.Tensor | None = None
        """[V] float32: how often the token was decoded in this call."""
        self.num_synced = 0
        """Session tokens already counted."""

    def sync(
        self, token_ids: list[int], num_prompt_tokens: int, vocab_size: int, device: torch.device
    ) -> None:
        """Counts the session tokens added since the last call (the decoded ones)."""
        if self.seen is None or self.counts is None:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
        new_ids = token_ids[self.num_synced :]
        if new_ids:
            self.seen[torch.tensor(new_ids, device=device)] = True
        decoded = token_ids[max(self.num_synced, num_prompt_tokens) :]
        if decoded:
            index = torch.tensor(decoded, device=device)
            self.counts.index_add_(0, index, torch.ones(len(decoded), device=device))
        self.num_synced = len(token_ids)


@dataclass
class Shaping:
    """What one decode row needs to shape its logits."""

    params: SamplingParams
    token_ids: list[int]
    """The session's tokens (the repetition penalty looks at all of them)."""
    num_prompt_tokens: int
    """Tokens before this call's decoded ones (frequency and presence count after)."""
    banned_ids: list[int]
    """Tokens that cannot be drawn yet (stop tokens before min_tokens)."""
    state: PenaltyState
    bitmask: torch.Tensor | None = None
    """[ceil(V / 32)] int32 tokens the constraint allows next (constraints.Matcher)."""


def apply(logits: torch.Tensor, rows: list[Shaping]) -> torch.Tensor:
    """[D, V] float32 raw logits -> the shaped logits (a new tensor)."""
    logits = logits.clone()
    vocab_size, device = logits.shape[1], logits.device
    counted = [
        index
        for index, row in enumerate(rows)
        if row.params.repetition_penalty not in (0.0, 1.0)
        or row.params.frequency_penalty
        or row.params.presence_penalty
    ]
    if counted:
        for index in counted:
            row = rows[index]
            row.state.sync(row.token_ids, row.num_prompt_tokens, vocab_size, device)
        _penalize(logits, [rows[i] for i in counted], counted)
    for index, row in enumerate(rows):
        if row.params.logit_bias:
            ids = torch.tensor(list(row.params.logit_bias), device=device)
            values = torch.tensor(list(row.params.logit_bias.values()), device=device)
            logits[index, ids] += values
        if row.banned_ids:
            logits[index, torch.tensor(row.banned_ids, device=device)] = -torch.inf
    return logits


def _penalize(logits: torch.Tensor, rows: list[Shaping], indices: list[int]) -> None:
    """Applies the three penalties to the rows ``indices`` of ``logits``, in place."""
    device = logits.device
    index = torch.tensor(indices, device=device)
    part = logits[index]  # [C, V]
    seen = torch.stack([row.state.seen for row in rows if row.state.seen is not None])
    counts = torch.stack([row.state.counts for row in rows if row.state.counts is not None])
    repetition = torch.tensor(
        [row.params.repetition_penalty or 1.0 for row in rows], device=device
    )[:, None]
    penalized = torch.where(part > 0, part / repetition, part * repetition)
    part = torch.where(seen, penalized, part)
    frequency = torch.tensor([row.params.frequency_penalty for row in rows], device=device)
    presence = torch.tensor([row.params.presence_penalty for row in rows], device=device)
    part = part - counts * frequency[:, None] - (counts > 0) * presence[:, None]
    logits[index] = part
