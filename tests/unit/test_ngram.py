"""The session's n-gram index against a brute-force search of the same history."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from salience_server.engine.ngram import CANDIDATES_CHECKED, CONTEXT_CHECKED, NgramIndex


def brute_force(token_ids: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    """The tokens after an earlier occurrence of the longest recurring suffix: among its
    latest CANDIDATES_CHECKED occurrences, the one whose preceding tokens agree with the
    sequence's for longest (counted up to CONTEXT_CHECKED), the earliest among equals."""
    length = len(token_ids)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = token_ids[length - n :]
        ends = [end for end in range(n, length) if token_ids[end - n : end] == suffix]
        best = None
        for end in ends[-CANDIDATES_CHECKED:]:
            agree = 0
            while (
                agree < min(CONTEXT_CHECKED, end - n)
                and token_ids[end - n - 1 - agree] == token_ids[length - n - 1 - agree]
            ):
                agree += 1
            if best is None or agree > best[0]:
                best = (agree, end)
        if best is not None:
            return token_ids[best[1] : best[1] + k]
    return []


def test_proposals_equal_a_brute_force_search_as_the_history_grows_and_rewinds() -> None:
    rng = random.Random(3)
    index = NgramIndex(min_n=2, max_n=4)
    tokens: list[int] = []
    for step in range(600):
        if step % 50 == 49:  # a rewind, as a truncating call makes
            cut = rng.randrange(len(tokens) + 1)
            del tokens[cut:]
            index.rewind(cut)
        tokens.extend(rng.choice([1, 2, 3, 4, 5]) for _ in range(rng.randrange(1, 4)))
        assert index.propose(tokens, 4) == brute_force(tokens, 2, 4, 4)
        assert index.num_indexed == len(tokens)  # indexed once: the next call adds to it


def test_the_occurrence_with_the_longest_agreeing_context_wins_then_the_earliest() -> None:
    def propose(tokens: list[int], k: int) -> list[int]:
        return NgramIndex(min_n=2, max_n=2).propose(tokens, k)

    # [5, 6] occurs three times before the end: after 1, after 9 and after 9 again.
    assert propose([1, 5, 6, 10, 8, 9, 5, 6, 20, 9, 5, 6, 30, 0, 9, 5, 6], 1) == [20]
    # None agrees before [5, 6]: the earliest (the latest before this rule).
    assert propose([1, 5, 6, 10, 3, 5, 6, 20, 4, 5, 6, 30, 0, 7, 5, 6], 1) == [10]
    # [8, 9] before [5, 6] agrees for longer than [9] alone, though it is earlier.
    assert propose([8, 9, 5, 6, 10, 1, 9, 5, 6, 20, 8, 9, 5, 6], 2) == [10, 1]


def test_a_fork_keeps_its_own_index() -> None:
    parent = NgramIndex(2, 3)
    shared = [7, 8, 9, 1, 2, 7, 8]
    assert parent.propose(shared, 3) == [9, 1, 2]
    child = parent.copy()
    child_tokens = [*shared, 5, 6, 7, 8]  # the child goes its own way
    parent_tokens = [*shared, 9, 1, 2, 7, 8]
    assert child.propose(child_tokens, 2) == brute_force(child_tokens, 2, 3, 2)
    assert parent.propose(parent_tokens, 2) == brute_force(parent_tokens, 2, 3, 2)


def test_no_proposal_without_a_recurring_suffix_or_room() -> None:
    index = NgramIndex(2, 4)
    assert index.propose([1, 2, 3, 4, 5], 4) == []
    assert index.propose([1, 2, 1, 2], 0) == []
    assert NgramIndex(2, 4).propose([1, 2, 3, 1], 4) == []  # a recurring 1-gram: too short


def test_a_history_shorter_than_the_longest_n_gram() -> None:
    """The longest suffix tried is the whole history but its first token."""
    for tokens in ([5, 5, 5], [5, 5, 5, 5], [1, 2, 1, 2, 1]):
        assert NgramIndex(2, 4).propose(tokens, 3) == brute_force(tokens, 2, 4, 3)
    assert NgramIndex(2, 4).propose([5, 5, 5], 3) == [5]


def test_draft_length_maximises_expected_tokens_per_cost() -> None:
    from salience_server.engine.ngram import DraftCost, best_draft_length

    avx2_float32 = DraftCost(0.6, 0.1)  # as measured on an AVX2 CPU in float32

    def tokens_per_cost(rate: float, cost: DraftCost, length: int) -> float:
        steps = 1 + (cost.switch + cost.row * length if length else 0)
        return sum(rate**i for i in range(length + 1)) / steps

    for rate in (0.05, 0.3, 0.5, 0.8, 0.95):
        for cost in (DraftCost(0, 0.05), DraftCost(0.6, 0.1), DraftCost(0, 1.0)):
            best = best_draft_length(rate, cost, 6)
            assert all(
                tokens_per_cost(rate, cost, best) >= tokens_per_cost(rate, cost, d)
                for d in range(7)
            )
    assert best_draft_length(0.5, avx2_float32, 4) == 0  # drafts cost more than they give
    assert best_draft_length(0.9, avx2_float32, 4) == 4
    assert best_draft_length(0.9, DraftCost(0, 0.05), 4) == 4


def test_acceptance_follows_recent_verifications() -> None:
    from salience_server.engine.ngram import Acceptance

    acceptance = Acceptance()
    assert acceptance.rate == 0.5
    for _ in range(10):
        acceptance.record(4, 4)
    assert acceptance.rate > 0.9
    for _ in range(10):
        acceptance.record(4, 0)
    assert acceptance.rate < 0.4  # one miss a verification against up to four hits


