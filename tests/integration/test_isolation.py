"""One bad request never hurts another (SPEC 2.1 limits, 2.6): a failure in one
request's part of a step fails that request alone, with INTERNAL and its request id;
its batch mates finish with exactly the tokens they get alone (a lost device or a dead
engine thread: test_engine_death.py)."""

from __future__ import annotations

import threading
import weakref

import grpc
import pytest
import torch

from salience_client.pb import salience_pb2 as pb
from salience_server.engine import outputs
from tests.helpers import (
    error_reason,
    generate,
    open_session,
    random_tokens,
)

BLOCK_SIZE = 4


def _solo(stub, prompt: list[int], max_tokens: int) -> list[int]:
    tokens, _ = generate(
        stub, open_session(stub), append_tokens=prompt, max_tokens=max_tokens, ignore_eos=True
    )
    return [t.id for t in tokens]


def _run_beside(stub, prompt: list[int], max_tokens: int, bad_call) -> tuple[list[int], object]:
    """Runs a normal stream and, once it decodes, ``bad_call`` beside it: (the normal
    stream's tokens, what the bad call returned or raised)."""
    session_id = open_session(stub)
    stream = stub.Generate(
        pb.GenerateRequest(
            session_id=session_id, append_tokens=prompt, max_tokens=max_tokens, ignore_eos=True
        )
    )
    tokens = [next(stream).token.id]  # decoding now
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(bad_call())
        except grpc.RpcError as error:
            outcome.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    tokens += [e.token.id for e in stream if e.HasField("token")]
    thread.join(timeout=60)
    return tokens, outcome[0]


POISON = 257
"""A token id no other request uses."""


def _fail_on_poison(server, monkeypatch, error: Exception) -> None:
    """Every forward pass holding ``POISON`` raises ``error``."""
    runner = server.engine.runner
    real = runner.execute

    def execute(batch, uploads=None):
        if POISON in batch.token_ids:
            raise error
        return real(batch, uploads)

    monkeypatch.setattr(runner, "execute", execute)


@pytest.fixture
def server(tiny_llama_dir, server_factory):
    return server_factory(tiny_llama_dir, block_size=BLOCK_SIZE, kv_cache_bytes=4 << 20)


def test_a_tiny_temperature_is_greedy_and_harms_no_one(server) -> None:
    """temperature=1e-42 used to overflow the logits and fail the whole batch."""
    stub = server.stub
    prompt, other = random_tokens(12, seed=1), random_tokens(9, seed=2)
    want = _solo(stub, prompt, 60)

    def tiny_temperature() -> list[int]:
        tokens, done = generate(
            stub,
            open_session(stub),
            append_tokens=other,
            max_tokens=20,
            temperature=1e-42,
            ignore_eos=True,
        )
        return [t.id for t in tokens]

    got, outcome = _run_beside(stub, prompt, 60, tiny_temperature)
    assert got == want
    assert outcome == _solo(stub, other, 20)  # greedy


def test_a_failure_in_one_requests_rows_fails_it_alone(server, monkeypatch) -> None:
    stub = server.stub
    prompt, poisoned_prompt = random_tokens(12, seed=3), random_tokens(5, seed=4)
    want = _solo(stub, prompt, 40)
    poisoned = open_session(stub)
    real = outputs.chunk_events

    def failing(request, chunk, rows):
        if request.session.session_id == poisoned:
            raise RuntimeError("a bad row")
        return real(request, chunk, rows)

    monkeypatch.setattr(outputs, "chunk_events", failing)
    call = lambda: generate(stub, poisoned, append_tokens=poisoned_prompt, max_tokens=9)  # noqa: E731
    got, outcome = _run_beside(stub, prompt, 40, call)
    assert got == want
    assert isinstance(outcome, grpc.RpcError)
    assert outcome.code() == grpc.StatusCode.INTERNAL
    assert error_reason(outcome) == "REQUEST_FAILED"  # not a broken stream: no resume
    assert "request" in outcome.details() and "a bad row" in outcome.details()
    assert not server.engine.sessions[poisoned].is_busy  # released: usable again
    monkeypatch.setattr(outputs, "chunk_events", real)
    _, done = generate(stub, poisoned, offset=5, append_tokens=[1], max_tokens=2)
    assert done.total_tokens == 8


