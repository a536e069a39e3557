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


def test_draft_length_maximises_expected_tokens_per_cost() -> None:
    from salience_server.engine.ngram import CPU_DRAFT_COST, DraftCost, best_draft_length

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
    assert best_draft_length(0.5, CPU_DRAFT_COST, 4) == 0  # drafts cost more than they give
    assert best_draft_length(0.9, CPU_DRAFT_COST, 4) == 4
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


def test_verification_cost_follows_how_the_device_multiplies_extra_rows() -> None:
    """Extra rows are dear on a CPU multiplying in float32 or emulated 16-bit
    arithmetic, nearly free on an accelerator or a CPU multiplying bfloat16 natively;
    ``--speculative-cost`` overrides both."""
    import torch

    from salience_server.config import EngineConfig
    from salience_server.engine import cpu_matmul
    from salience_server.engine.ngram import (
        ACCELERATOR_DRAFT_COST,
        CPU_DRAFT_COST,
        DraftCost,
        draft_proposer,
    )

    config = EngineConfig(speculative="ngram")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert draft_proposer(EngineConfig(), cpu, torch.float32) is None

    def cost(device: torch.device, dtype: torch.dtype, config: EngineConfig = config) -> object:
        proposer = draft_proposer(config, device, dtype)
        assert proposer is not None
        return proposer.cost

    assert cost(cpu, torch.float32) == CPU_DRAFT_COST
    native = cpu_matmul.prepacks_16_bit(cpu, torch.bfloat16)
    assert cost(cpu, torch.bfloat16) == (ACCELERATOR_DRAFT_COST if native else CPU_DRAFT_COST)
    assert cost(cuda, torch.bfloat16) == ACCELERATOR_DRAFT_COST
    assert cost(cuda, torch.float32) == ACCELERATOR_DRAFT_COST
    chosen = EngineConfig(speculative="ngram", speculative_cost=(0.2, 0.3))
    assert cost(cpu, torch.float32, chosen) == DraftCost(0.2, 0.3)
