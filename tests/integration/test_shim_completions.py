"""Legacy Completions through the shim: what evaluation harnesses call for log-likelihoods.

Oracle: the gRPC scoring path (a session's prompt logprobs over the same token ids).
"""

from __future__ import annotations

import re
import time
from typing import Any

import httpx
import pytest
import torch
from transformers import AutoTokenizer

from salience_client import END, SalienceClient
from tests.shim_support import RunningShim, start_shim
from tests.tiny_models import reference_model

TEXT = "The quick brown fox"


def _scored(target: str, token_ids: list[int], top_k: int) -> list[Any]:
    """Every position of ``token_ids`` scored by the server (position 0 has no logprob)."""
    with SalienceClient(target) as client, client.open_session() as session:
        *tokens, _ = session.generate(
            token_ids, max_tokens=0, logprobs_ranges=[(0, END)], logprob_top_k=top_k
        )
    return tokens


def _top_dicts(client: SalienceClient, scored: list[Any]) -> list[dict[str, float]]:
    """OpenAI's ``top_logprobs`` of scored positions 1 on: the alternatives, then the
    chosen token, by their printed bytes."""
    tops = []
    for token in scored[1:]:
        top: dict[str, float] = {}
        for token_id, logprob in token.top_logprobs:
            (raw,) = client.token_bytes([token_id])
            top.setdefault(raw.decode("utf-8", errors="backslashreplace"), logprob)
        (raw,) = client.token_bytes([token.token_id])  # the chosen one, as OpenAI's
        top.setdefault(raw.decode("utf-8", errors="backslashreplace"), token.logprob)
        tops.append(top)
    return tops


def test_echo_logprobs_equal_the_grpc_scoring_path(
    shim: RunningShim, llama_server: Any, model: str
) -> None:
    with SalienceClient(llama_server.target) as client:
        token_ids = client.tokenize(TEXT, add_special_tokens=True)
        texts = [client.detokenize([i]) for i in token_ids]
        with client.open_session() as session:
            total = session.score(token_ids, [(1, len(token_ids))])[0]
        scored = _scored(llama_server.target, token_ids, 2)
        tops = _top_dicts(client, scored)
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


def test_echo_scoring_of_a_shared_context_scores_only_what_is_new(
    shim: RunningShim, llama_server: Any, model: str
) -> None:
    """Multiple-choice scoring sends one context with each continuation. The server keeps
    no distributions, so each echo request recomputed its whole prompt; the scores of a
    pooled session's positions are now kept, and a prompt sharing them is scored from
    where they end. Each answer still equals scoring the whole prompt at once; one that
    asks for more alternatives than the last scoring kept is scored whole again."""
    context = list(range(40, 90))
    continuations = [[7, 8, 9], [11, 12], [13, 14, 15, 16], [17]]
    top_ks = [2, 1, 1, 2]  # after the first: fewer alternatives, as many, more
    replies = []
    for continuation, top_k in zip(continuations, top_ks, strict=True):
        replies.append(
            shim.client().completions.create(
                model=model, prompt=context + continuation, max_tokens=0, echo=True, logprobs=top_k
            )
        )
    cached = [reply.usage.prompt_tokens_details.cached_tokens for reply in replies]
    assert cached[0] == 0 and cached[3] == 0
    assert cached[1] >= len(context) - 1 and cached[2] >= len(context) - 1
    with SalienceClient(llama_server.target) as client:
        for continuation, top_k, reply in zip(continuations, top_ks, replies, strict=True):
            prompt = context + continuation
            scored = _scored(llama_server.target, prompt, top_k)
            logprobs = reply.choices[0].logprobs
            assert len(logprobs.token_logprobs) == len(prompt)
            assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
            want = [t.logprob for t in scored[1:]]
            assert logprobs.token_logprobs[1:] == pytest.approx(want, abs=1e-5)
            tops = _top_dicts(client, scored)
            assert logprobs.top_logprobs[1:] == [pytest.approx(top, abs=1e-5) for top in tops]
        # Tokens a scoring call decoded are kept scored too: a prompt that goes on
        # through them is scored from their end.
        prompt = context + continuations[0]
        decoding = shim.client().completions.create(
            model=model, prompt=prompt, max_tokens=3, echo=True, logprobs=1, temperature=0
        )
        with client.open_session() as session:  # greedy: the tokens the shim decoded
            *tokens, _ = session.generate(prompt, max_tokens=3)
        assert decoding.choices[0].text.endswith("".join(t.text for t in tokens))
        longer = prompt + [t.token_id for t in tokens]
        reply = shim.client().completions.create(
            model=model, prompt=longer, max_tokens=0, echo=True, logprobs=1
        )
        assert reply.usage.prompt_tokens_details.cached_tokens >= len(longer) - 1
        scored = _scored(llama_server.target, longer, 1)
        want = [t.logprob for t in scored[1:]]
        assert reply.choices[0].logprobs.token_logprobs[1:] == pytest.approx(want, abs=1e-5)


