"""What shapes a decode row's logits before the draw: penalties, bias and min_tokens.

All of them act on the logits before temperature and the filters (SPEC 2.1), as
transformers and vLLM do, and shape sampling only: the logprobs a stream reports stay
the raw distribution. In their order (vLLM's and transformers'):
- ``logit_bias``: added.
- ``repetition_penalty`` (transformers' and CTRL's): the (biased) logit of a token
  already in the session is divided by it when positive, multiplied when negative.
- ``frequency_penalty`` and ``presence_penalty`` (OpenAI's): subtracted, times each
  token's count among the tokens decoded in this call, and once for each such token.
- ``min_tokens``: the stop tokens cannot be drawn until that many tokens are decoded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from salience_server.engine import constraints
from salience_server.engine.request import GREEDY_BELOW, SamplingParams
from salience_server.engine.uploads import Upload, Uploads

PENALIZED_LIMIT = torch.finfo(torch.float32).max * GREEDY_BELOW / 4
"""The largest magnitude a repetition penalty gives a logit: divided by a temperature of
``GREEDY_BELOW`` (the smallest that samples), it stays finite, with room to spare."""


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

    def plan_sync(
        self, token_ids: list[int], num_prompt_tokens: int, uploads: Uploads
    ) -> tuple[Upload, Upload, int]:
        """The session tokens added since the last step (the decoded ones), as parts of
        the step's upload: (new tokens, new decoded tokens, the length they reach)."""
        decoded_from = max(self.num_synced, num_prompt_tokens)
        return (
            uploads.add(token_ids[self.num_synced :]),
            uploads.add(token_ids[decoded_from:]),
            len(token_ids),
        )

    def sync(
        self, new: Upload, decoded: Upload, length: int, vocab_size: int, device: torch.device
    ) -> None:
        """Counts what ``plan_sync`` planned (in the step, once its upload is sent)."""
        if self.seen is None or self.counts is None:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
        if length <= self.num_synced:
            return  # counted already (a retried step)
        if new.length:
            self.seen.index_fill_(0, new.tensor, True)
        if decoded.length:
            ones = torch.ones(decoded.length, dtype=torch.float32, device=device)
            self.counts.index_add_(0, decoded.tensor, ones)
        self.num_synced = length


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
    """[ceil(V / 32)] int32 words on the host: the tokens the constraint allows next
    (``constraints.Matcher.bitmask``)."""


@dataclass
class ShapingPlan:
    """The shaping of some of a step's rows, planned on the host before the forward
    pass: every id, count and value is a part of the step's upload."""

    shapings: list[Shaping]
    counted: list[int] = field(default_factory=list)
    """Indices into ``rows`` of the rows with penalties."""
    counted_rows: Upload | None = None
    syncs: list[tuple[Upload, Upload, int]] = field(default_factory=list)
    """Per counted row: its state's ``plan_sync``."""
    penalties: tuple[Upload, Upload, Upload] | None = None
    """Per counted row: repetition, frequency and presence penalties (floats)."""
    edits: list[tuple[int, Upload, Upload | None]] = field(default_factory=list)
    """(row, token ids, values added or None for -inf): logit bias and banned tokens."""
    masked: tuple[Upload, Upload] | None = None
    """The rows with a constraint bitmask, and their bitmasks' words."""


def plan(rows: list[int], shapings: list[Shaping], uploads: Uploads) -> ShapingPlan:
    """``shapings`` of the logits' rows ``rows``."""
    result = ShapingPlan(shapings)
    counted = [index for index, shaping in enumerate(shapings) if shaping.params.penalizes]
    if counted:
        result.counted = counted
        result.counted_rows = uploads.add([rows[index] for index in counted])
        counted_shapings = [shapings[index] for index in counted]
        result.syncs = [
            s.state.plan_sync(s.token_ids, s.num_prompt_tokens, uploads) for s in counted_shapings
        ]
        result.penalties = (
            uploads.add_floats([s.params.repetition_penalty or 1.0 for s in counted_shapings]),
            uploads.add_floats([s.params.frequency_penalty for s in counted_shapings]),
            uploads.add_floats([s.params.presence_penalty for s in counted_shapings]),
        )
    for row, shaping in zip(rows, shapings, strict=True):
        bias = shaping.params.logit_bias
        if bias:
            result.edits.append(
                (row, uploads.add(list(bias)), uploads.add_floats(list(bias.values())))
            )
        if shaping.banned_ids:
            result.edits.append((row, uploads.add(shaping.banned_ids), None))
    masked = [
        (row, s.bitmask) for row, s in zip(rows, shapings, strict=True) if s.bitmask is not None
    ]
    if masked:
        words = torch.cat([bitmask for _, bitmask in masked])  # on the host
        result.masked = (uploads.add([row for row, _ in masked]), uploads.add_tensor(words))
    return result


def apply(logits: torch.Tensor, plan: ShapingPlan) -> torch.Tensor:
    """[D, V] float32 raw logits -> the same with the planned rows shaped (a new tensor)."""
    logits = logits.clone()
    vocab_size, device = logits.shape[1], logits.device
    # The bias first, then the penalties (vLLM's and transformers' order): a repetition
    # penalty divides or multiplies the biased logit.
    for row, ids, values in plan.edits:
        if values is not None:
            logits[row].index_add_(0, ids.tensor, values.floats)
    if plan.counted_rows is not None and plan.penalties is not None:
        for index, sync in zip(plan.counted, plan.syncs, strict=True):
            plan.shapings[index].state.sync(*sync, vocab_size, device)
        counted = [plan.shapings[index] for index in plan.counted]
        _penalize(logits, counted, plan.counted_rows.tensor, *plan.penalties)
    for row, ids, values in plan.edits:
        if values is None:
            logits[row].index_fill_(0, ids.tensor, -torch.inf)
    if plan.masked is not None:
        rows, words = plan.masked
        constraints.apply_bitmasks(logits, rows.tensor, words.tensor.to(torch.int32))
    return logits


def _penalize(
    logits: torch.Tensor,
    rows: list[Shaping],
    index: torch.Tensor,
    repetition: Upload,
    frequency: Upload,
    presence: Upload,
) -> None:
    """Applies the three penalties to the rows ``index`` of ``logits``, in place."""
    part = logits[index]  # [C, V]
    seen = torch.stack([row.state.seen for row in rows if row.state.seen is not None])
    counts = torch.stack([row.state.counts for row in rows if row.state.counts is not None])
    factor = repetition.floats[:, None]
    # A penalty far from 1 (1e-40, 1e38: in range, as vLLM's) would take logits past
    # float32's range, then the softmax to NaN and the call to INTERNAL: they stop at
    # PENALIZED_LIMIT, which even the smallest sampled temperature keeps finite.
    penalized = torch.where(part > 0, part / factor, part * factor).clamp(
        -PENALIZED_LIMIT, PENALIZED_LIMIT
    )
    part = torch.where(seen, penalized, part)
    part = part - counts * frequency.floats[:, None] - (counts > 0) * presence.floats[:, None]
    logits[index] = part
