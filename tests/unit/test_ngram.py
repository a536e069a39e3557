"""The session's n-gram index against a brute-force search of the same history."""

from __future__ import annotations

import random

from salience_server.engine.ngram import NgramIndex


def brute_force(token_ids: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    """The tokens after the latest earlier occurrence of the longest recurring suffix."""
    length = len(token_ids)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = token_ids[length - n :]
        for end in range(length - 1, n - 1, -1):  # latest first; end < length
            if token_ids[end - n : end] == suffix:
                return token_ids[end : end + k]
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
