"""The step's sampling and scoring of all rows together against the one-row definitions."""

from __future__ import annotations

import torch

from salience_server.engine import sampler
from salience_server.engine.request import SamplingParams

VOCAB = 300


def _rows(count: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return sampler.log_softmax(torch.randn(count, VOCAB, generator=generator) * 3)


def test_scores_equal_each_rows_rank_and_top_k() -> None:
    logprobs = _rows(40)  # more rows than one ranking chunk
    token_ids = torch.randint(VOCAB, (40,), generator=torch.Generator().manual_seed(1))
    top_ks = [row % 4 for row in range(40)]
    scores = sampler.score(logprobs, token_ids, top_ks)
    for row, scored in enumerate(scores):
        chosen = logprobs[row, token_ids[row]]
        assert scored.logprob == chosen.item()
        assert scored.rank == int((logprobs[row] > chosen).sum()) + 1
        values, indices = torch.topk(logprobs[row], top_ks[row])
        assert scored.top_logprobs == list(zip(indices.tolist(), values.tolist(), strict=True))


def test_picks_mix_given_greedy_penalized_and_seeded_rows() -> None:
    logprobs = _rows(6, seed=2)
    greedy = sampler.Draw(SamplingParams(), None, [])
    seen = logprobs[2].topk(3).indices.tolist()  # the penalty must move the argmax off these
    penalized = sampler.Draw(SamplingParams(repetition_penalty=50.0), None, seen)
    seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=7)
    draw = sampler.Draw(seeded, sampler.make_generator(seeded, torch.device("cpu")), [])
    picks: list[int | sampler.Draw] = [17, greedy, penalized, draw, 250, greedy]
    token_ids, argmax_rows = sampler.pick_tokens(logprobs, picks)
    ids = token_ids.tolist()
    assert ids[0] == 17 and ids[4] == 250
    assert ids[1] == int(logprobs[1].argmax()) and ids[5] == int(logprobs[5].argmax())
    assert argmax_rows == [1, 5]
    assert ids[2] not in seen
    again = sampler.Draw(seeded, sampler.make_generator(seeded, torch.device("cpu")), [])
    assert ids[3] == int(sampler.pick_tokens(logprobs[3:4], [again])[0][0])
    scores = sampler.score(logprobs, token_ids, [0] * 6, argmax_rows)
    assert [s.rank for s in scores] == [
        int((logprobs[row] > logprobs[row, ids[row]]).sum()) + 1 for row in range(6)
    ]
    assert scores[1].rank == scores[5].rank == 1


def test_a_step_of_only_greedy_decodes_and_an_empty_step() -> None:
    logprobs = _rows(20, seed=3)
    greedy = sampler.Draw(SamplingParams(), None, [])
    token_ids, argmax_rows = sampler.pick_tokens(logprobs, [greedy] * 20)
    assert token_ids.tolist() == logprobs.argmax(dim=1).tolist()
    scores = sampler.score(logprobs, token_ids, [2] * 20, argmax_rows)
    assert all(
        s.rank == 1 and s.top_logprobs[0][0] == t
        for s, t in zip(scores, token_ids.tolist(), strict=True)
    )
    empty, rows = sampler.pick_tokens(logprobs[:0], [])
    assert empty.shape == (0,) and rows == [] and sampler.score(logprobs[:0], empty, []) == []
