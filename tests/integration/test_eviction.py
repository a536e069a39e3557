"""Evicted sessions through a real server: rewinds of dropped and offloaded sessions,
host copies made without the engine lock, and KV moves that fail part-way."""

from __future__ import annotations

import threading

import grpc
import pytest

from salience_client.pb import salience_pb2 as pb
from tests.helpers import U32_MAX, generate, open_session, random_tokens, session_info
from tests.integration.test_memory import BLOCK_SIZE, TOKEN_BYTES, TOLERANCE


def _pool_of_20_blocks(server_factory, model_dir, host_kv_bytes: int):  # type: ignore[no-untyped-def]
    """A server whose pool holds 80 tokens: a 60-token session is evicted by the next."""
    return server_factory(
        model_dir,
        block_size=BLOCK_SIZE,
        kv_cache_bytes=20 * BLOCK_SIZE * TOKEN_BYTES,
        host_kv_bytes=host_kv_bytes,
    )


def _session_of_60_tokens(server_factory, model_dir, seed: int):  # type: ignore[no-untyped-def]
    """(stub, engine, tokens, session id): a 20-block pool with room for offloading,
    holding one session of 60 random tokens."""
    server = _pool_of_20_blocks(server_factory, model_dir, host_kv_bytes=1 << 20)
    tokens = random_tokens(60, seed=seed)
    session_id = open_session(server.stub)
    generate(server.stub, session_id, append_tokens=tokens)
    return server.stub, server.engine, tokens, session_id


@pytest.mark.parametrize("host_kv_bytes", [0, 1 << 20], ids=["drop", "offload"])
def test_rewinding_an_evicted_session_equals_a_fresh_one(
    host_kv_bytes, tiny_llama_dir, server_factory
) -> None:
    server = _pool_of_20_blocks(server_factory, tiny_llama_dir, host_kv_bytes)
    stub = server.stub
    tokens = random_tokens(60, seed=9)
    evicted = open_session(stub)
    generate(stub, evicted, append_tokens=tokens)
    other = open_session(stub)
    generate(stub, other, append_tokens=tokens[::-1])  # pushes the first one out
    expected = pb.RESIDENCY_DROPPED if host_kv_bytes == 0 else pb.RESIDENCY_OFFLOADED
    assert session_info(stub, evicted).residency == expected
    got, _ = generate(
        stub,
        evicted,
        append_tokens=[5, 6],
        offset=21,
        truncating=True,
        max_tokens=6,
        logprobs_ranges=[(21, U32_MAX)],
    )
    want, _ = generate(
        stub,
        open_session(stub),
        append_tokens=tokens[:21] + [5, 6],
        max_tokens=6,
        logprobs_ranges=[(21, U32_MAX)],
    )
    assert [t.id for t in got] == [t.id for t in want]
    assert (
        max(abs(a.sampled_logprob - b.sampled_logprob) for a, b in zip(got, want, strict=True))
        < TOLERANCE
    )


