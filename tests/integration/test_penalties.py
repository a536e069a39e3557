"""Penalties, bias and min_tokens through a real server (SPEC 2.1), against transformers
``generate`` and the raw distribution of one forward pass: they shape sampling only."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import generate, open_session, random_tokens, reference_logprobs
from tests.tiny_models import reference_model

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def oracle(tiny_llama_dir):
    return reference_model(tiny_llama_dir)


def _decode(stub, prompt: list[int], **options) -> list:
    tokens, _ = generate(stub, open_session(stub), append_tokens=prompt, **options)
    return tokens


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_greedy_with_repetition_penalty_equals_transformers(llama_server, oracle, penalty) -> None:
    prompt = random_tokens(12, seed=21)
    got = _decode(llama_server.stub, prompt, max_tokens=24, repetition_penalty=penalty)
    with torch.no_grad():
        want = oracle.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=24,
            do_sample=False,
            repetition_penalty=penalty,
        )[0, len(prompt) :].tolist()
    assert [t.id for t in got] == want
    plain = _decode(llama_server.stub, prompt, max_tokens=24)
    assert [t.id for t in plain] != want  # the penalty changed the output
    # The reported logprobs stay the raw distribution of the tokens decoded.
    reference = reference_logprobs(oracle, prompt + want)
    for event in got:
        assert (
            abs(event.sampled_logprob - reference[event.position - 1, event.id].item()) < TOLERANCE
        )


def test_frequency_and_presence_penalties_follow_their_definition(llama_server, oracle) -> None:
    """Greedy decoding with OpenAI's penalties picks, at every step, the argmax of the
    raw logits minus the penalties counted over the tokens decoded so far in the call."""
    prompt = random_tokens(10, seed=22)
    got = [
        t.id
        for t in _decode(
            llama_server.stub,
            prompt,
            max_tokens=20,
            ignore_eos=True,
            frequency_penalty=1.5,
            presence_penalty=0.5,
        )
    ]
    decoded: list[int] = []
    for _ in range(20):
        with torch.no_grad():
            logits = oracle(torch.tensor([prompt + decoded])).logits[0, -1].float()
        for token in set(decoded):
            logits[token] -= 1.5 * decoded.count(token) + 0.5
        decoded.append(int(logits.argmax()))
    assert got == decoded


def test_logit_bias_shapes_sampling_not_the_reported_logprobs(llama_server, oracle) -> None:
    prompt = random_tokens(8, seed=23)
    got = _decode(llama_server.stub, prompt, max_tokens=5, ignore_eos=True, logit_bias={65: 100.0})
    assert [t.id for t in got] == [65] * 5
    reference = reference_logprobs(oracle, prompt + [65] * 5)
    for event in got:
        assert abs(event.sampled_logprob - reference[event.position - 1, 65].item()) < TOLERANCE
    banned = _decode(
        llama_server.stub, prompt, max_tokens=5, logit_bias={t: -100.0 for t in range(128)}
    )
    assert all(t.id >= 128 for t in banned)


def test_min_tokens_holds_back_stop_tokens(llama_server) -> None:
    prompt = random_tokens(8, seed=24)
    free = [t.id for t in _decode(llama_server.stub, prompt, max_tokens=6)]
    stop = free[0]  # the first decoded token becomes a stop token
    stopped = _decode(llama_server.stub, prompt, max_tokens=6, stop_token_ids=[stop])
    assert [t.id for t in stopped] == [stop]
    held = _decode(llama_server.stub, prompt, max_tokens=6, stop_token_ids=[stop], min_tokens=4)
    ids = [t.id for t in held]
    assert len(ids) >= 4 and stop not in ids[:4]
