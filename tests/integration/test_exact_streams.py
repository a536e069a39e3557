"""Streams stay exact under memory pressure (SPEC 2.1 Token events, 2.4): preemption,
offload, drop and recompute never send an event twice or skip one, and every event
equals one plain forward pass over the session's final tokens. Also: ranges that start
before ``offset`` (committed positions scored again), and the preemption order."""

from __future__ import annotations

import threading

import pytest
import torch

from salience_client.pb import salience_pb2 as pb
from tests.helpers import (
    U32_MAX,
    engine_held_in_a_step,
    generate,
    metric_samples,
    open_session,
    random_tokens,
    reference_logprobs,
)
from tests.tiny_models import reference_model

TOLERANCE = 1e-4
TOKEN_BYTES = 512  # the tiny models: 2 layers x 2 KV heads x 16 dims x (K, V) x 4 bytes
BLOCK_SIZE = 4


@pytest.fixture(scope="module")
def oracle(tiny_llama_dir):
    return reference_model(tiny_llama_dir)


def check_against_forward_pass(
    oracle: torch.nn.Module, token_ids: list[int], events: list[pb.Token], positions: list[int]
) -> None:
    """The events are exactly ``positions``, in order; each logprob equals the full
    forward pass over ``token_ids``, and each decoded token is its argmax (greedy)."""
    assert [e.position for e in events] == positions
    reference = reference_logprobs(oracle, token_ids)
    for event in events:
        assert event.id == token_ids[event.position]
        if event.position == 0:
            assert event.sampled_logprob == 0.0
            continue
        row = reference[event.position - 1]
        assert abs(event.sampled_logprob - row[event.id].item()) < TOLERANCE
        if not event.is_prefill:
            assert event.id == int(row.argmax())


def _stream(stub, session_id: str, results: dict, key: str, **kwargs) -> None:
    results[key] = generate(stub, session_id, **kwargs)


@pytest.mark.parametrize("host_kv_bytes", [0, 40 * TOKEN_BYTES], ids=["drop", "offload"])
def test_a_preempted_stream_sends_each_position_once(
    host_kv_bytes, tiny_llama_dir, server_factory, oracle
) -> None:
    """The issue's case, scaled down: two streams that together outgrow an 80-token pool.
    The later one is preempted (its KV dropped or offloaded) and recomputed while it
    runs; on the old engine it sent its prefill and decoded positions again."""
    server = server_factory(
        tiny_llama_dir,
        block_size=BLOCK_SIZE,
        kv_cache_bytes=20 * BLOCK_SIZE * TOKEN_BYTES,
        host_kv_bytes=host_kv_bytes,
        max_batch_tokens=16,
    )
    stub = server.stub
    first, second = open_session(stub), open_session(stub)
    prompts = {"first": random_tokens(10, seed=1), "second": random_tokens(40, seed=2)}
    results: dict = {}
    threads = [
        threading.Thread(
            target=_stream,
            args=(stub, first, results, "first"),
            kwargs=dict(append_tokens=prompts["first"], max_tokens=45, ignore_eos=True),
        ),
        threading.Thread(
            target=_stream,
            args=(stub, second, results, "second"),
            kwargs=dict(
                append_tokens=prompts["second"],
                max_tokens=30,
                ignore_eos=True,
                logprobs_ranges=[(0, 10**6)],
                logprob_top_k=3,
            ),
        ),
    ]
    engine = server.engine
    threads[0].start()
    while engine.sessions[first].num_computed < 10:  # the first is decoding
        threading.Event().wait(0.001)
    # The second arrives before the first has decoded much more (it could otherwise
    # end first on a fast machine, and nothing would be preempted).
    with engine_held_in_a_step(engine) as in_step:
        assert in_step.wait(10)
        threads[1].start()
        while not engine.scheduler.waiting:
            threading.Event().wait(0.001)
    for thread in threads:
        thread.join(timeout=120)
    assert server.engine.scheduler.num_preemptions > 0, "the case did not happen"
    # Operators see them (the counter was registered, never counted).
    preemptions = metric_samples(server)[("salience_preemptions_total", ())]
    assert preemptions == server.engine.scheduler.num_preemptions
    for name, max_tokens in (("first", 45), ("second", 30)):
        events, done = results[name]
        token_ids = prompts[name] + [e.id for e in events if not e.is_prefill]
        assert done.completion_tokens == max_tokens and done.total_tokens == len(token_ids)
        first_scored = 0 if name == "second" else len(prompts[name])
        check_against_forward_pass(
            oracle, token_ids, events, list(range(first_scored, len(token_ids)))
        )
    second_done = results["second"][1]
    assert second_done.recomputed_tokens > 0  # its KV was lost and computed again
    top = [t.token_id for t in results["second"][0][5].top_logprobs]
    want = reference_logprobs(oracle, prompts["second"])[4].topk(3).indices.tolist()
    assert top == want