def test_rewinding_an_offloaded_session_releases_the_host_memory_it_no_longer_needs(
    tiny_llama_dir, server_factory
) -> None:
    stub, engine, tokens, evicted = _session_of_60_tokens(server_factory, tiny_llama_dir, seed=4)
    generate(stub, open_session(stub), append_tokens=tokens[::-1])  # pushes it out
    info = session_info(stub, evicted)
    assert info.residency == pb.RESIDENCY_OFFLOADED and info.kv_bytes == 60 * TOKEN_BYTES
    assert engine.evictor.host_bytes_used == 60 * TOKEN_BYTES

    generate(stub, evicted, offset=21, truncating=True)  # a rewind alone: nothing to run
    info = session_info(stub, evicted)
    kept = -(-21 // BLOCK_SIZE)  # whole blocks are kept on the host, and counted
    assert info.residency == pb.RESIDENCY_OFFLOADED
    assert info.kv_bytes == engine.evictor.host_bytes_used == kept * BLOCK_SIZE * TOKEN_BYTES
    host_keys = engine.runner.host_kv[evicted][0][0]
    assert host_keys.shape[0] == kept

    generate(stub, evicted, offset=0, truncating=True)
    assert session_info(stub, evicted).residency == pb.RESIDENCY_DROPPED
    assert engine.evictor.host_bytes_used == 0 and evicted not in engine.runner.host_kv

    got, _ = generate(stub, evicted, append_tokens=tokens[:9], max_tokens=5)
    want, _ = generate(stub, open_session(stub), append_tokens=tokens[:9], max_tokens=5)
    assert [t.id for t in got] == [t.id for t in want]


def test_kv_moves_run_without_the_engine_lock_and_a_close_meanwhile_frees_the_host_copy(
    tiny_llama_dir, server_factory
) -> None:
    """While a step copies an evicted session's KV to host memory, the event loop can
    still list sessions and close that very session; its host copy is then dropped once
    the copy ends, so nothing leaks."""
    stub, engine, tokens, evicted = _session_of_60_tokens(server_factory, tiny_llama_dir, seed=5)
    copy_kv = engine.runner.copy_kv
    seen: list[list[str]] = []

    def copy_while_the_loop_works(planned):  # type: ignore[no-untyped-def]
        def event_loop_calls() -> None:
            seen.append([info.session_id for info in engine.list_sessions()])
            engine.close_session(evicted)

        caller = threading.Thread(target=event_loop_calls)
        caller.start()
        caller.join(timeout=10)  # would time out if the step held the lock
        assert not caller.is_alive()
        return copy_kv(planned)

    engine.runner.copy_kv = copy_while_the_loop_works
    generate(stub, open_session(stub), append_tokens=tokens[::-1])  # pushes it out
    engine.runner.copy_kv = copy_kv
    assert seen and evicted in seen[0]
    assert engine.runner.num_swap_outs == 1
    assert evicted not in engine.runner.host_kv and engine.evictor.host_bytes_used == 0
    assert evicted not in [
        s.session_id for s in stub.ListSessions(pb.ListSessionsRequest()).sessions
    ]


def test_a_failed_swap_out_drops_the_session_and_the_next_calls_work(
    tiny_llama_dir, server_factory
) -> None:
    """Host memory runs out while a step copies an evicted session's KV: the step's
    calls fail, the session that lost its copy is dropped (recomputed from its tokens
    on its next call) and nothing is left claiming KV it does not have."""
    stub, engine, tokens, evicted = _session_of_60_tokens(server_factory, tiny_llama_dir, seed=6)
    copy_kv = engine.runner.copy_kv

    def out_of_host_memory(planned):  # type: ignore[no-untyped-def]
        engine.runner.copy_kv = copy_kv  # once
        raise MemoryError("host memory exhausted")

    engine.runner.copy_kv = out_of_host_memory
    pusher = open_session(stub)
    with pytest.raises(grpc.RpcError):
        generate(stub, pusher, append_tokens=tokens[::-1])  # pushes it out
    info = session_info(stub, evicted)
    assert info.residency == pb.RESIDENCY_DROPPED
    assert engine.evictor.host_bytes_used == 0 and evicted not in engine.runner.host_kv

    got, _ = generate(stub, evicted, append_tokens=[7, 8], offset=len(tokens), max_tokens=5)
    want, _ = generate(stub, open_session(stub), append_tokens=tokens + [7, 8], max_tokens=5)
    assert [t.id for t in got] == [t.id for t in want]
    again, _ = generate(stub, open_session(stub), append_tokens=tokens[::-1], max_tokens=3)
    assert len(again) == 3


def test_a_failed_swap_in_makes_the_session_recompute(tiny_llama_dir, server_factory) -> None:
    stub, engine, tokens, restored = _session_of_60_tokens(server_factory, tiny_llama_dir, seed=7)
    generate(stub, open_session(stub), append_tokens=tokens[::-1])  # pushes it out
    assert session_info(stub, restored).residency == pb.RESIDENCY_OFFLOADED
    copy_kv = engine.runner.copy_kv

    def failing_copy(planned):  # type: ignore[no-untyped-def]
        engine.runner.copy_kv = copy_kv  # once
        copy_kv(planned)  # the blocks are written, but the step is failed after
        raise RuntimeError("device error")

    engine.runner.copy_kv = failing_copy
    with pytest.raises(grpc.RpcError):
        generate(stub, restored, append_tokens=[7], offset=len(tokens), max_tokens=2)
    session = engine.sessions[restored]
    assert session.num_computed == 0  # its blocks are not trusted
    got, _ = generate(stub, restored, append_tokens=[8], offset=len(tokens) + 1, max_tokens=5)
    want, _ = generate(stub, open_session(stub), append_tokens=tokens + [7, 8], max_tokens=5)
    assert [t.id for t in got] == [t.id for t in want]
