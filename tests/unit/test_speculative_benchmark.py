"""The speculative benchmark's ceiling: what an oracle choosing each step's draft
length would reach on a reply."""

from __future__ import annotations

from benchmarks.speculative import ceiling, copied_fraction, first_difference
from salience_server.engine.ngram import DraftCost

FREE_ROWS = DraftCost(switch=0.0, row=0.0)


def test_a_reply_that_repeats_nothing_has_no_speed_up() -> None:
    prompt = list(range(100, 140))
    reply = list(range(200, 230))
    assert ceiling(prompt, reply, 4, FREE_ROWS) == 1.0
    assert copied_fraction(prompt, reply) == 0.0


def test_a_reply_copying_the_prompt_is_bound_by_the_draft_cap_and_cost() -> None:
    prompt = list(range(100, 200))
    reply = list(range(120, 169))  # 49 tokens: the first from the prefill, then 48
    # The first decoded token goes alone (the prefill's token after the prompt's end is
    # no recurring 2-gram); the other 47 in 9 steps of 4 drafts + 1 and a last step of
    # 1 draft + 1.
    assert ceiling(prompt, reply, 4, FREE_ROWS) == 48 / 11
    # Verification costing 1 + 0.6 + 0.1 per draft: 2 steps for 4 drafts, 1.7 for one.
    assert abs(ceiling(prompt, reply, 4, DraftCost(0.6, 0.1)) - 48 / (1 + 9 * 2 + 1.7)) < 1e-12
    assert copied_fraction(prompt, reply) > 0.85


def test_first_difference_is_where_two_outputs_part() -> None:
    assert first_difference([1, 2, 3], [1, 2, 4]) == 2
    assert first_difference([1, 2, 3], [1, 2]) == 2
    assert first_difference([5], [6, 7]) == 0
