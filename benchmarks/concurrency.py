"""Question: how does aggregate decode throughput grow with concurrent sessions, and do
sampled rows cost more than greedy ones?

Runs 1, 4, 8 and 16 sessions decoding at once (48 tokens each, short distinct prompts)
against one server on the default model, at each level greedy, sampling at
temperature 1.0 unseeded, and seeded, and prints aggregate decode tokens per second for
each (the best of three rounds, every level and mode taking turns in each) as a ratio
to 1 session of the same kind (the baseline), and each sampled figure against the
greedy one. Aim: >= 5x at 8 sessions, sampled as fast as greedy.

Also prints what the frontend adds to each token: the mean time from the end of the
engine step that decoded it to its event being written to the client's stream (the
server's ``salience_token_delivery_seconds``), against the mean step time.
``--quick``: 1 and 4 sessions, 16 tokens each, one round; ``--dtype``: the server's
(default: its own); ``--model``: another model directory or GGUF.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request

import grpc
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from benchmarks._cli import parser
from benchmarks._server import free_port, running_server
from salience_client.pb import salience_pb2 as pb
from salience_client.pb import salience_pb2_grpc
from salience_server.engine.loader import resolve_model_path

NUM_TOKENS = 48
LEVELS = (1, 4, 8, 16)
ROUNDS = 3
QUICK_TOKENS = 16
QUICK_LEVELS = (1, 4)


MODES = {
    "greedy": {},
    "sampled": {"temperature": 1.0},
    "seeded": {"temperature": 1.0, "seed": 1},
}


async def decode_together(
    stub, prompts: list[list[int]], num_tokens: int, sampling: dict[str, float] | None = None
) -> float:
    """Aggregate decoded tokens per second while all streams run (one asyncio client,
    so that the load generator itself stays light on this small machine)."""
    stamps: list[list[float]] = [[] for _ in prompts]
    session_ids = [(await stub.OpenSession(pb.OpenSessionRequest())).session_id for _ in prompts]

    async def run(index: int) -> None:
        request = pb.GenerateRequest(
            session_id=session_ids[index],
            append_tokens=prompts[index],
            max_tokens=num_tokens,
            ignore_eos=True,  # every stream decodes exactly num_tokens
            **(sampling or {}),
        )
        async for event in stub.Generate(request):
            if event.HasField("token"):
                stamps[index].append(time.perf_counter())

    await asyncio.gather(*(run(i) for i in range(len(prompts))))
    for session_id in session_ids:
        await stub.CloseSession(pb.CloseSessionRequest(session_id=session_id))
    # From the moment every stream has its first token (prefills done) to the last.
    start = max(s[0] for s in stamps)
    end = max(s[-1] for s in stamps)
    num_decoded = sum(sum(1 for t in s if t > start) for s in stamps)
    return num_decoded / (end - start)


async def measure(
    target: str, prompts: list[list[int]], levels: tuple[int, ...], num_tokens: int, rounds: int
) -> dict[str, dict[int, float]]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = salience_pb2_grpc.SalienceStub(channel)
        await decode_together(stub, prompts[:2], num_tokens)  # warm-up
        rates: dict[str, dict[int, float]] = {mode: {} for mode in MODES}
        # Every level and mode in each round, taking turns, so that the machine's drift
        # weighs on the ratios (to one session, to greedy) as little as it can; the best
        # of ``ROUNDS`` rounds, as a run of a few seconds can lose a fifth to a neighbour.
        for _ in range(rounds):
            for n in levels:
                for mode, sampling in MODES.items():
                    rate = await decode_together(stub, prompts[:n], num_tokens, sampling)
                    rates[mode][n] = max(rate, rates[mode].get(n, 0.0))
        return rates


def main() -> None:
    parsing = parser(__doc__, with_dtype=True)
    parsing.add_argument("--model", default=None, help="a model directory or GGUF file")
    args = parsing.parse_args()
    quick = args.quick
    levels, num_tokens = (QUICK_LEVELS, QUICK_TOKENS) if quick else (LEVELS, NUM_TOKENS)
    path, _ = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = [
        tokenizer.encode(
            f"Story number {i}: once upon a time, in a land of {i} rivers,",
            add_special_tokens=False,
        )
        for i in range(max(levels))
    ]
    metrics_port = free_port()
    options = ["--metrics-port", str(metrics_port), "--dtype", args.dtype]
    if args.model:
        options += ["--model", args.model]
    with running_server(*options) as target:
        rates = asyncio.run(measure(target, prompts, levels, num_tokens, 1 if quick else ROUNDS))
        delivery_s = mean_delivery_s(metrics_port)
    for mode, by_level in rates.items():
        for n, rate in by_level.items():
            versus = rate / rates["greedy"][n]
            print(
                f"{mode:>7} {n:2d} sessions: {rate:6.1f} tok/s aggregate, "
                f"{rate / by_level[1]:.2f}x one session, {versus:.2f}x greedy"
            )
    busiest = max(levels)
    step_s = busiest / rates["greedy"][busiest]  # one token per session per step
    print(
        f"step end -> client stream: {delivery_s * 1e3:.2f} ms per token on average, "
        f"{delivery_s / step_s:.3f}x the {busiest}-session step ({step_s * 1e3:.1f} ms)"
    )


def mean_delivery_s(metrics_port: int) -> float:
    """The mean of the server's salience_token_delivery_seconds over the whole run."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as reply:
        text = reply.read().decode()
    values = {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("salience_token_delivery_seconds")
    }
    return (
        values["salience_token_delivery_seconds_sum"]
        / values["salience_token_delivery_seconds_count"]
    )


if __name__ == "__main__":
    main()
