"""Speculative verification in the step's sampler, against plain draws: greedy drafts
kept while they are the argmax, seeded ones while they are what plain draws would give
(the generator spending one uniform per emitted token), failures confined to their
rows, and rejection sampling keeping the model's distribution (chi-square)."""

from __future__ import annotations

import pytest
import torch

from salience_server.engine import sampler, scoring
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


def verified(logits: torch.Tensor, drafts: list[int], draw: sampler.Draw) -> list[int]:
    """One request's verification alone, as a step makes it: on the device, then read."""
    rows, vocab = list(range(len(drafts) + 1)), logits.shape[1]
    verification = planned(lambda u: sampler.plan_verification(rows, drafts, draw, vocab, u), CPU)
    tokens, valid = sampler.verify(logits, scoring.log_softmax(logits), verification)
    return sampler.emitted(verification, tokens.tolist(), valid.tolist())


def test_greedy_verification_accepts_drafts_while_they_are_the_argmax() -> None:
    logits = random_logits(4, seed=12)
    argmax = logits.argmax(dim=1).tolist()
    draw = draw_of(SamplingParams())
    assert verified(logits, argmax[:3], draw) == argmax  # all accepted, one more
    wrong = (argmax[1] + 1) % VOCAB
    assert verified(logits, [argmax[0], wrong, 5], draw) == argmax[:2]


def test_greedy_verification_takes_the_token_a_plain_greedy_row_takes() -> None:
    """Two logits a hair apart that log_softmax rounds to one logprob: a plain greedy
    row takes the first of the tied tokens (the argmax of the logprobs), and so must
    the verification, which took the argmax of the logits (the later token): a greedy
    call's tokens changed where the engine drafted."""
    logits = torch.zeros(3, VOCAB)
    logits[:, 5], logits[:, 7] = 1e-3, 1e-3 + 1e-7
    assert logits[0, 7] > logits[0, 5]
    logprobs = scoring.log_softmax(logits)
    assert logprobs[0, 7] == logprobs[0, 5]
    draw = draw_of(SamplingParams())
    plan = planned(lambda u: sampler.plan_picks([draw], [], VOCAB, u), CPU)
    plain = sampler.pick_tokens(logits[:1], logprobs[:1], plan).token_ids.tolist()
    assert plain == [5]
    assert verified(logits, [5, 5], draw) == [5, 5, 5]
    assert verified(logits, [7, 5], draw) == [5]


def test_a_greedy_verifications_rows_are_argmax_rows_a_sampled_ones_are_not() -> None:
    """The step tells scoring which rows hold their raw argmax (rank 1 without
    comparing): a greedy verification's rows, not a sampled one's."""
    logits = random_logits(6, seed=15)
    logprobs = scoring.log_softmax(logits)
    greedy = draw_of(SamplingParams())
    sampled = draw_of(SamplingParams(temperature=1.0, seed=4))
    verifications = [([1, 2], [3], greedy), ([3, 4, 5], [1, 2], sampled)]
    picks: list[int | sampler.Draw] = [9, 0, 0, 0, 0, 0]
    plan = planned(lambda u: sampler.plan_picks(picks, verifications, VOCAB, u), CPU)
    picked = sampler.pick_tokens(logits, logprobs, plan)
    assert picked.argmax_rows == [1, 2] and picked.verified_rows == {1, 2, 3, 4, 5}
    assert picked.token_ids.tolist()[:3] == [9, *logprobs[1:3].argmax(dim=1).tolist()]


def test_a_seeded_verification_emits_what_plain_draws_would() -> None:
    """Row by row, the tokens a seeded request draws without drafts: a draft is kept
    when it is that token, and the generator spends one uniform per emitted token (a
    seeded call gave other tokens when the engine drafted)."""
    logits = random_logits(5, seed=13)
    params = SamplingParams(temperature=1.0, top_p=0.9)
    for seed in range(50):
        plain = sampler.Draw(params, torch.Generator().manual_seed(seed))
        want = [int(draw_rows(logits[row : row + 1], [plain])[0]) for row in range(5)]
        for num_right in range(4):
            drafts = want[:num_right] + [(want[num_right] + 1) % VOCAB] * (4 - num_right)
            draw = sampler.Draw(params, torch.Generator().manual_seed(seed))
            emitted = verified(logits, drafts, draw)
            assert emitted == want[: num_right + 1]
            # The generator goes on as it would have after as many plain draws.
            rest = draw_rows(logits[num_right + 1 :], [draw] * (4 - num_right))
            assert rest.tolist() == want[num_right + 1 :]
        all_right = sampler.Draw(params, torch.Generator().manual_seed(seed))
        assert verified(logits, want[:4], all_right) == want


def test_a_failing_verification_fails_its_rows_alone(monkeypatch) -> None:
    """Two seeded requests verify drafts in one step; one's verification fails: its
    rows carry the error, and the other's tokens are what it verifies alone (its
    generator untouched by the failure)."""
    logits = random_logits(6, seed=14)
    params = SamplingParams(temperature=1.0, top_p=0.9)

    def step(fail: bool) -> tuple[list[int], dict[int, Exception]]:
        good = sampler.Draw(params, torch.Generator().manual_seed(1))
        bad = sampler.Draw(params, torch.Generator().manual_seed(2))
        verifications = [([0, 1, 2], [5, 6], good), ([3, 4, 5], [7, 8], bad)]
        plan = planned(lambda u: sampler.plan_picks([0] * 6, verifications, VOCAB, u), CPU)
        real = sampler.verify

        def verify(logits, logprobs, verification):
            if fail and verification.draw is bad:
                raise RuntimeError("this verification broke")
            return real(logits, logprobs, verification)

        monkeypatch.setattr(sampler, "verify", verify)
        picked = sampler.pick_tokens(logits, scoring.log_softmax(logits), plan)
        tokens = picked.token_ids.tolist()[:3]
        emitted = sampler.emitted(plan.verifications[0], tokens, picked.valid.tolist()[:3])
        return emitted + good.generator.get_state()[:8].tolist(), row_errors(picked)

    clean, no_errors = step(fail=False)
    failed, errors = step(fail=True)
    assert no_errors == {} and failed == clean
    assert sorted(errors) == [3, 4, 5]
    assert all("this verification broke" in str(e) for e in errors.values())


@pytest.mark.parametrize("draft_mass", ["likely", "unlikely"])
def test_rejection_sampling_keeps_the_models_distribution(draft_mass: str) -> None:
    """Whatever the draft, the first emitted token is distributed as the filtered
    model distribution (chi-square over 2,000 seeded verifications)."""
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5]] * 2)
    params = SamplingParams(temperature=1.0, top_k=5)
    want = kept_by_definition(logits[0], params)
    draft = 0 if draft_mass == "likely" else 4
    counts = torch.zeros(6, dtype=torch.float64)
    for seed in range(2000):
        draw = sampler.Draw(params, torch.Generator().manual_seed(seed))
        counts[verified(logits, [draft], draw)[0]] += 1
    kept = want > 0
    assert counts[~kept].sum() == 0
    expected = want[kept].double() * 2000
    chi2 = float(((counts[kept] - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_999[int(kept.sum()) - 1]
