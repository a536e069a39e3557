"""The step's sampling of all rows together, against one-row definitions: each filter
and penalty on the full distribution, and the draws' frequencies (speculative
verification: ``test_verification``; scoring: ``test_scoring``)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor, SequenceBiasLogitsProcessor

from salience_server.engine import filters, penalties, sampler, scoring
from salience_server.engine.request import SamplingParams
from salience_server.engine.uploads import planned
from tests.sampling_support import (
    CHI2_999,
    CPU,
    VOCAB,
    draw_of,
    draw_rows,
    kept_by_definition,
    random_logits,
    row_errors,
)


def _shaping(params: SamplingParams, token_ids: list[int], num_prompt: int = 0, banned=()):
    return penalties.Shaping(params, token_ids, num_prompt, list(banned), penalties.PenaltyState())


# The step's functions take plans made before the forward pass; these plan and send at once.
def _pick(logits: torch.Tensor, logprobs: torch.Tensor, picks: list) -> sampler.Picks:
    vocab = logits.shape[1]
    plan = planned(lambda u: sampler.plan_picks(picks, [], vocab, u), CPU)
    return sampler.pick_tokens(logits, logprobs, plan)


def _filter(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    vocab = logits.shape[1]
    return filters.filter_logits(
        logits, planned(lambda u: filters.plan_filters(params, vocab, u), CPU)
    )


def _draw_tokens(logits: torch.Tensor, generators: list) -> torch.Tensor:
    token_ids, valid = filters.draw(logits, generators)
    assert bool(valid.all())
    return token_ids


def _shape(logits: torch.Tensor, shapings: list[penalties.Shaping]) -> torch.Tensor:
    rows = list(range(len(shapings)))
    return penalties.apply(logits, planned(lambda u: penalties.plan(rows, shapings, u), CPU))


def test_picks_mix_given_greedy_penalized_and_seeded_rows() -> None:
    logits = random_logits(6, seed=2)
    logprobs = scoring.log_softmax(logits)
    greedy = draw_of(SamplingParams())
    seen = logits[2].topk(3).indices.tolist()  # the penalty must move the argmax off these
    penalized_params = SamplingParams(repetition_penalty=50.0)
    penalized = draw_of(penalized_params, _shaping(penalized_params, seen))
    seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=7)
    picks: list[int | sampler.Draw] = [17, greedy, penalized, draw_of(seeded), 250, greedy]
    picked = _pick(logits, logprobs, picks)
    ids = picked.token_ids.tolist()
    assert ids[0] == 17 and ids[4] == 250 and row_errors(picked) == {}
    assert ids[1] == int(logprobs[1].argmax()) and ids[5] == int(logprobs[5].argmax())
    assert picked.argmax_rows == [1, 5]
    assert ids[2] not in seen
    again = _pick(logits[3:4], logprobs[3:4], [draw_of(seeded)])
    assert ids[3] == int(again.token_ids[0])  # seeded draws repeat
    scores = scoring.score(logprobs, picked.token_ids, [0] * 6, picked.argmax_rows)
    assert [s.rank for s in scores] == [
        int((logprobs[row] > logprobs[row, ids[row]]).sum()) + 1 for row in range(6)
    ]
    assert scores[1].rank == scores[5].rank == 1


def test_shaped_greedy_and_sampled_rows_draw_together_as_each_alone() -> None:
    """The draws that are not plain greedy (penalized greedy rows, sampled rows) are
    drawn together, each as it would be alone (seeded rows: the same tokens)."""
    logits = random_logits(4, seed=5)
    penalized_params = SamplingParams(repetition_penalty=50.0)
    seen = logits[0].topk(3).indices.tolist()

    def draws() -> list[sampler.Draw]:  # fresh generators each time
        return [
            draw_of(penalized_params, _shaping(penalized_params, seen)),
            draw_of(SamplingParams(temperature=2.0, seed=11)),
            draw_of(penalized_params, _shaping(penalized_params, seen)),
            draw_of(SamplingParams(temperature=2.0, top_k=50, seed=12)),
        ]

    together = draw_rows(logits, draws()).tolist()
    alone = [int(draw_rows(logits[r : r + 1], [draws()[r]])[0]) for r in range(4)]
    assert together == alone and together[0] not in seen


def test_a_step_of_only_greedy_decodes_and_an_empty_step() -> None:
    logits = random_logits(20, seed=3)
    logprobs = scoring.log_softmax(logits)
    picked = _pick(logits, logprobs, [draw_of(SamplingParams())] * 20)
    assert picked.token_ids.tolist() == logprobs.argmax(dim=1).tolist()
    scores = scoring.score(logprobs, picked.token_ids, [2] * 20, picked.argmax_rows)
    assert all(
        s.rank == 1 and s.top_logprobs[0][0] == t
        for s, t in zip(scores, picked.token_ids.tolist(), strict=True)
    )
    empty = _pick(logits[:0], logprobs[:0], [])
    assert empty.token_ids.shape == (0,) and empty.argmax_rows == []
    assert scoring.score(logprobs[:0], empty.token_ids, []) == []


def test_a_failing_row_fails_alone() -> None:
    logits = random_logits(4, seed=4)
    logits[2] = math.nan  # a broken row: no distribution to draw from
    logprobs = scoring.log_softmax(logits)
    sampled = SamplingParams(temperature=1.0, seed=3)
    broken_bias = SamplingParams(logit_bias={VOCAB + 5: 1.0})  # an id past the vocabulary
    picks: list[int | sampler.Draw] = [
        draw_of(sampled),
        draw_of(broken_bias, _shaping(broken_bias, [])),
        draw_of(sampled),
        draw_of(sampled),
    ]
    picked = _pick(logits, logprobs, picks)
    assert set(row_errors(picked)) == {1, 2}
    assert isinstance(row_errors(picked)[2], filters.InvalidDistribution)
    alone = [_pick(logits[r : r + 1], logprobs[r : r + 1], [draw_of(sampled)]) for r in (0, 3)]
    assert picked.token_ids[0] == alone[0].token_ids[0]
    assert picked.token_ids[3] == alone[1].token_ids[0]


def test_a_temperature_below_1e_5_is_greedy() -> None:
    logits = random_logits(3, seed=5)
    logprobs = scoring.log_softmax(logits)
    picks = [draw_of(SamplingParams(temperature=t)) for t in (1e-42, 9e-6, 0.0)]
    picked = _pick(logits, logprobs, picks)
    assert picked.token_ids.tolist() == logits.argmax(dim=1).tolist() and not row_errors(picked)


# ----- filters against their definitions on the full distribution ----------------------


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.3, top_k=5),
        SamplingParams(temperature=1.0, top_p=0.8),
        SamplingParams(temperature=0.9, min_p=0.05),
        SamplingParams(temperature=1.2, top_k=40, top_p=0.9, min_p=0.01),
        SamplingParams(temperature=1.0, top_k=1),
    ],
    ids=["temperature", "top-k", "top-p", "min-p", "all", "top-1"],
)
def test_filters_equal_their_definitions(params: SamplingParams) -> None:
    logits = random_logits(3, seed=6)
    filtered = _filter(logits, [params] * 3)
    for row in range(3):
        got = torch.softmax(filtered[row], dim=-1)
        want = kept_by_definition(logits[row], params)
        assert torch.equal(got > 0, want > 0), "a different set of tokens survived"
        assert (got - want).abs().max() < 1e-5


def test_rows_with_different_filters_are_filtered_together() -> None:
    logits = random_logits(4, seed=7)
    params = [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.5, top_k=3),
        SamplingParams(temperature=1.0, top_p=0.5),
        SamplingParams(temperature=2.0, min_p=0.2),
    ]
    together = _filter(logits, params)
    for row, one in enumerate(params):
        alone = _filter(logits[row : row + 1], [one])[0]
        assert torch.equal(together[row], alone)


# ----- penalties and bias against their definitions -----------------------------------


def test_repetition_penalty_equals_transformers_processor() -> None:
    logits = random_logits(1, seed=8)
    session = [3, 17, 17, 42, 299, 5]
    params = SamplingParams(repetition_penalty=1.7)
    got = _shape(logits, [_shaping(params, session)])
    processor = RepetitionPenaltyLogitsProcessor(penalty=1.7)
    want = processor(torch.tensor([session]), logits.clone())
    assert torch.allclose(got, want, atol=1e-6)


def test_logit_bias_comes_before_the_repetition_penalty() -> None:
    """vLLM and transformers add the bias, then penalise: the penalty divides (or
    multiplies) the biased logit of a token already in the session."""
    logits = random_logits(1, seed=12)
    session = [3, 17, 42]
    bias = {3: 4.0, 17: -4.0, 42: 1.5, 99: 2.0}
    params = SamplingParams(repetition_penalty=2.0, logit_bias=bias)
    got = _shape(logits, [_shaping(params, session)])
    sequence_bias = SequenceBiasLogitsProcessor({(token,): value for token, value in bias.items()})
    repetition = RepetitionPenaltyLogitsProcessor(penalty=2.0)
    input_ids = torch.tensor([session])
    want = repetition(input_ids, sequence_bias(input_ids, logits.clone()))
    assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("penalty", [1e-40, 3e38], ids=["tiny", "huge"])
def test_an_extreme_repetition_penalty_still_draws_a_token(penalty: float) -> None:
    """A penalty in range but far from 1 took the penalised logits past float32's range
    (inf / inf in the softmax: NaN), and the call failed INTERNAL. Nearly greedy, a tiny
    one picks a session's token of positive logit; a huge one, another token."""
    logits = random_logits(1, seed=13)
    logprobs = scoring.log_softmax(logits)
    session = list(range(0, VOCAB, 2))  # the even tokens
    for temperature in (1e-5, 1.0):
        params = SamplingParams(temperature=temperature, repetition_penalty=penalty, seed=1)
        picked = _pick(logits, logprobs, [draw_of(params, _shaping(params, session))])
        assert not row_errors(picked)
        token = int(picked.token_ids[0])
        if temperature < 1 and penalty < 1:
            assert token % 2 == 0 and logits[0, token] > 0
        elif temperature < 1:
            assert token % 2 == 1