def test_acceptance_rate_is_the_decayed_counts_with_a_uniform_prior() -> None:
    from salience_server.engine.ngram import ACCEPTANCE_DECAY, Acceptance

    acceptance, hits, misses = Acceptance(), 0.0, 0.0
    for drafted, accepted in [(4, 4), (3, 1), (2, 0), (4, 4), (1, 1), (4, 2)]:
        acceptance.record(drafted, accepted)
        hits = ACCEPTANCE_DECAY * hits + accepted
        misses = ACCEPTANCE_DECAY * misses + (1 if accepted < drafted else 0)
        assert acceptance.rate == pytest.approx((hits + 1) / (hits + misses + 2), abs=1e-12)
    fresh = Acceptance()
    fresh.record(4, 0)
    assert fresh.rate == pytest.approx(1 / 3, abs=1e-12)  # no hit, one miss


def test_the_verification_cost_is_measured_unless_given(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without ``--speculative-cost`` the proposer takes the cost fitted to whole forward
    passes of 1, 2 and 1 + K rows, logits at every row, after cached tokens; with it,
    that one, and nothing runs."""
    from types import SimpleNamespace

    from salience_server.config import EngineConfig, ModelConfig
    from salience_server.engine import draft_cost
    from salience_server.engine.batch import ForwardBatch
    from salience_server.engine.draft_cost import DraftCost
    from salience_server.engine.loader import load_model
    from salience_server.engine.model_runner import ModelRunner
    from salience_server.engine.ngram import draft_proposer

    loaded = load_model(ModelConfig(model=str(tiny_llama_dir)))
    runner = ModelRunner(loaded.model, num_blocks=8, block_size=16)  # 128 tokens
    config = EngineConfig(speculative="ngram", num_speculative_tokens=3)
    assert draft_proposer(EngineConfig(), runner, False) is None
    passes: list[ForwardBatch] = []
    execute = runner.execute

    def recording(batch: ForwardBatch) -> object:
        passes.append(batch)
        return execute(batch)

    monkeypatch.setattr(runner, "execute", recording)
    proposer = draft_proposer(config, runner, False)
    assert proposer is not None and proposer.cost.switch >= 0 and proposer.cost.row >= 0
    assert [batch.num_tokens for batch in passes] == [1, 2, 4] * (draft_cost.PASSES + 1)
    for batch in passes:  # after 124 cached tokens: the pool holds 128, the widest pass 4
        (sequence,) = batch.sequences
        assert batch.positions == list(range(124, 124 + batch.num_tokens))
        assert sequence.context_len == 124 + batch.num_tokens and sequence.block_table == list(
            range(-(-sequence.context_len // 16))
        )
        assert batch.logits_rows == list(range(batch.num_tokens))
        assert not batch.rope_positions

    # The fit takes the median time of each width: 10, 12 and 15, whatever the outliers.
    clock = [0.0]
    timed_passes = draft_cost.PASSES + 1
    durations = {
        1: [10.0] * (timed_passes - 1) + [30.0],
        2: [12.0] * timed_passes,
        4: [5.0] + [15.0] * (timed_passes - 1),
    }

    def timed(batch: ForwardBatch) -> SimpleNamespace:
        passes.append(batch)
        clock[0] += durations[batch.num_tokens].pop()
        return SimpleNamespace(logits=torch.zeros(batch.num_tokens, 8))

    monkeypatch.setattr(draft_cost, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(runner, "execute", timed)
    passes.clear()
    cost = draft_cost.measure(runner, 3, uses_mrope=True)
    assert abs(cost.steps(1) - 1.2) < 1e-12 and abs(cost.steps(3) - 1.5) < 1e-12
    assert passes[0].rope_positions == [(124, 124, 124)]  # t, h and w: one position
    passes.clear()
    given = draft_proposer(
        EngineConfig(speculative="ngram", speculative_cost=(0.2, 0.3)), runner, False
    )
    assert given is not None and given.cost == DraftCost(0.2, 0.3) and not passes


def test_the_cost_fit_passes_through_the_measured_points() -> None:
    from salience_server.engine.draft_cost import DraftCost, fit

    # An AVX2 CPU in float32: one draft 1.7 steps, four 2.0.
    cost = fit({1: 10.0, 2: 17.0, 5: 20.0}, 4)
    assert abs(cost.steps(1) - 1.7) < 1e-12 and abs(cost.steps(4) - 2.0) < 1e-12
    # Rows that cost nothing, and a pass that timed faster at more rows (noise).
    assert fit({1: 10.0, 2: 10.0, 5: 10.0}, 4) == DraftCost(0.0, 0.0)
    noisy = fit({1: 10.0, 2: 9.5, 5: 14.0}, 4)  # one draft 0.95 steps: no switch
    assert noisy.switch == 0.0 and abs(noisy.row - 0.15) < 1e-12
    single = fit({1: 10.0, 2: 12.0}, 1)  # at most one draft: the switch says it all
    assert abs(single.switch - 0.2) < 1e-12 and single.row == 0.0


def test_a_session_whose_drafts_do_not_pay_probes_every_probe_every_steps() -> None:
    """Drafting nothing while drafts cost more than they give, a session still tries
    full-length drafts after ``PROBE_EVERY`` draftless decode steps, then waits again."""
    from salience_server.engine.ngram import PROBE_EVERY, DraftCost, NgramProposer
    from salience_server.engine.session import Session

    proposer = NgramProposer(4, 2, 4, DraftCost(10.0, 10.0))
    session = Session("s", max_context=128, token_ids=[1, 2, 3] * 4 + [1])
    got = [proposer.propose(session, 4) for _ in range(2 * PROBE_EVERY + 2)]
    probe = [[]] * PROBE_EVERY + [[2, 3, 1]]
    assert got == probe + probe
    assert proposer.propose(session, 2) == [] and session.acceptance.steps_since_drafts == 1
