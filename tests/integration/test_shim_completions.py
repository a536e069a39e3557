"""Legacy Completions through the shim: what evaluation harnesses call for log-likelihoods.

Oracle: the gRPC scoring path (a session's prompt logprobs over the same token ids).
"""

from __future__ import annotations

from typing import Any

import pytest

from salience_client import END, SalienceClient
from tests.shim_support import RunningShim

TEXT = "The quick brown fox"


def _scored(target: str, token_ids: list[int], top_k: int) -> list[Any]:
    """Every position of ``token_ids`` scored by the server (position 0 has no logprob)."""
    with SalienceClient(target) as client, client.open_session() as session:
        *tokens, _ = session.generate(
            token_ids, max_tokens=0, logprobs_ranges=[(0, END)], logprob_top_k=top_k
        )
    return tokens


def test_echo_logprobs_equal_the_grpc_scoring_path(
    shim: RunningShim, llama_server: Any, model: str
) -> None:
    with SalienceClient(llama_server.target) as client:
        token_ids = client.tokenize(TEXT, add_special_tokens=True)
        texts = [client.detokenize([i]) for i in token_ids]
        with client.open_session() as session:
            total = session.score(token_ids, [(1, len(token_ids))])[0]
        scored = _scored(llama_server.target, token_ids, 2)
        tops = []
        for token in scored[1:]:
            top: dict[str, float] = {}
            for token_id, logprob in token.top_logprobs:
                (raw,) = client.token_bytes([token_id])
                top.setdefault(raw.decode("utf-8", errors="backslashreplace"), logprob)
            tops.append(top)
    reply = shim.client().completions.create(
        model=model, prompt=TEXT, max_tokens=0, echo=True, logprobs=2, temperature=0
    )
    choice = reply.choices[0]
    assert choice.text == TEXT and choice.finish_reason == "length"
    logprobs = choice.logprobs
    assert logprobs.tokens == texts
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert logprobs.token_logprobs[1:] == pytest.approx([t.logprob for t in scored[1:]], abs=1e-5)
    assert sum(logprobs.token_logprobs[1:]) == pytest.approx(total, abs=1e-4)
    assert logprobs.top_logprobs[1:] == [pytest.approx(top, abs=1e-5) for top in tops]
    assert logprobs.text_offset == [sum(len(t) for t in texts[:i]) for i in range(len(texts))]
    assert reply.usage.prompt_tokens == len(token_ids) and reply.usage.completion_tokens == 0


def test_token_id_prompts_batches_and_decoding(
    shim: RunningShim, llama_server: Any, model: str
) -> None:
    with SalienceClient(llama_server.target) as client:
        prompts = [client.tokenize("Once upon"), client.tokenize("a time")]
        wants = []
        for token_ids in prompts:
            with client.open_session() as session:
                *tokens, _ = session.generate(token_ids, max_tokens=6)
            wants.append(("".join(t.text for t in tokens), tokens))
    reply = shim.client().completions.create(
        model=model, prompt=prompts, max_tokens=6, temperature=0, logprobs=0
    )
    assert [c.index for c in reply.choices] == [0, 1]
    assert [c.text for c in reply.choices] == [text for text, _ in wants]
    for choice, (_, tokens) in zip(reply.choices, wants, strict=True):
        assert choice.logprobs.token_logprobs == pytest.approx(
            [t.logprob for t in tokens], abs=1e-5
        )
    assert reply.usage.prompt_tokens == sum(len(p) for p in prompts)
    assert reply.usage.completion_tokens == 12

    echoed = shim.client().completions.create(
        model=model, prompt=prompts[0], max_tokens=6, temperature=0, echo=True
    )
    assert echoed.choices[0].text == "Once upon" + wants[0][0]


def test_streaming_with_echo_and_usage(shim: RunningShim, llama_server: Any, model: str) -> None:
    full = shim.client().completions.create(
        model=model, prompt=TEXT, max_tokens=5, temperature=0, echo=True, logprobs=1
    )
    chunks = list(
        shim.client().completions.create(
            model=model,
            prompt=TEXT,
            max_tokens=5,
            temperature=0,
            echo=True,
            logprobs=1,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].text.startswith(TEXT)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    streamed = [lp for c in chunks if c.choices for lp in c.choices[0].logprobs.token_logprobs]
    whole = full.choices[0].logprobs.token_logprobs
    assert streamed[0] is None and whole[0] is None
    assert streamed[1:] == pytest.approx(whole[1:], abs=1e-5)
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 5