def test_frequency_presence_and_bias_follow_openai() -> None:
    logits = random_logits(1, seed=9)
    prompt, decoded = [1, 2, 3, 9], [9, 9, 4, 9, 7]  # 9 thrice in the output, 1..3 only before
    params = SamplingParams(
        frequency_penalty=0.5, presence_penalty=1.25, logit_bias={4: 3.0, 8: -100.0}
    )
    got = _shape(logits, [_shaping(params, prompt + decoded, num_prompt=len(prompt))])[0]
    want = logits[0].clone()
    for token in set(decoded):
        want[token] -= decoded.count(token) * 0.5 + 1.25
    want[4] += 3.0
    want[8] -= 100.0
    assert torch.allclose(got, want, atol=1e-6)


def test_penalty_counts_grow_with_the_session() -> None:
    """The state is kept across steps and counts only what was added since."""
    logits = random_logits(1, seed=10)
    params = SamplingParams(frequency_penalty=1.0)
    state = penalties.PenaltyState()
    tokens = [5, 6]
    for step_token in [7, 7, 8]:
        tokens.append(step_token)
        shaping = penalties.Shaping(params, tokens, 2, [], state)
        got = _shape(logits, [shaping])[0]
    want = logits[0].clone()
    want[7] -= 2.0
    want[8] -= 1.0
    assert torch.allclose(got, want, atol=1e-6)


