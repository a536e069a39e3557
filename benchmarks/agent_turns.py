"""Question: what does keeping a session save an agent over resending its history?

A 20-turn conversation on the default model, each turn appending about 60 tokens and
decoding 32 (greedy), through one session. Baseline: the same turns sent statelessly
(a fresh session given the whole history each turn) to the same server. Prints the total
time of each, the ratio, the per-turn times, and a probe turn at ~2,000 tokens of
history against the same turn on an empty session (aim: within 1.3x). ``--quick``: 4
turns, the probe at their history.
"""

from __future__ import annotations

import time

import grpc
from transformers import AutoTokenizer

from benchmarks._cli import is_quick
from benchmarks._server import running_server
from salience_client.pb import salience_pb2 as pb
from salience_client.pb import salience_pb2_grpc
from salience_server.engine.loader import resolve_model_path

NUM_TURNS = 20
QUICK_TURNS = 4
TURN_TOKENS = 60
DECODE_TOKENS = 32
TEXT = (
    "The agent inspects the repository, reads the failing test, and proposes a patch. "
    "The tool returns a diff with three hunks and a summary of the build output, which "
    "lists two warnings about unused imports and one error in the parser module. "
) * 40


def run_turn(stub, session_id: str, append: list[int], offset: int, max_tokens: int):
    """(decoded ids, wall seconds)."""
    decoded, elapsed, _ = timed_turn(stub, session_id, append, offset, max_tokens)
    return decoded, elapsed


def timed_turn(stub, session_id: str, append: list[int], offset: int, max_tokens: int):
    """(decoded ids, wall seconds, the turn's seconds normalized to DECODE_TOKENS decoded)."""
    request = pb.GenerateRequest(
        session_id=session_id, append_tokens=append, offset=offset, max_tokens=max_tokens
    )
    start = time.perf_counter()
    decoded, done = [], None
    for event in stub.Generate(request):
        if event.HasField("token"):
            decoded.append(event.token.id)
        else:
            done = event.done
    elapsed = time.perf_counter() - start
    per_token_ms = done.decode_ms / max(1, done.completion_tokens - 1)
    normalized_ms = done.prefill_ms + per_token_ms * (DECODE_TOKENS - 1)
    return decoded, elapsed, normalized_ms / 1e3


def main() -> None:
    num_turns = QUICK_TURNS if is_quick(__doc__) else NUM_TURNS
    path, _ = resolve_model_path(None)
    tokenizer = AutoTokenizer.from_pretrained(path)
    corpus = tokenizer.encode(TEXT, add_special_tokens=False)
    turns = [corpus[i * TURN_TOKENS : (i + 1) * TURN_TOKENS] for i in range(num_turns + 1)]
    with running_server() as target, grpc.insecure_channel(target) as channel:
        stub = salience_pb2_grpc.SalienceStub(channel)
        run_turn(
            stub, stub.OpenSession(pb.OpenSessionRequest()).session_id, turns[0], 0, 4
        )  # warm-up
        session_id = stub.OpenSession(pb.OpenSessionRequest()).session_id
        history: list[int] = []
        session_times, stateless_times, decoded_counts = [], [], []
        for user in turns[:num_turns]:
            decoded, elapsed = run_turn(stub, session_id, user, len(history), DECODE_TOKENS)
            session_times.append(elapsed)
            decoded_counts.append(len(decoded))
            history_before = list(history)
            history += user + decoded
            fresh = stub.OpenSession(pb.OpenSessionRequest()).session_id
            replay, elapsed = run_turn(stub, fresh, history_before + user, 0, len(decoded))
            stateless_times.append(elapsed)
            stub.CloseSession(pb.CloseSessionRequest(session_id=fresh))
            assert replay == decoded, "stateless replay diverged from the session"
        probe = turns[num_turns]
        # Times from Done's prefill/decode split, normalized to DECODE_TOKENS decoded
        # tokens (the empty-session turn may meet EOS earlier).
        _, _, long_time = timed_turn(stub, session_id, probe, len(history), DECODE_TOKENS)
        empty = stub.OpenSession(pb.OpenSessionRequest()).session_id
        _, _, empty_time = timed_turn(stub, empty, probe, 0, DECODE_TOKENS)
    for index, (a, b) in enumerate(zip(session_times, stateless_times, strict=True)):
        print(
            f"turn {index + 1:2d}: session {a * 1e3:7.1f} ms, stateless {b * 1e3:7.1f} ms ({decoded_counts[index]} decoded)"
        )
    total_session, total_stateless = sum(session_times), sum(stateless_times)
    print(
        f"total: session {total_session:.2f} s, stateless {total_stateless:.2f} s; "
        f"stateless/session {total_stateless / total_session:.2f}x; "
        f"last turn {stateless_times[-1] / session_times[-1]:.2f}x"
    )
    print(
        f"probe turn at {len(history)} tokens of history: {long_time * 1e3:.1f} ms; "
        f"on an empty session: {empty_time * 1e3:.1f} ms; ratio {long_time / empty_time:.2f}"
    )


if __name__ == "__main__":
    main()
