"""Random, mostly bad Generate calls: each is answered with a defined status (never
UNKNOWN, INTERNAL or a hang), and the block pool stays consistent."""

from __future__ import annotations

import math
import random

import grpc

from salience_client.pb import salience_pb2 as pb

U32 = [0, 1, 2, 5, 100, 511, 512, 513, 10**6, 2**32 - 1]
FLOATS = [0.0, 0.5, 1.0, 1.5, -1.0, math.nan, math.inf, 1e30]
ALLOWED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def _random_request(rng: random.Random, session_id: str, length: int) -> pb.GenerateRequest:
    if rng.random() < 0.6:  # a well-formed call, so that the engine paths run too
        return pb.GenerateRequest(
            session_id=session_id,
            append_tokens=[rng.randrange(256) for _ in range(rng.choice([0, 1, 7, 30]))],
            offset=rng.choice([length, max(0, length - 5)]),
            truncating=True,
            max_tokens=rng.choice([0, 3, 12]),
            logprobs_ranges=[pb.PositionRange(start=max(0, length - 5), end=2**32 - 1)],
            logprob_top_k=rng.choice([0, 3]),
            temperature=rng.choice([0.0, 0.8]),
            stop_strings=["a"] if rng.random() < 0.3 else [],
            return_text=True,
        )
    request = pb.GenerateRequest(
        session_id=session_id,
        append_tokens=[
            rng.choice([0, 1, 258, 259, 300, 2**31]) for _ in range(rng.choice([0, 1, 3, 40]))
        ],
        offset=rng.choice([length, length, max(0, length - 3), length + 1, 0, rng.choice(U32)]),
        truncating=rng.random() < 0.3,
        max_tokens=rng.choice([0, 0, 1, 5, 2**32 - 1]),
        logprobs_ranges=[
            pb.PositionRange(start=rng.choice([*U32, length]), end=rng.choice(U32))
            for _ in range(rng.choice([0, 1, 2]))
        ],
        logprob_top_k=rng.choice([0, 1, 5, 10**6]),
        temperature=rng.choice(FLOATS),
        top_p=rng.choice(FLOATS),
        top_k=rng.choice([0, 1, 50, 10**6]),
        min_p=rng.choice(FLOATS),
        repetition_penalty=rng.choice(FLOATS),
        stop_token_ids=[rng.choice([1, 5, 10**6])] if rng.random() < 0.2 else [],
        stop_strings=["a", ""] if rng.random() < 0.2 else [],
        return_text=rng.random() < 0.5,
        priority=rng.choice([-5, 0, 5]),
    )
    if rng.random() < 0.1:
        request.seed = rng.choice([0, 2**64 - 1])
    return request


def test_random_calls_get_defined_statuses(tiny_llama_dir, server_factory) -> None:
    # A pool of 16 blocks of 4 tokens: evictions and KV_CACHE_FULL happen too.
    server = server_factory(tiny_llama_dir, block_size=4, kv_cache_bytes=1 << 15, max_queue=4)
    stub = server.stub
    rng = random.Random(0)
    sessions = [stub.OpenSession(pb.OpenSessionRequest()).session_id for _ in range(3)]
    outcomes: dict[str, int] = {}
    for _ in range(300):
        session_id = rng.choice([*sessions, "unknown"])
        length = (
            0
            if session_id == "unknown"
            else stub.GetSession(pb.GetSessionRequest(session_id=session_id)).session.length
        )
        try:
            for _ in stub.Generate(_random_request(rng, session_id, length), timeout=20):
                pass
            outcomes["OK"] = outcomes.get("OK", 0) + 1
        except grpc.RpcError as error:
            assert error.code() in ALLOWED, (error.code(), error.details())
            outcomes[error.code().name] = outcomes.get(error.code().name, 0) + 1
    # The mix really exercised both paths.
    assert outcomes.get("OK", 0) > 10 and outcomes.get("INVALID_ARGUMENT", 0) > 10