def test_ranges_before_offset_score_committed_positions(
    tiny_llama_dir, server_factory, oracle
) -> None:
    """The Rust client's scoring flow: prefill-only chunks first, then one call whose
    range covers committed positions; they are recomputed and streamed first."""
    server = server_factory(tiny_llama_dir, block_size=BLOCK_SIZE, kv_cache_bytes=4 << 20)
    stub = server.stub
    token_ids = random_tokens(60, seed=3)
    session_id = open_session(stub)
    generate(stub, session_id, append_tokens=token_ids[:25])
    generate(stub, session_id, append_tokens=token_ids[25:50], offset=25)
    events, done = generate(
        stub,
        session_id,
        append_tokens=token_ids[50:],
        offset=50,
        logprobs_ranges=[(0, 5), (20, U32_MAX)],
        logprob_top_k=2,
        max_tokens=4,
    )
    final = token_ids + [e.id for e in events if not e.is_prefill]
    positions = [0, 1, 2, 3, 4] + list(range(20, 64))
    check_against_forward_pass(oracle, final, events, positions)
    assert done.total_tokens == 64 and done.recomputed_tokens == 0
    # A decode after a prefill-only call: the last position is fed again, not cached.
    more, _ = generate(stub, session_id, offset=64, max_tokens=2, logprobs_ranges=[(63, 66)])
    assert [e.position for e in more] == [63, 64, 65]
    check_against_forward_pass(oracle, final + [e.id for e in more[1:]], more, [63, 64, 65])


def test_one_missing_block_preempts_the_latest_request_only(tiny_llama_dir, server_factory) -> None:
    """Running requests are preempted latest first, and only as many as needed: the
    earlier ones keep running, and a request never loses its KV to one behind it."""
    server = server_factory(
        tiny_llama_dir,
        block_size=BLOCK_SIZE,
        kv_cache_bytes=24 * BLOCK_SIZE * TOKEN_BYTES,
        host_kv_bytes=0,
        max_batch_tokens=64,
    )
    stub = server.stub
    sessions = [open_session(stub) for _ in range(3)]
    results: dict = {}
    threads = [
        threading.Thread(
            target=_stream,
            args=(stub, session_id, results, index),
            kwargs=dict(
                append_tokens=random_tokens(20, seed=index), max_tokens=20, ignore_eos=True
            ),
        )
        for index, session_id in enumerate(sessions)
    ]
    # Arrival order 0, 1, 2, all before the first step: on a loaded machine a request
    # could otherwise finish before the last one arrives, and nothing would be preempted.
    arrived, step = threading.Event(), server.engine.step
    server.engine.step = lambda: (arrived.wait(timeout=60), step())  # type: ignore[method-assign]
    for index, thread in enumerate(threads):
        thread.start()
        while not server.engine.sessions[sessions[index]].is_busy and index not in results:
            threading.Event().wait(0.0005)
    arrived.set()
    for thread in threads:
        thread.join(timeout=120)
    recomputed = [results[index][1].recomputed_tokens for index in range(3)]
    # 3 x 40 tokens in a 96-token pool: only the last to arrive is preempted.
    assert recomputed[0] == 0 and recomputed[1] == 0 and recomputed[2] > 0
    assert all(results[i][1].completion_tokens == 20 for i in range(3))
