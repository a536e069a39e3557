"""Turns a step's logits rows into tokens: the given token of a scored row, a draw for
a decode row, the verified tokens of a speculating request's rows.

Sampling uses the shaped (``penalties``) and filtered (``filters``) distribution; the
logprobs a stream reports come from the raw one (``scoring``). Everything the device
needs is planned on the host before the step's forward pass (``plan_picks``) and sent
with its inputs, and nothing is read back here: the step reads its results once.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from salience_server.engine import filters, penalties
from salience_server.engine.errors import device_lost
from salience_server.engine.request import SamplingParams
from salience_server.engine.uploads import Upload, Uploads, planned


@dataclass
class Draw:
    """A row whose next token is drawn (a decode), rather than given (a scored row)."""

    params: SamplingParams
    generator: torch.Generator | None
    shaping: penalties.Shaping | None = None
    """Penalties, bias and banned tokens, when any apply to this row."""


@dataclass
class DrawPlan:
    """The draws of some rows, planned on the host: which rows shape their logits,
    which take the argmax, which are filtered and drawn, and with what."""

    draws: list[Draw]
    shaping: penalties.ShapingPlan | None
    greedy: Upload | None
    sampled: Upload | None
    filters: filters.FilterPlan | None


def plan_draws(draws: list[Draw], vocab_size: int, uploads: Uploads) -> DrawPlan:
    shaped = [index for index, d in enumerate(draws) if d.shaping is not None]
    shaping = None
    if shaped:
        shapings = [d.shaping for d in draws if d.shaping is not None]
        shaping = penalties.plan(shaped, shapings, uploads)
    greedy = [index for index, d in enumerate(draws) if d.params.is_greedy]
    sampled = [index for index, d in enumerate(draws) if not d.params.is_greedy]
    return DrawPlan(
        draws,
        shaping,
        uploads.add(greedy) if greedy else None,
        uploads.add(sampled) if sampled else None,
        filters.plan_filters([draws[i].params for i in sampled], vocab_size, uploads)
        if sampled
        else None,
    )


def draw_rows(logits: torch.Tensor, plan: DrawPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """[D, V] float32 raw logits -> ([D] drawn token ids, [D] bool: the row had a
    token to draw): shaped (penalties, bias, banned tokens), then greedy rows take
    their argmax and the others are tempered, filtered and drawn."""
    if plan.shaping is not None:
        logits = penalties.apply(logits, plan.shaping)
    token_ids = torch.empty(len(plan.draws), dtype=torch.long, device=logits.device)
    valid = torch.ones(len(plan.draws), dtype=torch.bool, device=logits.device)
    if plan.greedy is not None:
        greedy = plan.greedy.tensor
        rows = logits if plan.greedy.length == len(plan.draws) else logits[greedy]
        token_ids[greedy] = torch.argmax(rows, dim=-1)
    if plan.sampled is not None and plan.filters is not None:
        sampled = plan.sampled.tensor
        rows = logits if plan.sampled.length == len(plan.draws) else logits[sampled]
        generators = [d.generator for d in plan.draws if not d.params.is_greedy]
        token_ids[sampled], valid[sampled] = filters.draw(
            filters.filter_logits(rows, plan.filters), generators
        )
    return token_ids, valid


@dataclass
class Verification:
    """One speculating request's verification rows (speculative decoding): its
    drafts, checked against the tokens decoding without drafts takes at each row."""

    rows: list[int]
    """The step's rows: row i predicts the token after draft i (row 0: after the last
    committed token)."""
    row_ids: Upload
    drafts: list[int]
    draw: Draw
    filters: filters.FilterPlan | None
    """The draw's filters over the rows (a sampled request's)."""
    generator_state: torch.Tensor | None = None
    """The seeded generator as it was before the rows' draws (``emitted`` winds it
    back, then on by one uniform per emitted token)."""


def plan_verification(
    rows: list[int], drafts: list[int], draw: Draw, vocab_size: int, uploads: Uploads
) -> Verification:
    sampled = not draw.params.is_greedy
    return Verification(
        rows,
        uploads.add(rows),
        drafts,
        draw,
        filters.plan_filters([draw.params] * len(rows), vocab_size, uploads) if sampled else None,
    )


def verify(
    logits: torch.Tensor, logprobs: torch.Tensor, verification: Verification
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative decoding's verification of point-mass drafts (n-gram: the draft
    distribution q puts all its mass on the draft token), on the device: ``logits``
    and ``logprobs`` are the step's, of which the verification's rows ([D + 1, V]) are
    read. Returns each row's token ([D + 1]) and whether it had one to draw;
    ``emitted`` then reads them on the host.

    Each row's token is what decoding without drafts would draw there: the argmax of
    its logprobs (greedy), as a plain greedy row takes it (that of the logits differs
    where log_softmax rounds two logits a hair apart to one logprob: the plain row
    takes the first of the tied tokens, and a greedy call gave other tokens when the
    engine drafted), or the inverse of its filtered distribution's CDF at the next uniform of
    the request's generator. Drafts are accepted while they equal those tokens; the
    first that does not is replaced by its row's token. Draft i is then accepted with
    probability p_i(d_i), rejection sampling's min(1, p/q) with q = 1, and each emitted
    token is distributed as the model's; more, a seeded call emits the tokens it emits
    without drafts (rounding aside), however much the engine drafted."""
    if verification.filters is None:  # greedy: as a plain greedy row, always a token
        greedy = torch.argmax(logprobs[verification.row_ids.tensor], dim=-1)
        return greedy, torch.ones_like(greedy, dtype=torch.bool)
    rows = logits[verification.row_ids.tensor].float()  # [D + 1, V]
    generator = verification.draw.generator
    if generator is not None:
        verification.generator_state = generator.get_state()
    filtered = filters.filter_logits(rows, verification.filters)
    return filters.draw(filtered, [generator] * len(verification.rows))