def test_a_request_whose_sampling_cannot_be_planned_fails_alone(server, monkeypatch) -> None:
    """The step plans its sampling before its forward pass; a failure there (a broken
    shaping, say) fails the request it belongs to, with its cause, and the others'
    streams go on unchanged."""
    from salience_server.engine import penalties

    stub = server.stub
    prompt = random_tokens(12, seed=6)
    want = _solo(stub, prompt, 40)
    real = penalties.plan

    def plan(rows, shapings, uploads):
        if any(s.params.logit_bias.get(7) == 1.5 for s in shapings):
            raise RuntimeError("this shaping cannot be planned")
        return real(rows, shapings, uploads)

    monkeypatch.setattr(penalties, "plan", plan)
    call = lambda: generate(  # noqa: E731
        stub, open_session(stub), append_tokens=[5, 6], max_tokens=3, logit_bias={7: 1.5}
    )
    got, outcome = _run_beside(stub, prompt, 40, call)
    assert got == want
    assert isinstance(outcome, grpc.RpcError) and outcome.code() == grpc.StatusCode.INTERNAL
    assert "this shaping cannot be planned" in outcome.details()
    with pytest.raises(grpc.RpcError) as alone:  # alone in its step: still its own error
        call()
    assert "this shaping cannot be planned" in alone.value.details()


def test_a_forward_pass_failure_is_narrowed_to_its_request(server, monkeypatch) -> None:
    """When the batch's forward pass fails, each request's chunk runs alone: only the
    one that fails alone fails."""
    stub = server.stub
    prompt = random_tokens(12, seed=5)
    want = _solo(stub, prompt, 40)
    _fail_on_poison(server, monkeypatch, RuntimeError("the kernel refused this input"))
    call = lambda: generate(stub, open_session(stub), append_tokens=[5, POISON, 6], max_tokens=3)  # noqa: E731
    got, outcome = _run_beside(stub, prompt, 40, call)
    assert got == want
    assert isinstance(outcome, grpc.RpcError) and outcome.code() == grpc.StatusCode.INTERNAL
    assert "the kernel refused this input" in outcome.details()


def test_a_step_out_of_memory_runs_its_requests_alone(server, monkeypatch) -> None:
    """A batch whose step needs more memory than is free (its activations, its logits)
    runs each request's chunk alone, and each gets exactly its solo tokens."""
    stub = server.stub
    prompt, other = random_tokens(12, seed=7), random_tokens(9, seed=8)
    want, want_other = _solo(stub, prompt, 30), _solo(stub, other, 12)
    runner = server.engine.runner
    real = runner.execute
    refused: list[int] = []

    def execute(batch, uploads=None):
        if len(batch.sequences) > 1:
            refused.append(len(batch.sequences))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(batch, uploads)

    monkeypatch.setattr(runner, "execute", execute)
    got, outcome = _run_beside(stub, prompt, 30, lambda: _solo(stub, other, 12))
    assert refused, "the two calls never shared a step"
    assert (got, outcome) == (want, want_other)


def test_a_step_out_of_memory_frees_its_memory_before_running_alone(server, monkeypatch) -> None:
    """The requests of a step that ran out of memory ran again alone inside the error's
    handler, whose traceback held the failed pass's tensors: the memory it needed was
    still taken. Each retry now finds the failed pass's tensors gone."""
    stub = server.stub
    runner = server.engine.runner
    real = runner.execute
    held: list[weakref.ref] = []
    alive_at_retry: list[bool] = []

    def execute(batch, uploads=None):
        if len(batch.sequences) > 1:
            activations = torch.empty(1 << 20)  # what the failed pass had allocated
            held.append(weakref.ref(activations))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        alive_at_retry.extend(ref() is not None for ref in held)
        return real(batch, uploads)

    monkeypatch.setattr(runner, "execute", execute)
    prompt, other = random_tokens(12, seed=10), random_tokens(9, seed=11)
    _run_beside(stub, prompt, 20, lambda: _solo(stub, other, 8))
    assert held and alive_at_retry and not any(alive_at_retry)


def test_a_failed_speculating_request_gives_its_draft_blocks_back(
    tiny_llama_dir, server_factory, monkeypatch
) -> None:
    """A request that failed outside the step's commit (run alone, or in a step that
    failed as a whole) kept the blocks its drafts had taken past its session's length."""
    server = server_factory(
        tiny_llama_dir,
        block_size=BLOCK_SIZE,
        kv_cache_bytes=4 << 20,
        speculative="ngram",
        speculative_cost=(0.0, 0.0),  # always draft
    )
    engine = server.engine
    runner = engine.runner
    real = runner.execute
    prompt = [5, 6, 7, 8, 9] * 8  # its history proposes drafts
    verified: list[int] = []

    def execute(batch, uploads=None):
        if batch.positions[0] >= len(prompt) and len(batch.token_ids) > 1:  # a verification
            verified.append(len(batch.token_ids))
            raise RuntimeError("the kernel refused this input")
        return real(batch, uploads)

    monkeypatch.setattr(runner, "execute", execute)
    session_id = open_session(server.stub)
    with pytest.raises(grpc.RpcError):
        generate(server.stub, session_id, append_tokens=prompt, max_tokens=12, ignore_eos=True)
    assert verified, "no step verified drafts"
    session = engine.sessions[session_id]
    blocks = engine.session_table.block_manager.blocks_for(session.length)
    assert len(session.block_table) == blocks


