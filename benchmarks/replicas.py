"""Question: what do several replicas behind the proxy give an agent workload, and what
does a replay cost?

1. Aggregate agent-turn throughput: 6 sessions at once (one thread each), each running
   6 turns of 60 appended tokens and 32 greedy decoded tokens, against one server
   reached directly (the baseline: the replica of the one-replica cluster, measured
   just before it is measured behind the proxy) and against 1, 2 and 3 replicas behind
   HAProxy (deploy/haproxy/haproxy.cfg). Prints turns/s and the ratio to the baseline.
   On a machine where the replicas share the same few cores (this one has 2) the
   scaling is flat: the replicas split the cores one server already used. The line
   "separate machines" is what N replicas would give with a machine each: N times the
   one-replica-behind-the-proxy figure (the proxy's own cost included, no contention).
2. The cost of a replay against the history length: a session of L tokens is lost on
   its server; the next turn re-creates it (a prefill of L tokens) before it runs.
   Prints that turn's time against the same turn on a session that was not lost.

Default model (SmolLM2-135M-Instruct); ``--quick`` for a short run (fewer agents, turns
and lengths); ``--model DIR`` for another model.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from dataclasses import dataclass

import grpc
from transformers import AutoTokenizer

from salience_client import SalienceClient, Session, TokenEvent
from salience_client.pb import salience_pb2 as pb
from salience_client.pb import salience_pb2_grpc
from salience_server.cluster import LocalCluster
from salience_server.engine.loader import resolve_model_path

TEXT = (
    "The agent inspects the repository, reads the failing test, and proposes a patch. "
    "The tool returns a diff with three hunks and a summary of the build output, which "
    "lists two warnings about unused imports and one error in the parser module. "
) * 200


@dataclass(frozen=True)
class Workload:
    num_agents: int
    num_turns: int
    turn_tokens: int
    decode_tokens: int
    replay_lengths: tuple[int, ...]


FULL = Workload(
    num_agents=6, num_turns=6, turn_tokens=60, decode_tokens=32, replay_lengths=(256, 1024, 2048)
)
QUICK = Workload(
    num_agents=3, num_turns=2, turn_tokens=60, decode_tokens=8, replay_lengths=(128, 512)
)


def agent_turns_per_s(target: str, corpus: list[int], work: Workload) -> float:
    """Turns per second over ``num_agents`` concurrent sessions, after a warm-up turn each."""
    with SalienceClient(target, timeout=600) as client:
        sessions = [client.open_session() for _ in range(work.num_agents)]
        barrier = threading.Barrier(work.num_agents + 1)
        errors: list[BaseException] = []

        def turn(session: Session, index: int, number: int) -> None:
            start = ((index * 7 + number) * work.turn_tokens) % (len(corpus) - work.turn_tokens)
            append = corpus[start : start + work.turn_tokens]
            events = session.generate(append, max_tokens=work.decode_tokens, ignore_eos=True)
            assert sum(isinstance(e, TokenEvent) for e in events) == work.decode_tokens

        def run(index: int) -> None:
            try:
                turn(sessions[index], index, 0)  # warm-up: the prefill of the first turn
                barrier.wait()
                for number in range(1, work.num_turns + 1):
                    turn(sessions[index], index, number)
            except BaseException as error:  # reported by the main thread
                errors.append(error)
                barrier.abort()

        threads = [threading.Thread(target=run, args=(i,)) for i in range(work.num_agents)]
        for thread in threads:
            thread.start()
        barrier.wait()
        start = time.perf_counter()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - start
        if errors:
            raise errors[0]
        replicas = {session.replica for session in sessions}
        for session in sessions:
            session.close()
    print(f"    {len(replicas)} replica(s) served the {work.num_agents} sessions", flush=True)
    return work.num_agents * work.num_turns / elapsed


def replay_cost(target: str, corpus: list[int], length: int, work: Workload) -> tuple[float, float]:
    """(seconds of a turn on a session of ``length`` tokens that was lost and replayed,
    seconds of the same turn on one that was not)."""
    history, append = corpus[:length], corpus[length : length + work.turn_tokens]
    times = []
    with SalienceClient(target, timeout=600) as client, grpc.insecure_channel(target) as channel:
        behind_its_back = salience_pb2_grpc.SalienceStub(channel)
        for is_lost in (False, True):
            session = client.open_session()
            session.prefill(history)
            if is_lost:  # as when its replica dies: the server no longer knows it
                request = pb.CloseSessionRequest(session_id=session.session_id)
                behind_its_back.CloseSession(request)
            start = time.perf_counter()
            list(session.generate(append, max_tokens=work.decode_tokens, ignore_eos=True))
            times.append(time.perf_counter() - start)
            assert session.num_replays == int(is_lost)
            session.close()
    return times[1], times[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run")
    parser.add_argument("--model", help="model directory or GGUF (default: the default model)")
    args = parser.parse_args()
    work = QUICK if args.quick else FULL
    server_args = ["--log-level", "WARNING", *(["--model", args.model] if args.model else [])]
    path, _ = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    corpus = tokenizer.encode(TEXT, add_special_tokens=False)
    load = os.getloadavg()[0]  # other work on the machine skews every figure
    print(
        f"{work.num_agents} agents x {work.num_turns} turns "
        f"(+{work.turn_tokens} tokens, {work.decode_tokens} decoded each)",
        flush=True,
    )

    behind_proxy = {}
    for num_replicas in (1, 2, 3):
        with LocalCluster(num_replicas, server_args) as cluster:
            if num_replicas == 1:  # the baseline: the same server, reached directly
                direct = cluster.replicas[0].target
                print("one server, direct (the baseline):", flush=True)
                baseline = agent_turns_per_s(direct, corpus, work)
                print(f"  {baseline:.2f} turns/s", flush=True)
                replays = [
                    (length, *replay_cost(direct, corpus, length, work))
                    for length in work.replay_lengths
                ]
            print(f"{num_replicas} replica(s) behind HAProxy:", flush=True)
            behind_proxy[num_replicas] = agent_turns_per_s(cluster.target, corpus, work)
            rate = behind_proxy[num_replicas]
            print(
                f"  {rate:.2f} turns/s = {rate / baseline:.2f}x the baseline; "
                f"{rate / num_replicas:.2f} turns/s per replica",
                flush=True,
            )
    one = behind_proxy[1]
    print(f"proxy overhead: 1 replica behind HAProxy = {one / baseline:.2f}x one server direct")
    print(
        "this machine: 3 replicas = "
        f"{behind_proxy[3] / baseline:.2f}x one server (flat: they share its cores)"
    )
    print(
        f"separate machines (one replica each, projected): 2 replicas ~ {2 * one:.2f} turns/s "
        f"({2 * one / baseline:.2f}x), 3 replicas ~ {3 * one:.2f} turns/s ({3 * one / baseline:.2f}x)"
    )
    end_load = os.getloadavg()[0]
    print(f"load average (1 min) at the start and the end: {load:.1f}, {end_load:.1f}")
    for length, replayed, live in replays:
        cost_ms = (replayed - live) * 1e3
        print(
            f"replay of {length:5d} tokens: the next turn took {replayed * 1e3:7.1f} ms, "
            f"{live * 1e3:6.1f} ms on a live session; ratio {replayed / live:.2f}; the replay "
            f"{cost_ms:.0f} ms = {cost_ms / length:.2f} ms per token of history"
        )


if __name__ == "__main__":
    main()
