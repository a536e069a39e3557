"""The Embed RPC, the clients' ``embed`` and the shim's /v1/embeddings, against the
final hidden states of one plain transformers forward pass (the oracle)."""

from __future__ import annotations

import asyncio
import base64
import struct
import threading

import grpc
import httpx
import openai
import pytest
import torch

from salience_client import AsyncSalienceClient, SalienceClient
from salience_client.pb import salience_pb2 as pb
from salience_server.text_checks import MAX_CHARS_PER_TOKEN
from tests.helpers import error_reason, generate, open_session, random_tokens
from tests.tiny_models import build_tokenizer, reference_model

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def oracle(tiny_llama_dir):
    return reference_model(tiny_llama_dir)


def final_states(oracle, token_ids: list[int]) -> torch.Tensor:
    """[L, H]: the decoder's output after its final norm."""
    with torch.no_grad():
        return oracle.model(torch.tensor([token_ids])).last_hidden_state[0].float()


def test_last_and_mean_pooling_equal_the_final_hidden_states(llama_server, oracle) -> None:
    inputs = [random_tokens(n, seed=40 + n) for n in (1, 7, 30)]
    with SalienceClient(llama_server.target) as client:
        last = client.embed(token_lists=inputs)
        mean = client.embed(token_lists=inputs, pooling="mean", normalize=True)
    assert last.num_tokens == [1, 7, 30] and last.prompt_tokens == 38
    for index, token_ids in enumerate(inputs):
        states = final_states(oracle, token_ids)
        assert (torch.tensor(last.vectors[index]) - states[-1]).abs().max() < TOLERANCE
        want = torch.nn.functional.normalize(states.mean(dim=0), dim=0)
        assert (torch.tensor(mean.vectors[index]) - want).abs().max() < TOLERANCE


def test_texts_are_tokenized_by_the_server(llama_server, oracle) -> None:
    with SalienceClient(llama_server.target) as client:
        result = client.embed(texts=["hello world", "zebra"])
    tokenizer = build_tokenizer()
    for vector, text in zip(result.vectors, ["hello world", "zebra"], strict=True):
        want = final_states(oracle, tokenizer.encode(text, add_special_tokens=False))[-1]
        assert (torch.tensor(vector) - want).abs().max() < TOLERANCE


def test_a_text_given_alone_is_one_input(llama_server, oracle) -> None:
    """``embed(texts="hello world")`` (a str is a sequence of str) gave one vector per
    character; it is one text, as a stop string given alone is one stop string."""
    want = final_states(oracle, build_tokenizer().encode("hello world"))[-1]
    with SalienceClient(llama_server.target) as client:
        result = client.embed(texts="hello world")
    assert result.num_tokens == [11] and len(result.vectors) == 1
    assert (torch.tensor(result.vectors[0]) - want).abs().max() < TOLERANCE

    async def embed_async() -> list[list[float]]:
        async with AsyncSalienceClient(llama_server.target) as client:
            return (await client.embed(texts="hello world")).vectors

    assert asyncio.run(embed_async()) == result.vectors


def test_embeddings_batch_with_generation_in_a_tight_pool(
    tiny_llama_dir, server_factory, oracle
) -> None:
    """Long inputs in a pool that cannot hold them all at once, beside a stream: each
    input's chunks are pooled once, whatever preemption does; the stream is exact."""
    server = server_factory(
        tiny_llama_dir, block_size=4, kv_cache_bytes=24 * 4 * 512, max_batch_tokens=16
    )
    inputs = [random_tokens(60, seed=50 + i) for i in range(6)]
    prompt = random_tokens(8, seed=49)
    solo = generate(server.stub, open_session(server.stub), append_tokens=prompt, max_tokens=40)
    streamed: list = []

    def stream() -> None:
        streamed.append(
            generate(server.stub, open_session(server.stub), append_tokens=prompt, max_tokens=40)
        )

    thread = threading.Thread(target=stream)
    thread.start()
    with SalienceClient(server.target) as client:
        result = client.embed(token_lists=inputs, pooling="mean")
    thread.join(timeout=60)
    assert [t.id for t in streamed[0][0]] == [t.id for t in solo[0]]
    for vector, token_ids in zip(result.vectors, inputs, strict=True):
        want = final_states(oracle, token_ids).mean(dim=0)
        assert (torch.tensor(vector) - want).abs().max() < TOLERANCE
    engine = server.engine  # the inputs' own sessions are gone, with all their blocks
    held = sum(len(s.block_table) for s in engine.sessions.values())
    assert engine.block_manager.num_free == engine.block_manager.num_blocks - held