def emitted(verification: Verification, tokens: list[int], valid: list[bool]) -> list[int]:
    """The tokens a verification emits (the drafts accepted, then one more), from its
    rows' tokens read on the host. A seeded generator drew a uniform for every row;
    it is wound back to spend one per emitted token, as decoding without drafts does.
    Raises InvalidDistribution when an emitted row had no token to draw."""
    result: list[int] = []
    for row, (token, ok) in enumerate(zip(tokens, valid, strict=True)):
        if not ok:
            raise filters.InvalidDistribution(NOTHING_TO_DRAW)
        result.append(token)
        if row == len(verification.drafts) or token != verification.drafts[row]:
            break
    generator, state = verification.draw.generator, verification.generator_state
    if generator is not None and state is not None:
        generator.set_state(state)
        spend_uniforms(generator, len(result))
    return result


def spend_uniforms(generator: torch.Generator, count: int) -> None:
    """Moves a seeded generator on by the uniforms ``count`` decoded tokens draw, as
    ``filters.draw`` spends them: one per row."""
    if count <= 0:
        return
    spent = torch.empty(count, 1, dtype=torch.float64, device=generator.device)
    for row in range(count):
        spent[row].uniform_(generator=generator)


@dataclass
class PickPlan:
    """A step's picks, planned on the host before its forward pass, so that every row
    index and parameter the sampler needs is a part of the step's one upload."""

    num_rows: int
    given: Upload
    """[K] each scored row's given token id (0 for the others)."""
    plain_greedy: list[int]
    plain_greedy_rows: Upload | None
    drawn: list[int]
    drawn_rows: Upload | None
    draws: DrawPlan | None
    verifications: list[Verification]


def plan_picks(
    picks: list[int | Draw],
    verifications: list[tuple[list[int], list[int], Draw]],
    vocab_size: int,
    uploads: Uploads,
) -> PickPlan:
    """``picks``: each row's given id (a scored row) or draw (a decode row; a row in a
    verification is given 0, its verification picks it). ``verifications``: (rows,
    drafts, draw) of each speculating request."""
    plain_greedy = [
        row
        for row, pick in enumerate(picks)
        if isinstance(pick, Draw) and pick.params.is_greedy and pick.shaping is None
    ]
    chosen = set(plain_greedy)
    drawn = [row for row, pick in enumerate(picks) if isinstance(pick, Draw) and row not in chosen]
    draws = [pick for pick in (picks[row] for row in drawn) if isinstance(pick, Draw)]
    # All rows plain greedy (a greedy decode step): no index to send.
    partly_greedy = plain_greedy and len(plain_greedy) < len(picks)
    return PickPlan(
        len(picks),
        uploads.add([pick if isinstance(pick, int) else 0 for pick in picks]),
        plain_greedy,
        uploads.add(plain_greedy) if partly_greedy else None,
        drawn,
        uploads.add(drawn) if drawn and len(drawn) < len(picks) else None,
        plan_draws(draws, vocab_size, uploads) if draws else None,
        [plan_verification(*one, vocab_size, uploads) for one in verifications],
    )


NOTHING_TO_DRAW = "no token left to draw (NaN logits, or every token filtered out)"


