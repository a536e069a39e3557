"""Question: how does aggregate decode throughput grow with concurrent sessions?

Runs 1, 4, 8 and 16 sessions decoding at once (greedy, 48 tokens each, short distinct
prompts) against one server on the default model, and prints aggregate decode tokens
per second for each as a ratio to 1 session (the baseline). Aim: >= 4x at 8 sessions.
"""

from __future__ import annotations

import threading
import time

import grpc
from transformers import AutoTokenizer

from benchmarks._server import running_server
from salience_client.pb import salience_pb2 as pb
from salience_client.pb import salience_pb2_grpc
from salience_server.engine.loader import resolve_model_path

NUM_TOKENS = 48
LEVELS = (1, 4, 8, 16)


def decode_together(stub, prompts: list[list[int]]) -> float:
    """Aggregate decoded tokens per second while all streams run."""
    barrier = threading.Barrier(len(prompts))
    stamps: list[list[float]] = [[] for _ in prompts]

    def run(index: int) -> None:
        session_id = stub.OpenSession(pb.OpenSessionRequest()).session_id
        request = pb.GenerateRequest(
            session_id=session_id,
            append_tokens=prompts[index],
            max_tokens=NUM_TOKENS,
            ignore_eos=True,  # every stream decodes exactly NUM_TOKENS
        )
        barrier.wait()
        for event in stub.Generate(request):
            if event.HasField("token"):
                stamps[index].append(time.perf_counter())
        stub.CloseSession(pb.CloseSessionRequest(session_id=session_id))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # From the first token anywhere (prefills done) to the last: decode time only.
    start = max(s[0] for s in stamps)
    end = max(s[-1] for s in stamps)
    num_decoded = sum(sum(1 for t in s if t > start) for s in stamps)
    return num_decoded / (end - start)


def main() -> None:
    path, _ = resolve_model_path(None)
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = [
        tokenizer.encode(
            f"Story number {i}: once upon a time, in a land of {i} rivers,",
            add_special_tokens=False,
        )
        for i in range(max(LEVELS))
    ]
    with running_server() as target, grpc.insecure_channel(target) as channel:
        stub = salience_pb2_grpc.SalienceStub(channel)
        decode_together(stub, prompts[:2])  # warm-up
        rates = {n: decode_together(stub, prompts[:n]) for n in LEVELS}
    for n, rate in rates.items():
        print(f"{n:2d} sessions: {rate:6.1f} tok/s aggregate, {rate / rates[1]:.2f}x one session")


if __name__ == "__main__":
    main()