def test_a_call_of_more_inputs_than_a_small_queue_holds_is_not_refused(
    tiny_llama_dir, server_factory, oracle
) -> None:
    """With ``--max-running 4 --max-queue 4``, an idle server took 8 inputs of one call
    and refused 9 or more QUEUE_FULL, every time: the call queued 32 at once. It queues
    at most half what the engine takes at once now."""
    server = server_factory(tiny_llama_dir, block_size=4, max_running=4, max_queue=4)
    inputs = [random_tokens(3 + i, seed=60 + i) for i in range(17)]
    with SalienceClient(server.target) as client:
        result = client.embed(token_lists=inputs)
    for vector, token_ids in zip(result.vectors, inputs, strict=True):
        assert (torch.tensor(vector) - final_states(oracle, token_ids)[-1]).abs().max() < TOLERANCE


def test_a_call_whose_vectors_pass_the_message_limit_is_refused_before_its_work(
    tiny_llama_dir, server_factory, oracle
) -> None:
    """2,048 inputs of a model 8,192 wide answer 64 MiB: gRPC refused the answer once
    every input was computed. A call past the limit is INVALID_INPUT at once, saying how
    many inputs fit; one at it is answered."""
    limit = 64 << 10  # the tiny model's vectors are 64 floats: 272 bytes each
    server = server_factory(tiny_llama_dir, server_options={"max_message_bytes": limit})
    fits = limit // (4 * 64 + 16)
    inputs = [random_tokens(3, seed=70 + i) for i in range(fits + 30)]  # 71 KB of answer
    with pytest.raises(grpc.RpcError) as caught:
        server.stub.Embed(pb.EmbedRequest(token_lists=[pb.TokenIds(token_ids=t) for t in inputs]))
    assert error_reason(caught.value) == "INVALID_INPUT"
    assert f"send at most {fits} inputs per call" in caught.value.details()
    result = server.stub.Embed(
        pb.EmbedRequest(token_lists=[pb.TokenIds(token_ids=t) for t in inputs[:fits]])
    )
    assert len(result.embeddings) == fits
    want = final_states(oracle, inputs[0])[-1]
    assert (torch.tensor(list(result.embeddings[0].values)) - want).abs().max() < TOLERANCE