def test_a_batch_of_continuations_of_one_context_prefills_it_once(
    shim: RunningShim, llama_server: Any, model: str
) -> None:
    """lm-eval with a batch size sends a context's continuations in one request: they
    ran side by side, each scoring the whole context. The first now runs alone, and the
    rest are scored past the context's kept scores, side by side."""
    context = list(range(100, 170))  # past the pool's 64 shared tokens
    prompts = [context + [i, i + 1] for i in (3, 5, 7)] + [list(range(200, 240))]
    body = {"model": model, "prompt": prompts, "max_tokens": 0, "echo": True, "logprobs": 1}
    reply = httpx.post(f"{shim.base_url}/completions", json=body).json()
    assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] >= 2 * (len(context) - 1)
    for prompt, choice in zip(prompts, reply["choices"], strict=True):
        want = [t.logprob for t in _scored(llama_server.target, prompt, 1)[1:]]
        assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx(want, abs=1e-5)


def test_a_failed_prompt_of_a_batch_stops_the_others(
    long_context_llama_dir: Any, server_factory: Any
) -> None:
    """The 400 for a bad prompt came back at once while the batch's other prompts ran on
    to their ends, for no one (a minute here). It names the prompt that failed."""
    server = server_factory(long_context_llama_dir, block_size=4, kv_cache_bytes=64 << 20)
    running = start_shim(server.target)
    try:
        body = {
            "model": running.client().models.list().data[0].id,
            "prompt": [[5, 6, 7], [5, 10**6]],  # the second holds no token of the vocabulary
            "max_tokens": 60000,
            "ignore_eos": True,
        }
        response = httpx.post(f"{running.base_url}/completions", json=body, timeout=60)
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "prompt[1]"  # it said "prompt"
        deadline = time.monotonic() + 5
        while server.engine.scheduler.has_work() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not server.engine.scheduler.has_work(), "the batch's other prompt runs on"
    finally:
        running.stop()


def test_text_offsets_index_the_text_when_tokens_split_characters(
    shim: RunningShim, llama_server: Any, model: str
) -> None:
    """The tiny model's tokens are single bytes: each non-ASCII character spans two to
    four tokens, which print as ``\\xNN``. A token's offset is the index in the text of
    the character its first byte belongs to (vLLM's and OpenAI's meaning)."""
    text = "né 😀 ok"
    with SalienceClient(llama_server.target) as client:
        pieces = client.token_bytes(client.tokenize(text, add_special_tokens=True))
    reply = shim.client().completions.create(
        model=model, prompt=text, max_tokens=0, echo=True, logprobs=0
    )
    choice = reply.choices[0]
    assert choice.text == text and len(choice.logprobs.tokens) == len(pieces) == 11
    want, seen = [], 0
    for piece in pieces:  # the longest prefix of the text the earlier tokens' bytes hold
        want.append(max(k for k in range(len(text) + 1) if len(text[:k].encode()) <= seen))
        seen += len(piece)
    assert want == [0, 1, 1, 2, 3, 3, 3, 3, 4, 5, 6]
    assert choice.logprobs.text_offset == want


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


# ----- lm-eval's log-likelihood requests ---------------------------------------------


EOS_NEXT = [203, 8]
"""Two tokens after ``Q:`` after which the tiny Llama's most likely token is its EOS
(found by searching every pair once; checked against transformers below)."""