@pytest.mark.parametrize("alone", [True, False], ids=["alone", "in-a-batch"])
def test_a_request_out_of_memory_alone_is_resource_exhausted(
    server, monkeypatch, alone: bool
) -> None:
    """One that runs out of memory even alone fails RESOURCE_EXHAUSTED, saying what to
    change; alone in its step it failed the step (INTERNAL STEP_FAILED), beside others
    INTERNAL with the allocator's message. The others go on unchanged."""
    stub = server.stub
    prompt = random_tokens(12, seed=9)
    want = _solo(stub, prompt, 30)
    out_of_memory = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to ...")
    _fail_on_poison(server, monkeypatch, out_of_memory)
    call = lambda: generate(stub, open_session(stub), append_tokens=[5, POISON], max_tokens=3)  # noqa: E731
    if alone:
        with pytest.raises(grpc.RpcError) as caught:
            call()
        outcome = caught.value
    else:
        got, outcome = _run_beside(stub, prompt, 30, call)
        assert got == want
    assert isinstance(outcome, grpc.RpcError)
    assert outcome.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_reason(outcome) == "OUT_OF_MEMORY"
    assert "--kv-cache-memory" in outcome.details()


@pytest.mark.parametrize(
    "options",
    [{"max_tokens": 4}, {"max_tokens": 4, "temperature": 1.0}, {"logprobs_ranges": [(0, 3)]}],
    ids=["greedy", "sampled", "scored"],
)
def test_nan_logits_fail_their_request_alone(server, options: dict) -> None:
    """A request whose logits turn NaN (an overflow in the model's dtype) fails with
    INTERNAL naming them, whatever its rows were for: a greedy one decoded token 0 with
    a NaN logprob to its max_tokens, a scored one reported NaN logprobs (which no JSON
    holds). Its batch mate's stream is its solo one."""
    stub = server.stub
    prompt = random_tokens(12, seed=12)
    want = _solo(stub, prompt, 30)
    with torch.no_grad():  # the poison token's embedding: NaN from it on, in its sequence
        server.engine.runner.model.get_input_embeddings().weight[POISON] = float("nan")
    session_id = open_session(stub)
    call = lambda: generate(stub, session_id, append_tokens=[5, POISON, 6], **options)  # noqa: E731
    got, outcome = _run_beside(stub, prompt, 30, call)
    assert got == want
    assert isinstance(outcome, grpc.RpcError), outcome
    assert outcome.code() == grpc.StatusCode.INTERNAL and "NaN" in outcome.details()
    assert not server.engine.sessions[session_id].is_busy


def test_a_failure_sampling_a_batch_is_narrowed_to_its_request(server, monkeypatch) -> None:
    """When sampling or scoring a step's rows fails as a whole, each request's rows are
    sampled again alone: the one whose rows fail alone fails, with its cause; the others
    get exactly their solo tokens."""
    stub = server.stub
    prompt = random_tokens(12, seed=13)
    want = _solo(stub, prompt, 30)
    poisoned = open_session(stub)
    real = outputs._row_results
    narrowed: list[int] = []

    def row_results(plan, logits, readout):
        requests = {row.request for row in plan.rows}
        if any(r.session.session_id == poisoned for r in requests):
            narrowed.append(len(requests))
            raise RuntimeError("these rows cannot be scored")
        return real(plan, logits, readout)

    monkeypatch.setattr(outputs, "_row_results", row_results)
    call = lambda: generate(stub, poisoned, append_tokens=[5, 6], max_tokens=3)  # noqa: E731
    got, outcome = _run_beside(stub, prompt, 30, call)
    assert got == want
    assert 2 in narrowed, "the two calls never shared a step"
    assert isinstance(outcome, grpc.RpcError) and outcome.code() == grpc.StatusCode.INTERNAL
    assert "these rows cannot be scored" in outcome.details()


def test_an_embedding_of_nan_states_fails_its_call(server) -> None:
    """Pooled final hidden states that turned NaN were returned as NaN values (which no
    JSON holds: the shim's /v1/embeddings failed on them): the call fails INTERNAL
    naming them, and the next Embed is served."""
    stub = server.stub
    clean = pb.EmbedRequest(token_lists=[pb.TokenIds(token_ids=[5, 6, 7])], pooling=pb.POOLING_MEAN)
    want = stub.Embed(clean).embeddings[0].values
    with torch.no_grad():
        server.engine.runner.model.get_input_embeddings().weight[POISON] = float("nan")
    for pooling in (pb.POOLING_MEAN, pb.POOLING_LAST):
        poisoned = pb.EmbedRequest(
            token_lists=[pb.TokenIds(token_ids=[5, POISON, 7])], pooling=pooling
        )
        with pytest.raises(grpc.RpcError) as caught:
            stub.Embed(poisoned)
        assert caught.value.code() == grpc.StatusCode.INTERNAL
        assert "NaN" in caught.value.details()
    assert stub.Embed(clean).embeddings[0].values == want