def test_a_retried_step_counts_its_tokens_once() -> None:
    """A failed forward pass is retried one request at a time, applying the same plan
    again: the tokens it added were counted the first time."""
    logits = random_logits(1, seed=11)
    params = SamplingParams(frequency_penalty=1.0, presence_penalty=0.5)
    shaping = penalties.Shaping(params, [5, 7, 7], 1, [], penalties.PenaltyState())
    plan = planned(lambda u: penalties.plan([0], [shaping], u), CPU)
    first = penalties.apply(logits, plan)[0]
    again = penalties.apply(logits, plan)[0]
    want = logits[0].clone()
    want[7] -= 2.0 + 0.5
    assert torch.allclose(first, want, atol=1e-6) and torch.equal(again, first)


def test_banned_tokens_are_never_drawn() -> None:
    logits = random_logits(1, seed=11, vocab=5)
    top = int(logits[0].argmax())
    params = SamplingParams()
    picked = _pick(
        logits, scoring.log_softmax(logits), [draw_of(params, _shaping(params, [], banned=[top]))]
    )
    assert picked.token_ids.tolist() == [int(logits[0].topk(2).indices[1])]


# ----- the draws follow the filtered distribution --------------------------------------


# The 0.999 quantile of the chi-square distribution by degrees of freedom.
@pytest.mark.parametrize("seeded", [True, False], ids=["seeded", "unseeded"])
def test_draws_follow_the_filtered_distribution(seeded: bool) -> None:
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -4.0]])
    params = SamplingParams(temperature=0.9, top_k=6, top_p=0.95, seed=0 if seeded else None)
    want = kept_by_definition(logits[0], params)
    num_draws = 6000
    rows = logits.expand(num_draws, -1)
    if seeded:  # each row its own generator, as seeded requests have
        generators = [torch.Generator().manual_seed(seed) for seed in range(num_draws)]
    else:
        generators = [None] * num_draws
    token_ids = _draw_tokens(_filter(rows, [params] * num_draws), generators)
    counts = torch.bincount(token_ids, minlength=logits.shape[1]).double()
    kept = want > 0
    assert counts[~kept].sum() == 0, "a filtered-out token was drawn"
    expected = want[kept].double() * num_draws
    chi2 = float(((counts[kept] - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_999[int(kept.sum()) - 1]


def test_a_target_at_the_total_mass_inverts_to_the_last_entry_with_mass() -> None:
    """Rounding may put a row's target at its total mass (a uniform a hair below 1):
    it picks the last entry that has mass, never a zero-mass entry after it (padding,
    or a token filtered out)."""
    cdf = torch.tensor([[0.25, 0.5, 1.0, 1.0, 1.0], [0.5, 0.5, 0.75, 0.75, 0.75]])
    targets = torch.tensor([[1.0], [0.75]])
    assert filters._invert(cdf, targets).tolist() == [[2], [2]]
    inside = torch.tensor([[0.0], [0.5], [0.6]])  # the first entry whose mass passes it
    assert filters._invert(cdf[:1].repeat(3, 1), inside).tolist() == [[0], [2], [2]]


@pytest.mark.parametrize("seeded", [True, False], ids=["seeded", "unseeded"])
def test_draws_over_a_vocabulary_of_whole_blocks_follow_the_distribution(seeded: bool) -> None:
    """A vocabulary that is a multiple of the draw's block (no padding): tokens at both
    ends of both blocks are drawn as often as their probability says."""
    torch.manual_seed(1)
    vocab = 2 * filters.DRAW_BLOCK
    positions = [0, 1, filters.DRAW_BLOCK - 1, filters.DRAW_BLOCK, vocab - 1]
    logits = torch.full((1, vocab), -torch.inf)
    logits[0, positions] = torch.tensor([1.0, 0.5, 2.0, 0.0, 1.5])
    want = torch.softmax(logits[0, positions], dim=-1).double()
    num_draws = 6000
    generators = (
        [torch.Generator().manual_seed(seed) for seed in range(num_draws)]
        if seeded
        else [None] * num_draws
    )
    token_ids = _draw_tokens(logits.expand(num_draws, -1), generators)
    counts = torch.bincount(token_ids, minlength=vocab).double()
    assert counts.sum() == counts[positions].sum(), "a token without mass was drawn"
    expected = want * num_draws
    chi2 = float(((counts[positions] - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_999[len(positions) - 1]


def test_seeds_differing_above_32_bits_draw_differently_on_a_cpu() -> None:
    """torch's CPU generator keeps a seed's low 32 bits: 0, 2**32 and 2**63 drew alike.
    Seeds below 2**32 draw as they always did."""

    def draws(seed: int) -> list[float]:
        params = SamplingParams(temperature=1.0, seed=seed)
        generator = sampler.make_generator(params, torch.device("cpu"))
        assert generator is not None
        return torch.rand(4, generator=generator).tolist()

    seeds = [0, 1, 2**32, 2**32 + 1, 2**63, 2**63 + 1, 2**64 - 1]
    assert len({tuple(draws(seed)) for seed in seeds}) == len(seeds)
    plain = torch.Generator().manual_seed(123456789)
    assert draws(123456789) == torch.rand(4, generator=plain).tolist()


def test_seeds_of_64_bits_are_mixed_by_splitmix64() -> None:
    """A seed of 2**32 or more is splitmix64's finaliser of it, cut to 32 bits: the
    published outputs of splitmix64 seeded with 0 (its state advanced by the golden
    gamma) are 0xe220a8397b1dcdaf, 0x6e789e6aa1b965f4, 0x06c45d188009454f."""
    gamma = 0x9E3779B97F4A7C15
    states = [(gamma * i) % 2**64 for i in (1, 2, 3)]
    assert [sampler.cpu_seed(s) for s in states] == [0x7B1DCDAF, 0xA1B965F4, 0x8009454F]
    assert sampler.cpu_seed(2**32 - 1) == 2**32 - 1