def test_embed_calls_at_once_share_a_small_queue_without_refusals(
    tiny_llama_dir, server_factory, oracle
) -> None:
    """Two calls of 12 inputs at once where the engine takes 8 (``--max-running 4
    --max-queue 4``), each queueing 4 at a time: every vector is exact. (An input the
    full queue refuses waits for its call's own to make room: the rule is tested
    exactly in ``tests/unit/test_embed_window.py``.)"""
    server = server_factory(tiny_llama_dir, block_size=4, max_running=4, max_queue=4)
    calls = [[random_tokens(3 + i, seed=100 * c + i) for i in range(12)] for c in range(2)]
    results: list[object] = [None] * len(calls)

    def embed(index: int) -> None:
        with SalienceClient(server.target) as client:
            try:
                results[index] = client.embed(token_lists=calls[index])
            except Exception as error:  # noqa: BLE001 - the test reports it
                results[index] = error

    threads = [threading.Thread(target=embed, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for result, inputs in zip(results, calls, strict=True):
        assert not isinstance(result, Exception), result
        for vector, token_ids in zip(result.vectors, inputs, strict=True):  # type: ignore[attr-defined]
            want = final_states(oracle, token_ids)[-1]
            assert (torch.tensor(vector) - want).abs().max() < TOLERANCE


OK = pb.TokenIds(token_ids=[1, 2])


@pytest.mark.parametrize(
    "request_fields, reason",
    [
        (dict(), "INVALID_INPUT"),
        (dict(texts=["a"], token_lists=[pb.TokenIds(token_ids=[1])]), "INVALID_INPUT"),
        (dict(token_lists=[pb.TokenIds(token_ids=[])]), "INVALID_INPUT"),
        (dict(token_lists=[OK, pb.TokenIds(token_ids=[100000])]), "INVALID_TOKEN"),
        (dict(token_lists=[OK, pb.TokenIds(token_ids=[1] * 600)]), "CONTEXT_EXCEEDED"),
        # More characters than 512 tokens can hold, refused before tokenizing.
        (dict(texts=["ok", "a" * (512 * MAX_CHARS_PER_TOKEN + 1)]), "CONTEXT_EXCEEDED"),
        (dict(texts=["a"], pooling=99), "INVALID_INPUT"),
    ],
    ids=[
        "nothing",
        "both kinds",
        "an empty input",
        "an unknown token",
        "too long",
        "too many characters",
        "an unknown pooling",
    ],
)
def test_bad_embed_calls_are_invalid(llama_server, request_fields, reason) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        llama_server.stub.Embed(pb.EmbedRequest(**request_fields))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(caught.value) == reason
    if len(request_fields.get("token_lists", [])) == 2:  # the message names the input
        assert caught.value.details().startswith("input 1 "), caught.value.details()


def test_openai_embeddings_endpoint(shim, llama_server, oracle, model) -> None:
    client = shim.client()
    tokenizer = build_tokenizer()
    reply = client.embeddings.create(model=model, input=["one fish", "two fish"])
    assert [d.index for d in reply.data] == [0, 1]
    assert reply.usage.prompt_tokens == 16
    for datum, text in zip(reply.data, ["one fish", "two fish"], strict=True):
        state = final_states(oracle, tokenizer.encode(text, add_special_tokens=False))[-1]
        want = torch.nn.functional.normalize(state, dim=0)
        assert (torch.tensor(datum.embedding) - want).abs().max() < TOLERANCE
    # Token ids in, base64 out (the SDK decodes float32 little-endian itself).
    raw = shim.client().embeddings.with_raw_response.create(
        model=model, input=[[5, 6, 7]], encoding_format="base64"
    )
    encoded = raw.http_response.json()["data"][0]["embedding"]
    values = struct.unpack(f"<{len(base64.b64decode(encoded)) // 4}f", base64.b64decode(encoded))
    want = torch.nn.functional.normalize(final_states(oracle, [5, 6, 7])[-1], dim=0)
    assert (torch.tensor(values) - want).abs().max() < TOLERANCE


def test_base64_vectors_are_the_float_vectors_bit_for_bit(shim, model) -> None:
    """One input a call, so that each is computed alone every time (the same rows in
    every forward pass: the same bits)."""
    client = shim.client()
    for text in ["e\u0301 👩\u200d👩\u200d👧", "zebra"]:
        floats = client.embeddings.create(model=model, input=text, encoding_format="float")
        default = client.embeddings.create(model=model, input=text)  # the SDK asks base64
        raw = client.embeddings.with_raw_response.create(
            model=model, input=text, encoding_format="base64"
        )
        packed = base64.b64decode(raw.http_response.json()["data"][0]["embedding"])
        want = floats.data[0].embedding
        assert list(struct.unpack(f"<{len(packed) // 4}f", packed)) == want
        assert default.data[0].embedding == want


@pytest.mark.parametrize(
    "fields, param",
    [
        (dict(input=""), "input"),
        (dict(input=[]), "input"),
        (dict(input=["a", ""]), "input"),
        (dict(input=[[5], []]), "input"),
        (dict(input=["a", 5]), "input"),
        (dict(input=[5, [6]]), "input"),
        (dict(input=[-1]), "input"),
        (dict(input="a", dimensions=64), "dimensions"),
        (dict(input="a", encoding_format="int8"), "encoding_format"),
        (dict(input=[[5] * 513]), "input"),
    ],
    ids=[
        "empty text",
        "no input",
        "an empty text among others",
        "an empty token list",
        "text and ids mixed",
        "ids and lists mixed",
        "a negative id",
        "dimensions",
        "an unknown encoding",
        "past the context",
    ],
)
def test_bad_embeddings_bodies_are_openai_400s(shim, model, fields, param) -> None:
    reply = httpx.post(f"{shim.base_url}/embeddings", json={"model": model, **fields}, timeout=30)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error


def test_embeddings_run_at_the_priority_asked(
    shim, llama_server, model, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shim took vLLM's ``priority`` and dropped it, and the clients' ``embed`` had
    none: every input ran at priority 0."""
    engine = llama_server.engine
    submit = engine.submit_embedding
    priorities: list[int] = []

    def recording(token_ids, pooling, priority, sink):  # type: ignore[no-untyped-def]
        priorities.append(priority)
        return submit(token_ids, pooling, priority, sink)

    monkeypatch.setattr(engine, "submit_embedding", recording)
    shim.client().embeddings.create(model=model, input=["a", "b"], extra_body={"priority": -3})
    with SalienceClient(llama_server.target) as client:
        client.embed(texts=["c"], priority=7)
        with pytest.raises(ValueError, match="priority"):
            client.embed(texts=["c"], priority=2**31)
    assert priorities == [-3, -3, 7]
    reply = httpx.post(
        f"{shim.base_url}/embeddings", json={"model": model, "input": "a", "priority": 2**31}
    )
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "priority"


def test_truncate_prompt_tokens_keeps_each_inputs_last_tokens(shim, oracle, model) -> None:
    """vLLM's ``truncate_prompt_tokens`` (it was kept and ignored): token ids and texts
    alike are embedded from their last k tokens; -1 is the context (nothing cut here);
    0 is a 400."""
    client = shim.client()
    tokenizer = build_tokenizer()
    text = "one fish, two fish"
    reply = client.embeddings.create(
        model=model,
        input=[text],
        extra_body={"truncate_prompt_tokens": 3, "normalize": False},
    )
    last = tokenizer.encode(text, add_special_tokens=False)[-3:]
    want = final_states(oracle, last)[-1]
    assert (torch.tensor(reply.data[0].embedding) - want).abs().max() < TOLERANCE
    assert reply.usage.prompt_tokens == 3
    ids = [[5, 6, 7, 8, 9]]
    cut = client.embeddings.create(
        model=model, input=ids, extra_body={"truncate_prompt_tokens": 2, "normalize": False}
    )
    want = final_states(oracle, [8, 9])[-1]
    assert (torch.tensor(cut.data[0].embedding) - want).abs().max() < TOLERANCE
    whole = client.embeddings.create(
        model=model, input=ids, extra_body={"truncate_prompt_tokens": -1}
    )
    assert whole.usage.prompt_tokens == 5
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=model, input=ids, extra_body={"truncate_prompt_tokens": 0})
    assert caught.value.body["param"] == "truncate_prompt_tokens"


def test_too_many_inputs_are_refused_before_any_is_tokenized(
    shim, model, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``truncate_prompt_tokens`` the shim tokenizes each text itself, one call each,
    and only then did the server refuse a call of more than 2,048 inputs (20,000
    one-letter texts: 30 s of work for a 400). The shim refuses them first now."""
    backend = shim.backend
    tokenize = backend.client.tokenize
    tokenized: list[str] = []

    async def recording(text, *args, **kwargs):  # type: ignore[no-untyped-def]
        tokenized.append(text)
        return await tokenize(text, *args, **kwargs)

    monkeypatch.setattr(backend.client, "tokenize", recording)
    for value in (["a"] * 2049, [[5]] * 2049):
        reply = httpx.post(
            f"{shim.base_url}/embeddings",
            json={"model": model, "input": value, "truncate_prompt_tokens": 1},
            timeout=60,
        )
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert error["param"] == "input" and "at most 2048" in error["message"]
    assert tokenized == []


def test_embeddings_add_special_tokens_by_default(
    shim, model, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM's default is true (a Llama 3 embeds its text after its BOS); the shim's was
    false. The tiny tokenizer adds no special token, so what the shim asks is checked."""
    backend = shim.backend
    embed = backend.client.embed
    asked: list[bool] = []

    async def recording(**fields):  # type: ignore[no-untyped-def]
        asked.append(fields["add_special_tokens"])
        return await embed(**fields)

    monkeypatch.setattr(backend.client, "embed", recording)
    client = shim.client()
    client.embeddings.create(model=model, input="a")
    client.embeddings.create(model=model, input="a", extra_body={"add_special_tokens": False})
    assert asked == [True, False]