def _reference_logprobs(model_dir: Any, token_ids: list[int]) -> torch.Tensor:
    """The log-distributions after each token, from one full forward pass of
    transformers: [len, vocab]."""
    model = reference_model(model_dir)
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def test_lm_eval_loglikelihood_requests(
    shim: RunningShim, llama_server: Any, tiny_llama_dir: Any, model: str
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    eos = tokenizer.eos_token_id
    requests = [  # (context, continuation), as lm-eval tokenizes them
        (tokenizer.encode("Q:"), EOS_NEXT),
        (tokenizer.encode("The sky is"), tokenizer.encode(" blue")),
    ]
    prompts = [context + continuation for context, continuation in requests]
    # lm-eval's local-completions payload, posted as it posts it.
    body = {
        "model": model,
        "prompt": prompts,
        "temperature": 0,
        "max_tokens": 1,
        "logprobs": 1,
        "seed": 1234,
        "echo": True,
    }
    choices = httpx.post(f"{shim.base_url}/completions", json=body).json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    for (context, continuation), prompt, choice in zip(requests, prompts, choices, strict=True):
        rows = _reference_logprobs(tiny_llama_dir, prompt)
        positions = range(len(context), len(prompt))
        want = [float(rows[i - 1, prompt[i]]) for i in positions]
        want_greedy = all(int(rows[i - 1].argmax()) == prompt[i] for i in positions)
        token_logprobs = choice["logprobs"]["token_logprobs"]
        assert len(token_logprobs) == len(prompt) + 1  # every token, the decoded one too
        # lm-eval's parse: the sum of the slice, and greedy if each is the top logprob.
        ctxlen = len(context)
        assert token_logprobs[ctxlen:-1] == pytest.approx(want, abs=1e-4)
        assert sum(token_logprobs[ctxlen:-1]) == pytest.approx(sum(want), abs=1e-4)
        tops = choice["logprobs"]["top_logprobs"][ctxlen:-1]
        is_greedy = all(
            lp == max(top.values()) for lp, top in zip(token_logprobs[ctxlen:-1], tops, strict=True)
        )
        assert is_greedy == want_greedy
        decoded = int(rows[-1].argmax())
        assert token_logprobs[-1] == pytest.approx(float(rows[-1, decoded]), abs=1e-4)
        if continuation == EOS_NEXT:
            assert decoded == eos  # the case where dropping EOS shifted lm-eval's slice
            assert choice["logprobs"]["tokens"][-1] == "<|im_end|>"
            assert choice["text"] == tokenizer.decode(prompt)  # EOS adds no text
            assert choice["finish_reason"] == "stop"
    # The older harness's shape: nothing decoded, the continuation is the tail.
    body |= {"max_tokens": 0, "logprobs": 0}
    choices = httpx.post(f"{shim.base_url}/completions", json=body).json()["choices"]
    for (context, _), prompt, choice in zip(requests, prompts, choices, strict=True):
        rows = _reference_logprobs(tiny_llama_dir, prompt)
        want = [float(rows[i - 1, prompt[i]]) for i in range(len(context), len(prompt))]
        token_logprobs = choice["logprobs"]["token_logprobs"]
        assert len(token_logprobs) == len(prompt) and token_logprobs[0] is None
        assert token_logprobs[len(context) :] == pytest.approx(want, abs=1e-4)


def test_byte_fragment_tokens_print_their_bytes(shim: RunningShim, model: str) -> None:
    text = "naïve ☕"  # one token per byte: the two- and three-byte characters are split
    reply = shim.client().completions.create(
        model=model, prompt=text, max_tokens=0, echo=True, logprobs=1
    )
    strings = reply.choices[0].logprobs.tokens
    assert strings == [bytes([b]).decode("utf-8", errors="backslashreplace") for b in text.encode()]
    assert "\\xe2" in strings and "\ufffd" not in "".join(strings)


def _unescaped(token: str) -> bytes:
    """A token string's bytes: its text, with ``\\xNN`` escapes as the bytes they stand for."""
    return b"".join(
        bytes([int(part[2:], 16)]) if part.startswith("\\x") else part.encode()
        for part in re.split(r"(\\x[0-9a-f]{2})", token)
    )


def test_byte_level_bpe_fragments_on_the_default_model(default_shim: RunningShim) -> None:
    client = default_shim.client()
    model = client.models.list().data[0].id
    text = "naïve café ☕ 🙂 ok"
    reply = client.completions.create(model=model, prompt=text, max_tokens=0, echo=True, logprobs=1)
    strings = reply.choices[0].logprobs.tokens
    assert b"".join(map(_unescaped, strings)) == text.encode()  # every byte, once, in order
    assert any("\\x" in s for s in strings)  # the cup and the smile are split across tokens
    assert all("\ufffd" not in s for s in strings)