@dataclass
class Picks:
    """The tokens of a step's rows, and the rows whose draw failed."""

    token_ids: torch.Tensor
    """[K] long, on the logits' device: the given id of a scored row, the drawn one of
    a decode row (0 where the draw failed)."""
    valid: torch.Tensor
    """[K] bool, on the device: False where a row had no token to draw (NaN logits, or
    every token filtered out); read on the host with the tokens (``failed_rows``)."""
    argmax_rows: list[int]
    """Rows whose token is their raw argmax (rank 1 without comparing)."""
    errors: dict[int, Exception] = field(default_factory=dict)
    """Rows whose draw raised: only their requests fail."""
    verified_rows: set[int] = field(default_factory=set)
    """Verification rows: whether they fail depends on what they emit (``emitted``)."""

    def failed_rows(self, valid: list[bool]) -> dict[int, Exception]:
        """The rows that failed, given ``valid`` read on the host."""
        failed = dict(self.errors)
        for row, ok in enumerate(valid):
            if not ok and row not in failed and row not in self.verified_rows:
                failed[row] = filters.InvalidDistribution(NOTHING_TO_DRAW)
        return failed


def pick_tokens(logits: torch.Tensor, logprobs: torch.Tensor, plan: PickPlan) -> Picks:
    """[K, V] raw logits and logprobs -> each row's token: the given id for a scored
    row, a draw for a decode row, the verified token for a verification row. Plain
    greedy rows share one argmax; the other draws are shaped, filtered and drawn
    together. A failure there is retried row by row, so that it fails the rows that
    caused it and no other. Nothing is copied to or from the host."""
    device = logprobs.device
    token_ids = plan.given.tensor.clone()
    valid = torch.ones(plan.num_rows, dtype=torch.bool, device=device)
    result = Picks(token_ids, valid, list(plan.plain_greedy))
    if plan.plain_greedy_rows is None and plan.plain_greedy:  # every row: no index
        result.token_ids = token_ids = torch.argmax(logprobs, dim=-1)
    elif plan.plain_greedy_rows is not None:
        rows = plan.plain_greedy_rows.tensor
        if 2 * len(plan.plain_greedy) >= plan.num_rows:  # mostly decodes: scan all
            token_ids[rows] = torch.argmax(logprobs, dim=-1)[rows]
        else:  # mostly scored rows: the few greedy ones
            token_ids[rows] = torch.argmax(logprobs[rows], dim=-1)
    if plan.draws is not None:
        drawn = plan.drawn_rows.tensor if plan.drawn_rows is not None else None
        # Every row drawn (a decode step): the logits as they are, not a copy of them.
        rows = logits.float() if drawn is None else logits[drawn].float()
        try:
            tokens, ok = draw_rows(rows, plan.draws)
            if drawn is None:
                token_ids.copy_(tokens)
                valid.copy_(ok)
            else:
                token_ids[drawn], valid[drawn] = tokens, ok
        except Exception as error:
            if device_lost(error):  # the device's context is gone: no row can go on
                raise
            for row, one in zip(plan.drawn, plan.draws.draws, strict=True):
                try:  # a row alone: its own small upload (a failure's path)
                    alone = planned(functools.partial(plan_draws, [one], logits.shape[1]), device)
                    tokens, ok = draw_rows(logits[row : row + 1].float(), alone)
                    token_ids[row], valid[row] = tokens[0], ok[0]
                except Exception as row_error:
                    if device_lost(row_error):
                        raise
                    result.errors[row] = row_error
    for verification in plan.verifications:
        result.verified_rows.update(verification.rows)
        try:
            tokens, ok = verify(logits, logprobs, verification)
        except Exception as error:  # its request fails, not the step
            if device_lost(error):
                raise
            result.errors.update((row, error) for row in verification.rows)
            continue
        rows = verification.row_ids.tensor
        token_ids[rows], valid[rows] = tokens, ok
        if verification.filters is None:
            result.argmax_rows.extend(verification.rows)
    return result


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.seed is None or params.is_greedy:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed if device.type != "cpu" else cpu_seed(params.seed))
    return generator


def cpu_seed(seed: int) -> int:
    """A 64-bit seed as torch's CPU generator takes it: that generator keeps the low 32
    bits only (seeds 0, 2**32 and 2**63 drew alike), so a seed of 2**32 or more is
    mixed first (splitmix64's finaliser), and its 32 bits depend on all 64; seeds below
    2**32 are unchanged."""
    if seed < 1 << 32:
        return seed
    mask = (1 << 64) - 1
    seed = ((seed ^ (seed >> 30)) * 0xBF58476D1CE4E5B9) & mask
    seed = ((seed ^ (seed >> 27)) * 0x94D049BB133111EB) & mask
    return (seed ^ (seed >> 31)) & 0xFFFFFFFF
