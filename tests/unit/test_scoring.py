"""A step's scoring of all rows together (logprob, rank and top logprobs of each row,
ties in token order), against one-row definitions, and its one read to the host."""

from __future__ import annotations

import pytest
import torch

from salience_server.engine import scoring
from tests.sampling_support import VOCAB, random_logits


def test_scores_equal_each_rows_rank_and_top_k() -> None:
    logprobs = scoring.log_softmax(random_logits(40))  # more rows than one ranking chunk
    token_ids = torch.randint(VOCAB, (40,), generator=torch.Generator().manual_seed(1))
    top_ks = [row % 4 for row in range(40)]
    scores = scoring.score(logprobs, token_ids, top_ks)
    for row, scored in enumerate(scores):
        chosen = logprobs[row, token_ids[row]]
        assert scored.logprob == chosen.item()
        assert scored.rank == int((logprobs[row] > chosen).sum()) + 1
        values, indices = torch.topk(logprobs[row], top_ks[row])
        assert scored.top_logprobs == list(zip(indices.tolist(), values.tolist(), strict=True))


def test_tied_top_logprobs_come_in_token_order_so_the_greedy_token_leads() -> None:
    """bf16 logits come in steps, so ties are common: greedy takes the tie's first token
    (argmax), and the top list puts that token first (topk ordered ties at will)."""
    logprobs = torch.full((2, 49152), -20.0)
    logprobs[0, [3, 24576, 49151]] = -0.5
    logprobs[1, [7, 9]] = torch.tensor([-1.0, -0.25])
    greedy = torch.argmax(logprobs, dim=1)
    scores = scoring.score(logprobs, greedy, [3, 2])
    assert scores[0].top_logprobs == [(3, -0.5), (24576, -0.5), (49151, -0.5)]
    assert scores[0].top_logprobs[0][0] == greedy[0].item() and scores[0].rank == 1
    assert scores[1].top_logprobs == [(9, -0.25), (7, -1.0)]


def test_a_tie_across_the_top_k_cut_keeps_its_lowest_ids() -> None:
    """topk chose which tied tokens made the list: a token of rank <= k could be left
    out while a tied one with a higher id was in. The list is the first k by value,
    then id."""
    logprobs = torch.full((3, 49152), -30.0)
    logprobs[0, :8] = torch.tensor([0.0, -1, -1, -1, -2, -1, 0, -3])
    logprobs[1, [5, 40000, 20000, 3, 49000]] = -2.0  # five tied, three kept
    logprobs[2, 11] = -1.0  # then the rest, all tied: the lowest id
    chosen = torch.tensor([3, 49000, 11])
    scores = scoring.score(logprobs, chosen, [5, 3, 2])
    assert [i for i, _ in scores[0].top_logprobs] == [0, 6, 1, 2, 3]
    assert [i for i, _ in scores[1].top_logprobs] == [3, 5, 20000]
    assert scores[1].rank == 1  # tied with all: in the list or not, rank 1
    assert [i for i, _ in scores[2].top_logprobs] == [11, 0]


@pytest.mark.parametrize("reads_host_freely", [True, False], ids=["cpu's way", "device's way"])
def test_top_logprobs_are_the_first_k_by_value_then_id(monkeypatch, reads_host_freely) -> None:
    """Both ways to the top k (the CPU's reads the rows where a tie crosses the cut; a
    device's keys value and id into one topk) against a stable sort, over tie-heavy
    rows (values in quarter steps, as bf16 gives) and rows of one value."""
    monkeypatch.setattr(scoring, "_reads_host_freely", lambda device: reads_host_freely)
    steps = torch.randint(0, 12, (40, 1000), generator=torch.Generator().manual_seed(21))
    logprobs = scoring.log_softmax(steps.float() / 4)
    logprobs[3] = -7.0
    logprobs[4, :3] = torch.tensor([-0.0, 0.0, -0.0])  # equal, whatever their sign bit
    for k in (1, 3, 20, 999):
        values, indices = scoring._top_k_lowest_ids_first(logprobs, k)
        want_values, want_indices = torch.sort(logprobs, dim=1, descending=True, stable=True)
        assert torch.equal(indices.sort(dim=1).values, want_indices[:, :k].sort(dim=1).values)
        assert torch.equal(values.sort(dim=1).values, want_values[:, :k].sort(dim=1).values)
        assert torch.equal(logprobs.gather(1, indices), values)
        token_ids = want_indices[:, 0]
        scores = scoring.score(logprobs, token_ids, [k] * 40)
        assert all(
            [i for i, _ in s.top_logprobs] == want_indices[row, :k].tolist()
            for row, s in enumerate(scores)
        )


def test_one_host_copy_reads_the_same_values() -> None:
    """The packed path (one device-to-host copy on CUDA) equals reading each tensor."""
    logits = random_logits(5, seed=13)
    logprobs = scoring.log_softmax(logits)
    token_ids = torch.tensor([3, 7, 250, 0, 299])
    tensors = list(scoring.score_on_device(logprobs, token_ids, [0, 2, 5, 1, 3])) + [token_ids]
    assert scoring.to_host(tensors, one_copy=True) == scoring.to_host(tensors, one_copy=False)
